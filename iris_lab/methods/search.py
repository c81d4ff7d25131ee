"""Exact nearest-profile search under a weighted χ², pruned by a projection bound.

For weights ``w`` the distance of an observed profile ``o`` to a database profile
``d`` is ``Σ_λ w_λ (o_λ - d_λ)²``. With ``s = √w`` both live in the scaled space
``o' = s o``, ``d' = s d``, where the distance is Euclidean. Let ``V`` be an
orthonormal basis of the leading principal directions of the (centred) database
and write ``o' - m = V a + r_o``, ``d' - m = V b + r_d`` with ``r ⟂ V``. Then,
exactly,

    ‖o' - d'‖² = ‖a - b‖² + ‖r_o - r_d‖² ≥ ‖a - b‖² + (‖r_o‖ - ‖r_d‖)²  = LB,

so the lower bound ``LB`` is the Euclidean distance between the augmented
vectors ``[a, ‖r_o‖]`` and ``[b, ‖r_d‖]`` — one small matrix product
(``k + 1`` instead of ``n_λ`` inner dimensions) for all pixel–entry pairs. Each
pixel's entry of smallest ``LB`` gives an upper bound ``U`` on the best distance
(evaluated exactly); only entries with ``LB ≤ U`` can win and only those are
evaluated exactly in float64. The result is the same entry a brute-force search
finds (ties resolved to the smallest index, as ``argmin``).

Floating point: ``LB`` is computed in float32; its rounding error is bounded by
``(k + 3) ε₃₂ (‖ã‖² + ‖b̃‖²)`` (ε₃₂ = 2⁻²³; standard bound for a dot product of
length k + 3 plus the two norms), and candidates are kept up to four times that
slack, so no true winner is pruned by rounding.

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
        the residual (capped at 48).
    chunk_size
        Pixels per block; memory ~ ``chunk_size × n_entries × 5`` bytes.
    device
        torch device of the bound computation.

    Attributes
    ----------
    n_components_ : int
    stats_ : dict
        ``candidates`` (exactly evaluated pairs) and ``pixels`` of the last
        queries, to judge the pruning.

    Example
    -------
    >>> search = NearestProfileSearch(np.eye(4), np.ones(4))
    >>> search.query(np.array([[0.9, 0.0, 0.1, 0.0]]))[0]
    array([0])
    """

    def __init__(self, database: np.ndarray, weights: np.ndarray, *,
                 n_components: int | None = None, chunk_size: int = 2048,
                 device: str | torch.device = "cpu") -> None:
        db = np.asarray(database, dtype=np.float64)
        w = np.asarray(weights, dtype=np.float64)
        if db.ndim != 2 or w.shape != (db.shape[1],):
            raise ValueError(f"database {db.shape} and weights {w.shape} do not match")
        if not np.isfinite(db).all():
            raise ValueError("database profiles must be finite")
        if (w < 0).any() or not np.isfinite(w).all() or not (w > 0).any():
            raise ValueError("weights must be finite, non-negative and not all zero")
        self.device = torch.device(device)
        self.chunk_size = int(chunk_size)
        keep = w > 0
        self._keep = keep
        self._scale = np.sqrt(w[keep])
        scaled = db[:, keep] * self._scale
        self._mean = scaled.mean(0)
        centred = scaled - self._mean
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        if n_components is None:
            energy = sv**2
            left = 1.0 - np.cumsum(energy) / max(energy.sum(), 1e-300)
            n_components = int(np.searchsorted(-left, -1e-5) + 1)
            n_components = int(min(max(n_components, 4), 48, vt.shape[0]))
        self.n_components_ = int(min(n_components, vt.shape[0]))
        self._basis = np.ascontiguousarray(vt[: self.n_components_].T)  # (n_λ', k)
        b, rd = self._project(centred)
        self._db64 = torch.as_tensor(scaled, device=self.device)
        aug = np.concatenate([b, rd[:, None]], axis=1)
        self._db_aug = torch.as_tensor(aug, dtype=torch.float32, device=self.device)
        nb = (aug**2).sum(1)
        self._db_norm = torch.as_tensor(nb, dtype=torch.float32, device=self.device)
        self._db_norm_max = float(nb.max())
        self.stats_: dict[str, int] = {"candidates": 0, "pixels": 0}

    def _project(self, centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        coef = centred @ self._basis
        resid = centred - coef @ self._basis.T
        return coef, np.sqrt((resid**2).sum(1))

    def query(self, profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best database index and weighted distance ``Σ w (o - d)²`` for each profile.

        Parameters
        ----------
        profiles
            (n, n_λ) finite observed profiles on the database grid.

        Returns
        -------
        index, distance
            (n,) int64 and (n,) float64.
        """
        q = np.asarray(profiles, dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != self._keep.size:
            raise ValueError(f"profiles must be (n, {self._keep.size}), got {q.shape}")
        index = np.empty(len(q), dtype=np.int64)
        dist = np.empty(len(q), dtype=np.float64)
        for start in range(0, len(q), self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            index[sl], dist[sl] = self._query_chunk(q[sl])
        return index, dist

    def _query_chunk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dev = self.device
        scaled = q[:, self._keep] * self._scale
        a, ro = self._project(scaled - self._mean)
        aug = np.concatenate([a, ro[:, None]], axis=1)
        na = (aug**2).sum(1)
        a32 = torch.as_tensor(aug, dtype=torch.float32, device=dev)
        na32 = torch.as_tensor(na, dtype=torch.float32, device=dev)
        # LB = |ã|² + |b̃|² − 2 ã·b̃ : one GEMM with the entry norms as the bias
        lb = torch.addmm(self._db_norm[None, :], a32, self._db_aug.T, alpha=-2.0)
        lb.add_(na32[:, None])
        first = torch.argmin(lb, dim=1)
        q64 = torch.as_tensor(scaled, device=dev)
        upper = ((q64 - self._db64[first]) ** 2).sum(1)
        k3 = self.n_components_ + 3
        slack = 4.0 * k3 * _EPS32 * (torch.as_tensor(na, device=dev) + self._db_norm_max)
        threshold = (upper + slack).to(torch.float32)
        lb.sub_(threshold[:, None])
        pix, ent = torch.nonzero(lb <= 0, as_tuple=True)
        del lb
        best = upper.clone()
        best_idx = first.clone()
        n_cand = int(pix.numel())
        self.stats_["candidates"] += n_cand
        self.stats_["pixels"] += len(q)
        step = max(1, 4_000_000 // max(1, scaled.shape[1]))
        dists = []
        for s in range(0, n_cand, step):
            p, e = pix[s:s + step], ent[s:s + step]
            dists.append(((q64[p] - self._db64[e]) ** 2).sum(1))
        if n_cand:
            d_all = torch.cat(dists)
            best = torch.full_like(upper, float("inf")).scatter_reduce(
                0, pix, d_all, reduce="amin")
            best = torch.minimum(best, upper)
            winner = d_all == best[pix]
            cand = torch.full_like(first, torch.iinfo(torch.int64).max).scatter_reduce(
                0, pix[winner], ent[winner], reduce="amin")
            from_first = upper == best
            cand = torch.where(from_first, torch.minimum(cand, first), cand)
            best_idx = cand
        return best_idx.cpu().numpy(), best.cpu().numpy()
