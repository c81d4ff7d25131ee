"""Exact nearest-profile search under a weighted χ², pruned by a projection bound.

For weights ``w`` the distance of an observed profile ``o`` to a database profile
``d`` is ``Σ_λ w_λ (o_λ - d_λ)²``. With ``s = √w`` both live in the scaled space
``o' = s o``, ``d' = s d``, where the distance is Euclidean. Let ``V`` be an
orthonormal basis of the leading principal directions of the (centred) database
and write ``o' - m = V a + r_o``, ``d' - m = V b + r_d`` with ``r ⟂ V``. Then,
exactly,

    ‖o' - d'‖² = ‖a - b‖² + ‖r_o - r_d‖² ≥ ‖a - b‖² + (‖r_o‖ - ‖r_d‖)²  = LB,

so the lower bound ``LB`` is the squared Euclidean distance between the
augmented vectors ``ã = [a, ‖r_o‖]`` and ``b̃ = [b, ‖r_d‖]`` (``k + 1``
dimensions instead of ``n_λ``).

The entries are grouped by k-means in that augmented space (about √N groups,
centre ``c_g``, radius ``R_g``). By the triangle inequality every member of
group ``g`` has ``√LB ≥ ‖ã − c_g‖ − R_g``. Pixels are processed by their
nearest group: the best-``LB`` member of that group, evaluated exactly, gives
an upper bound ``U`` on the pixel's best distance; groups whose bound exceeds
``U`` are skipped whole; in the remaining groups only entries with ``LB ≤ U``
are evaluated exactly in float64. The result is the entry a brute-force search
finds (ties resolved to the smallest index, as ``argmin``).

Floating point: ``LB`` is one float32 matrix product of ``[ã, ‖ã‖², 1]`` and
``[−2 b̃, 1, ‖b̃‖²]``; its rounding error is below
``2 (k + 3) ε₃₂ (‖ã‖² + ‖b̃‖²)`` (ε₃₂ = 2⁻²³, the standard bound for a dot
product of length k + 3); candidates are kept up to four times that slack, and
the group bounds are computed in float64 with the same slack, so no true winner
is pruned by rounding.

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

_EPS32 = float(np.finfo(np.float32).eps)


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
        best = torch.full((len(qq),), float("inf"), dtype=torch.float64).scatter_reduce(
            0, pix, exact, reduce="amin")
        win = exact == best[pix]
        idx = torch.full((len(qq),), d.shape[0], dtype=torch.int64).scatter_reduce(
            0, pix[win], ent[win], reduce="amin")
        index[start:start + step] = idx.numpy()
        dist[start:start + step] = best.numpy()
    return index, dist


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
        the residual (between 4 and 48).
    n_groups
        Entry groups of the coarse bound (default ≈ √n_entries, at most 256).
    block_size
        Pixels per dense block (memory ≈ block_size × entries × 5 bytes at worst).
    device
        torch device of the bound computation.
    random_state
        Seed of the grouping (the result does not depend on it).

    Attributes
    ----------
    n_components_, n_groups_ : int
    stats_ : dict
        ``candidates`` (exactly evaluated pairs), ``bound_pairs`` (pairs whose
        ``LB`` was computed) and ``pixels`` of the queries so far.

    Example
    -------
    >>> search = NearestProfileSearch(np.eye(4), np.ones(4))
    >>> search.query(np.array([[0.9, 0.0, 0.1, 0.0]]))[0]
    array([0])
    """

    def __init__(self, database: np.ndarray, weights: np.ndarray, *,
                 n_components: int | None = None, n_groups: int | None = None,
                 block_size: int = 4096, device: str | torch.device = "cpu",
                 random_state: int = 0) -> None:
        db = np.asarray(database, dtype=np.float64)
        w = np.asarray(weights, dtype=np.float64)
        if db.ndim != 2 or w.shape != (db.shape[1],):
            raise ValueError(f"database {db.shape} and weights {w.shape} do not match")
        if not np.isfinite(db).all():
            raise ValueError("database profiles must be finite")
        if (w < 0).any() or not np.isfinite(w).all() or not (w > 0).any():
            raise ValueError("weights must be finite, non-negative and not all zero")
        self.device = torch.device(device)
        self.block_size = int(block_size)
        keep = w > 0
        self._keep = keep
        self._scale = np.sqrt(w[keep])
        scaled = db[:, keep] * self._scale
        self._mean = scaled.mean(0)
        centred = scaled - self._mean
        # principal directions from the (n_λ × n_λ) scatter matrix: orthonormal in float64
        evals, evecs = np.linalg.eigh(centred.T @ centred)
        evals, evecs = np.clip(evals[::-1], 0.0, None), evecs[:, ::-1]
        if n_components is None:
            left = 1.0 - np.cumsum(evals) / max(evals.sum(), 1e-300)
            n_components = int(np.searchsorted(-left, -1e-5) + 1)
            n_components = int(min(max(n_components, 4), 48))
        self.n_components_ = int(min(n_components, evecs.shape[1]))
        self._basis = np.ascontiguousarray(evecs[:, : self.n_components_])
        aug = self._augment(centred)
        n = len(db)
        if n_groups is None:
            n_groups = int(min(256, max(1, round(np.sqrt(n)))))
        n_groups = int(max(1, min(n_groups, n)))
        if n_groups > 1:
            from sklearn.cluster import KMeans

            labels = KMeans(n_clusters=n_groups, n_init=1, max_iter=20,
                            random_state=random_state).fit(aug).labels_
        else:
            labels = np.zeros(n, dtype=np.int64)
        present = np.unique(labels)
        self.n_groups_ = len(present)
        self._members = [np.flatnonzero(labels == g) for g in present]
        self._centres = np.stack([aug[m].mean(0) for m in self._members])
        self._radius = np.array([np.sqrt(((aug[m] - c) ** 2).sum(1)).max()
                                 for m, c in zip(self._members, self._centres, strict=True)])
        self._group_of = np.empty(n, dtype=np.int64)
        for g, m in enumerate(self._members):
            self._group_of[m] = g
        nb = (aug**2).sum(1)
        self._db_norm_max = float(nb.max())
        ext = np.concatenate([-2.0 * aug, np.ones((n, 1)), nb[:, None]], axis=1)
        self._db_ext = torch.as_tensor(ext, dtype=torch.float32, device=self.device)
        self._db64 = torch.as_tensor(scaled, device=self.device)
        self._db_max_norm = float((scaled**2).sum(1).max())
        self.stats_: dict[str, int] = {"candidates": 0, "bound_pairs": 0, "pixels": 0}

    def _augment(self, centred: np.ndarray) -> np.ndarray:
        coef = centred @ self._basis
        # ‖r‖² = ‖x‖² − ‖a‖² (float64; its rounding, ~1e-16 ‖x‖², is far inside the slack)
        r2 = np.einsum("ij,ij->i", centred, centred) - np.einsum("ij,ij->i", coef, coef)
        return np.concatenate([coef, np.sqrt(np.clip(r2, 0.0, None))[:, None]], axis=1)

    def query(self, profiles: np.ndarray, *, chunk_size: int = 65536
              ) -> tuple[np.ndarray, np.ndarray]:
        """Best database index and weighted distance ``Σ w (o - d)²`` for each profile.

        Parameters
        ----------
        profiles
            (n, n_λ) finite observed profiles on the database grid.
        chunk_size
            Pixels prepared at a time (float64 copies of that many profiles).

        Returns
        -------
        index, distance
            (n,) int64 and (n,) float64.
        """
        q = np.asarray(profiles)
        if q.ndim != 2 or q.shape[1] != self._keep.size:
            raise ValueError(f"profiles must be (n, {self._keep.size}), got {q.shape}")
        index = np.empty(len(q), dtype=np.int64)
        dist = np.empty(len(q), dtype=np.float64)
        for start in range(0, len(q), chunk_size):
            sl = slice(start, start + chunk_size)
            index[sl], dist[sl] = self._query_chunk(np.asarray(q[sl], dtype=np.float64))
        return index, dist

    def _bound(self, a_ext: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
        b = self._db_ext if cols is None else self._db_ext[cols]
        return a_ext @ b.T

    def _query_chunk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dev = self.device
        scaled = q[:, self._keep] * self._scale
        aug = self._augment(scaled - self._mean)
        na = (aug**2).sum(1)
        n = len(q)
        a_ext = torch.as_tensor(np.concatenate([aug, na[:, None], np.ones((n, 1))], axis=1),
                                dtype=torch.float32, device=dev)
        q64 = torch.as_tensor(scaled, device=dev)
        slack = 8.0 * (self.n_components_ + 3) * _EPS32 * (na + self._db_norm_max)
        # distance of every pixel to every group centre (float64, small)
        cen = self._centres
        d2 = na[:, None] + (cen**2).sum(1)[None] - 2.0 * aug @ cen.T
        dist_c = np.sqrt(np.clip(d2, 0.0, None))
        nearest = np.argmin(dist_c, axis=1)
        # pixels sorted by nearest group once, so every block is a contiguous slice
        order = np.argsort(nearest, kind="stable")
        order_t = torch.as_tensor(order, device=dev)
        a_ext, q64 = a_ext[order_t], q64[order_t]
        dist_c, slack = dist_c[order], slack[order]
        bounds = np.searchsorted(nearest[order], np.arange(self.n_groups_ + 1))
        best_d = torch.full((n,), float("inf"), dtype=torch.float64, device=dev)
        best_i = torch.full((n,), -1, dtype=torch.int64, device=dev)
        for g in range(self.n_groups_):
            for s in range(bounds[g], bounds[g + 1], self.block_size):
                pix = slice(s, min(s + self.block_size, bounds[g + 1]))
                self._solve_block(pix, g, a_ext, q64, dist_c, slack, best_d, best_i)
        self.stats_["pixels"] += n
        index = np.empty(n, dtype=np.int64)
        dist = np.empty(n, dtype=np.float64)
        index[order] = best_i.cpu().numpy()
        dist[order] = best_d.cpu().numpy()
        return index, dist

    def _solve_block(self, pix: slice, g: int, a_ext: torch.Tensor, q64: torch.Tensor,
                     dist_c: np.ndarray, slack: np.ndarray, best_d: torch.Tensor,
                     best_i: torch.Tensor) -> None:
        dev = self.device
        a = a_ext[pix]
        qp = q64[pix]
        m = len(qp)
        # upper bound: exact distance of the best-LB member of the pixel's nearest group
        own = torch.as_tensor(self._members[g], device=dev)
        first = own[torch.argmin(self._bound(a, own), dim=1)]
        upper = ((qp - self._db64[first]) ** 2).sum(1)
        # groups that may hold a better entry
        sl = slack[pix]
        up = upper.cpu().numpy()
        gap = np.clip(dist_c[pix] - self._radius[None], 0.0, None) ** 2
        alive = gap <= (up + sl)[:, None]
        groups = np.flatnonzero(alive.any(0))
        cols = torch.as_tensor(np.concatenate([self._members[h] for h in groups]), device=dev)
        lb = self._bound(a, cols)
        thr = torch.as_tensor((up + sl).astype(np.float32), device=dev)
        p_loc, c_loc = torch.nonzero(lb <= thr[:, None], as_tuple=True)
        del lb
        ent = cols[c_loc]
        self.stats_["bound_pairs"] += m * (len(cols) + len(own))
        self.stats_["candidates"] += int(p_loc.numel())
        # candidates (the pixel's `first` is always one: LB ≤ exact distance = U)
        # in one dense float64 product against their union, then the near-ties
        # (1e-9 relative, far above float64 rounding) by explicit differences
        uniq, inv = torch.unique(ent, return_inverse=True)
        dbu = self._db64[uniq]
        qn = (qp**2).sum(1)
        full = qn[:, None] + (dbu**2).sum(1)[None] - 2.0 * qp @ dbu.T
        cand = torch.full_like(full, float("inf"))
        cand[p_loc, inv] = full[p_loc, inv]
        lowest = cand.amin(1)
        near = cand <= (lowest + 1e-9 * (qn + self._db_max_norm))[:, None]
        p_n, u_n = torch.nonzero(near, as_tuple=True)
        e_n = uniq[u_n]
        exact = ((qp[p_n] - self._db64[e_n]) ** 2).sum(1)
        best = torch.full((m,), float("inf"), dtype=torch.float64, device=dev).scatter_reduce(
            0, p_n, exact, reduce="amin")
        win = exact == best[p_n]
        big = torch.iinfo(torch.int64).max
        idx = torch.full((m,), big, dtype=torch.int64, device=dev).scatter_reduce(
            0, p_n[win], e_n[win], reduce="amin")
        best_d[pix] = best
        best_i[pix] = idx
