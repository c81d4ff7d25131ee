"""Exact nearest-profile search under a weighted χ², pruned by a projection bound.

For weights ``w`` the distance of an observed profile ``o`` to a database profile
``d`` is ``Σ_λ w_λ (o_λ - d_λ)²``. With ``s = √w`` both live in the scaled space
``x = s o``, ``y = s d``, where the distance is Euclidean. Let ``V`` be an
orthonormal basis of the leading principal directions of the (centred) database
and write ``x - m = V a + r_x``, ``y - m = V b + r_y`` with ``r ⟂ V``. Then,
exactly,

    ‖x - y‖² = ‖a - b‖² + ‖r_x - r_y‖² ≥ ‖a - b‖² + (‖r_x‖ - ‖r_y‖)² = LB,

so the lower bound ``LB`` is the squared Euclidean distance between the
augmented vectors ``ã = [a, ‖r_x‖]`` and ``b̃ = [b, ‖r_y‖]`` (``k + 1``
dimensions instead of ``n_λ``; ``k`` ≈ 8–24).

A k-d tree over the ``b̃`` (:class:`scipy.spatial.cKDTree`) gives, for every
pixel, the ``K`` entries of smallest ``LB`` (``n_candidates``, default 6).
Their exact distances (float64, explicit differences, evaluated only while
``LB`` is below the best exact distance ``U`` found so far) give ``U``. If the
``K``-th smallest ``LB`` exceeds ``U``, no other entry can be closer (its
exact distance ≥ its ``LB`` > ``U``): the pixel is done. For the few others,
every entry with ``LB ≤ U`` is fetched by a radius query and evaluated
exactly. The result is the entry a brute-force search finds, ties resolved to
the smallest index (as ``argmin``). Pixel blocks run in
``torch.get_num_threads()`` Python threads, each with single-threaded kernels
and tree queries.

Floating point: the bounds are float64; their rounding error (≤ 10⁻⁹ of
``(‖ã‖ + ‖b̃‖)²``: ``‖r‖² = ‖x‖² − ‖a‖²`` only where it keeps ≥ 10⁻⁶ of
``‖x‖²``, the residual vector itself elsewhere) is covered by a slack
``δ = 10⁻⁸ (2‖ã‖ + √U)²`` added to every comparison, so rounding never prunes
a true winner. The exact distances are float64 sums of explicit squared
differences, like those of :func:`brute_force_nearest`.

Example
-------
>>> import numpy as np
>>> from iris_lab.methods.search import NearestProfileSearch, brute_force_nearest
>>> rng = np.random.default_rng(0)
>>> db = rng.normal(size=(500, 40)).cumsum(1)
>>> obs = db[rng.integers(0, 500, 30)] + rng.normal(scale=0.1, size=(30, 40))
>>> idx, chi2 = NearestProfileSearch(db, np.ones(40)).query(obs)
>>> bool((idx == brute_force_nearest(obs, db, np.ones(40))[0]).all())
True
"""

from __future__ import annotations

import numpy as np
import torch

#: Relative slack on every bound comparison (far above float64 rounding of the bound).
_SLACK = 1e-8
#: Largest default projection basis (a k-d tree works best in few dimensions).
_MAX_COMPONENTS = 24


def brute_force_nearest(queries: np.ndarray, database: np.ndarray, weights: np.ndarray,
                        *, chunk_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Reference search: every weighted distance, in float64, by explicit differences.

    Parameters
    ----------
    queries
        (n, n_λ) observed profiles (finite).
    database
        (n_entries, n_λ) database profiles.
    weights
        (n_λ,) or (n, n_λ) non-negative weights.
    chunk_size
        Queries per dense block.

    Returns
    -------
    index, distance
        (n,) int64 argmin and (n,) float64 ``Σ w (o - d)²`` at the argmin.

    Example
    -------
    >>> brute_force_nearest(np.zeros((1, 3)), np.eye(3), np.ones(3))[0]
    array([0])
    """
    q = np.asarray(queries, dtype=np.float64)
    d = torch.as_tensor(np.asarray(database, dtype=np.float64))
    w = np.array(np.broadcast_to(np.asarray(weights, dtype=np.float64), q.shape))
    index = np.empty(len(q), dtype=np.int64)
    dist = np.empty(len(q), dtype=np.float64)
    d2 = d**2
    step = max(1, int(chunk_size))
    for start in range(0, len(q), step):
        qq = torch.as_tensor(q[start:start + step])
        ww = torch.as_tensor(w[start:start + step])
        # every distance in float64 (expanded form), then the near-ties (within
        # 1e-9 of the scale, far above float64 rounding) re-evaluated by
        # explicit differences so the reference does not rely on the expansion
        full = ((qq**2) * ww).sum(1, keepdim=True) - 2.0 * (qq * ww) @ d.T + ww @ d2.T
        scale = ((qq**2) * ww).sum(1) + (ww @ d2.T).amax(1)
        near = full <= full.amin(1, keepdim=True) + 1e-9 * scale[:, None]
        pix, ent = torch.nonzero(near, as_tuple=True)
        exact = (((qq[pix] - d[ent]) ** 2) * ww[pix]).sum(1)
        best, idx = _best_of_pairs(len(qq), pix, ent, exact)
        index[start:start + step] = idx.numpy()
        dist[start:start + step] = best.numpy()
    return index, dist


def _best_of_pairs(n: int, pix: torch.Tensor, ent: torch.Tensor, dist: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel the smallest ``dist`` over its (pixel, entry) pairs; ties → smallest entry."""
    best = torch.full((n,), float("inf"), dtype=dist.dtype, device=dist.device)
    best = best.scatter_reduce(0, pix, dist, reduce="amin")
    win = dist == best[pix]
    big = torch.iinfo(torch.int64).max
    idx = torch.full((n,), big, dtype=torch.int64, device=dist.device)
    idx = idx.scatter_reduce(0, pix[win], ent[win], reduce="amin")
    return best, idx


def principal_directions(centred: np.ndarray, top: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray, float]:
    """Leading principal directions of centred rows, from their scatter matrix.

    The (n_λ × n_λ) scatter matrix is a torch product; ``scipy.linalg.eigh``
    runs with one BLAS thread (its threads would fight torch's).

    Returns
    -------
    tuple
        Eigenvalues (descending, ≥ 0), eigenvectors as columns (orthonormal to
        float64 rounding), and the trace of the scatter matrix (the total
        variance × rows). ``top`` keeps only the largest ``top`` of them.

    Example
    -------
    >>> rows = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.1], [0.0, -0.1]])
    >>> evals, evecs, trace = principal_directions(rows)
    >>> evals.round(3).tolist(), abs(evecs[:, 0]).round(3).tolist(), round(trace, 3)
    ([2.0, 0.02], [1.0, 0.0], 2.02)
    """
    from scipy.linalg import eigh
    from threadpoolctl import threadpool_limits

    rows_t = torch.as_tensor(np.asarray(centred, dtype=np.float64))
    scatter = (rows_t.T @ rows_t).numpy()
    dim = scatter.shape[0]
    top = dim if top is None else int(min(max(top, 1), dim))
    with threadpool_limits(1, user_api="blas"):
        evals, evecs = eigh(scatter, subset_by_index=[dim - top, dim - 1], driver="evr")
    return (np.clip(evals[::-1], 0.0, None), evecs[:, ::-1], float(np.trace(scatter)))


class NearestProfileSearch:
    """Exact weighted nearest-neighbour search of profiles in a fixed database.

    Parameters
    ----------
    database
        (n_entries, n_λ) profiles.
    weights
        (n_λ,) non-negative weights of the χ² (zero removes a sample).
    n_components
        Size of the projection basis; default: the smallest number of principal
        directions leaving at most 10⁻⁵ of the database's weighted variance in
        the residual (between 4 and 24: the tree works best in few dimensions).
    n_candidates
        Entries of smallest bound fetched per pixel by the first tree query.
    block_size
        Pixels per block (memory ≈ block_size × n_λ × 40 bytes per thread).
    device
        torch device of the exact float64 distances (the tree runs on the CPU).
    max_basis_rows
        Entries (a random subset) used to estimate the principal directions;
        the basis only affects speed, never the result.
    random_state
        Seed of that subset.

    Attributes
    ----------
    n_components_ : int
    stats_ : dict
        ``pixels`` queried so far, ``candidates`` (exactly evaluated pairs) and
        ``fallback`` (pixels that needed the radius query).

    Example
    -------
    >>> search = NearestProfileSearch(np.eye(4), np.ones(4))
    >>> search.query(np.array([[0.9, 0.0, 0.1, 0.0]]))[0]
    array([0])
    """

    def __init__(self, database: np.ndarray, weights: np.ndarray, *,
                 n_components: int | None = None, n_candidates: int = 6,
                 block_size: int = 1024, device: str | torch.device = "cpu",
                 max_basis_rows: int = 4096, random_state: int = 0) -> None:
        from scipy.spatial import cKDTree

        db = np.asarray(database, dtype=np.float64)
        w = np.asarray(weights, dtype=np.float64)
        if db.ndim != 2 or w.shape != (db.shape[1],):
            raise ValueError(f"database {db.shape} and weights {w.shape} do not match")
        if not np.isfinite(db).all():
            raise ValueError("database profiles must be finite")
        if (w < 0).any() or not np.isfinite(w).all() or not (w > 0).any():
            raise ValueError("weights must be finite, non-negative and not all zero")
        self.device = torch.device(device)
        self.block_size = max(1, int(block_size))
        n = len(db)
        keep = w > 0
        self._keep = keep
        self._scale = np.sqrt(w[keep])
        scaled = (db if keep.all() else np.compress(keep, db, axis=1)) * self._scale
        self._mean = scaled.mean(0)
        self._all_kept = bool(keep.all())
        self._scale_t = torch.as_tensor(self._scale)
        self._neg_mean_t = torch.as_tensor(-self._mean)
        centred = scaled - self._mean
        rows = centred
        if n > max_basis_rows:
            pick = np.random.default_rng(random_state).choice(n, max_basis_rows, replace=False)
            rows = centred[np.sort(pick)]
        # principal directions from the (n_λ × n_λ) scatter matrix (torch product;
        # LAPACK on one thread: its BLAS threads would fight torch's); eigh returns an
        # orthonormal basis (to float64 rounding) whatever the subset
        dim = rows.shape[-1]
        top = min(dim, _MAX_COMPONENTS if n_components is None else int(max(1, n_components)))
        evals, evecs, trace = principal_directions(rows, top)
        if n_components is None:
            left = 1.0 - np.cumsum(evals) / max(trace, 1e-300)
            n_components = int(np.searchsorted(-left, -1e-5) + 1)
            n_components = int(min(max(n_components, 4), _MAX_COMPONENTS))
        self.n_components_ = int(max(1, min(n_components, evecs.shape[1])))
        self._basis = np.ascontiguousarray(evecs[:, : self.n_components_])
        self._basis_t = torch.as_tensor(self._basis)
        self._tree = cKDTree(self._augment(centred), leafsize=16, balanced_tree=False)
        self.n_candidates = int(max(1, min(n_candidates, n)))
        self._n_entries = n
        self._db = torch.as_tensor(db, device=self.device)
        self._w = torch.as_tensor(w, device=self.device)
        self.stats_: dict[str, int] = {"pixels": 0, "candidates": 0, "fallback": 0}

    def _augment(self, centred: np.ndarray | torch.Tensor) -> np.ndarray:
        """``[a, ‖r‖]`` for centred scaled profiles (float64).

        ``‖r‖² = ‖x‖² − ‖a‖²`` where the residual holds at least 10⁻⁶ of ``‖x‖²``
        (relative error of ``‖r‖`` ≤ 10⁻⁹ there); the residual vector itself elsewhere.
        """
        x = torch.as_tensor(centred, dtype=torch.float64)
        basis = self._basis_t
        coef = x @ basis
        x2 = torch.linalg.vector_norm(x, dim=1) ** 2
        r2 = x2 - torch.linalg.vector_norm(coef, dim=1) ** 2
        small = torch.nonzero(r2 < 1e-6 * x2).ravel()
        if len(small):
            xs = x[small]
            r2[small] = torch.linalg.vector_norm(xs - (xs @ basis) @ basis.T, dim=1) ** 2
        return torch.cat([coef, r2.clamp_(min=0.0).sqrt_()[:, None]], dim=1).numpy()

    def _exact(self, q: torch.Tensor, pix: np.ndarray | None, ent: np.ndarray) -> np.ndarray:
        """``Σ w (q - d)²`` for (pixel, entry) pairs (``pix=None``: pixel i with ``ent[i]``)."""
        diff = self._db.index_select(0, torch.as_tensor(ent, device=self.device))
        diff -= q if pix is None else q.index_select(0, torch.as_tensor(pix, device=self.device))
        # elementwise product and row sum (not a matrix-vector product, whose
        # rounding may depend on the row's position): equal rows, equal sums
        return (diff.square_() * self._w).sum(1).cpu().numpy()

    def query(self, profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best database index and weighted distance ``Σ w (o - d)²`` for each profile.

        Blocks of ``block_size`` pixels run in ``torch.get_num_threads()`` Python
        threads, each with single-threaded torch kernels and tree queries (small
        kernels on shared cores lose more to thread synchronisation than they gain).

        Parameters
        ----------
        profiles
            (n, n_λ) finite observed profiles on the database grid (float32 or
            float64; the distances are float64 either way).

        Returns
        -------
        index, distance
            (n,) int64 and (n,) float64.
        """
        q = np.asarray(profiles)
        if q.ndim != 2 or q.shape[1] != self._keep.size:
            raise ValueError(f"profiles must be (n, {self._keep.size}), got {q.shape}")
        if q.dtype not in (np.float32, np.float64):
            q = q.astype(np.float64)
        n = len(q)
        index = np.empty(n, dtype=np.int64)
        dist = np.empty(n, dtype=np.float64)
        blocks = [slice(s, min(s + self.block_size, n)) for s in range(0, n, self.block_size)]
        threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        if threads <= 1 or len(blocks) <= 1:
            results = [self._query_block(q[sl], threads) for sl in blocks]
        else:
            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(threads) as pool:
                    results = list(pool.map(lambda sl: self._query_block(q[sl], 1), blocks))
            finally:
                torch.set_num_threads(threads)
        for sl, (idx, best, stats) in zip(blocks, results, strict=True):
            index[sl], dist[sl] = idx, best
            for key, value in stats.items():
                self.stats_[key] += value
        return index, dist

    def _query_block(self, q: np.ndarray, workers: int
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        dev = self.device
        n, k = len(q), self.n_candidates
        qt = torch.as_tensor(q, device=dev, dtype=torch.float64)
        x = torch.as_tensor(q, dtype=torch.float64)
        if not self._all_kept:
            x = x[:, torch.as_tensor(self._keep)]
        aug = self._augment(torch.addcmul(self._neg_mean_t, x, self._scale_t))
        del x
        root, cand = self._tree.query(aug, k=k, workers=workers)
        lb = np.asarray(root, dtype=np.float64).reshape(n, k) ** 2
        cand = np.asarray(cand, dtype=np.int64).reshape(n, k)
        # exact distance of the smallest-bound entry: an upper bound U on the best
        first = self._exact(qt, None, cand[:, 0])
        upper = first.copy()
        norm = np.sqrt((aug**2).sum(1))

        def slack(u: np.ndarray) -> np.ndarray:
            return _SLACK * (2.0 * norm + np.sqrt(np.clip(u, 0.0, None))) ** 2

        # the other fetched entries whose bound does not exceed U (+ slack)
        p_more, j_more = np.nonzero(lb[:, 1:] <= (upper + slack(upper))[:, None])
        e_more = cand[p_more, j_more + 1]
        pix, ent, dist = [np.arange(n), p_more], [cand[:, 0], e_more], [first]
        if len(p_more):
            d_more = self._exact(qt, p_more, e_more)
            dist.append(d_more)
            np.minimum.at(upper, p_more, d_more)
        # pixels whose K-th bound does not exceed U: fetch every entry with LB ≤ U
        fallback = 0
        if k < self._n_entries:
            thr = upper + slack(upper)
            rest = np.flatnonzero(lb[:, -1] <= thr)
            fallback = len(rest)
            if fallback:
                found = self._tree.query_ball_point(aug[rest], np.sqrt(thr[rest]),
                                                    workers=workers, return_sorted=False)
                sizes = np.fromiter((len(f) for f in found), dtype=np.int64, count=fallback)
                p_all = np.repeat(rest, sizes)
                e_all = np.fromiter((e for f in found for e in f), dtype=np.int64,
                                    count=int(sizes.sum()))
                pix.append(p_all)
                ent.append(e_all)
                dist.append(self._exact(qt, p_all, e_all))
        pix_t = torch.as_tensor(np.concatenate(pix), device=dev)
        ent_t = torch.as_tensor(np.concatenate(ent), device=dev)
        dist_t = torch.as_tensor(np.concatenate(dist), device=dev)
        best, idx = _best_of_pairs(n, pix_t, ent_t, dist_t)
        stats = {"pixels": n, "candidates": len(pix_t), "fallback": fallback}
        return idx.cpu().numpy(), best.cpu().numpy(), stats
