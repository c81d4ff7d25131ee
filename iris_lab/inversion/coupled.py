"""Coupled inversions: per-pixel (local) parameters plus shared (global) ones.

The model of pixel ``p`` depends on its own local parameters ``x_p`` (``n``
values: node values of T, v_los, B, ...) and on ``k`` global parameters ``g``
shared by all pixels (atomic data: log(gf) offsets and wavelength shifts
Δλ of the lines). One Levenberg–Marquardt problem fits all of them at once.
Its Gauss–Newton normal matrix has the arrow-head block structure

.. math::

    \\begin{pmatrix} A_1 & & & B_1\\\\ & \\ddots & & \\vdots\\\\ & & A_P & B_P\\\\
    B_1^T & \\cdots & B_P^T & C \\end{pmatrix}
    \\begin{pmatrix} \\delta x_1\\\\ \\vdots\\\\ \\delta x_P\\\\ \\delta g \\end{pmatrix}
    = \\begin{pmatrix} a_1\\\\ \\vdots\\\\ a_P\\\\ c \\end{pmatrix},

``A_p = J_pᵀJ_p`` (n×n), ``B_p = J_pᵀK_p`` (n×k), ``C = Σ_p K_pᵀK_p``
(k×k), with ``J_p = ∂r_p/∂x_p`` and ``K_p = ∂r_p/∂g`` of the weighted
residual. It is solved by eliminating the local blocks (batched Cholesky of
every ``A_p``) and solving the Schur complement
``S = C − Σ_p B_pᵀ A_p⁻¹ B_p`` for ``δg``; then
``δx_p = A_p⁻¹ (a_p − B_p δg)``. Time and memory per iteration are linear in
the number of pixels (the dense system would cost ``(P n + k)³``).
Jacobians are formed in chunks of pixels and reduced to blocks at once, so
memory stays ``O(P n (n + k))``.

One Marquardt parameter damps the whole problem (Marquardt scaling by the
column norms, as in :mod:`iris_lab.inversion.lm`); a step is accepted when the
total χ² decreases. When the fit stalls (λ runs away or the relative χ²
gain over ``stall_iterations`` accepted steps falls below ``stall_ftol``)
while χ²_ν is above ``chi2_target``, the local parameters of the worse half
of the pixels are randomly perturbed and the iteration continues (van Noort
2012, A&A 548, A5); the best state ever reached is returned. Before that,
pixels stuck in a poor local minimum of their own (χ²_ν far above the
median) are reseeded: refitted alone with the global parameters held, from
the other pixels' solutions, keeping the refit only where it fits better;
such a pixel would otherwise both stay stuck under the shared Marquardt
parameter and pull the global parameters toward itself.

:class:`AtomicInversion` wraps the globin modes (Vukadinović et al. 2024):
1 atmosphere only (atomic data fixed), 2 atomic data free per pixel, 3
atomic data global (coupled), and ``"averaged"``: atomic data fitted to the
spatially averaged spectrum with one mean atmosphere.

Example
-------
>>> import torch
>>> from iris_lab.inversion.coupled import CoupledLevenbergMarquardt
>>> t = torch.linspace(-1, 1, 30, dtype=torch.float64)
>>> def forward(x, g):  # per-pixel amplitude x, shared width g
...     return x[:, :1] * torch.exp(-(t / g[:, :1]) ** 2)
>>> x_true = torch.linspace(0.5, 1.5, 8, dtype=torch.float64)[:, None]
>>> g_true = torch.tensor([0.4], dtype=torch.float64)
>>> obs = forward(x_true, g_true.expand(8, 1))
>>> fit = CoupledLevenbergMarquardt(max_iter=50).fit(
...     forward, obs, torch.ones(8, 1, dtype=torch.float64),
...     torch.tensor([0.3], dtype=torch.float64))
>>> round(float(fit.global_[0]), 6)
0.4
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from iris_lab.inversion.lm import (
    FLAG_AT_BOUND,
    FLAG_DIVERGED,
    FLAG_MASKS,
    FLAG_MAX_ITER,
    FLAG_MEANINGS,
    FLAG_NAN,
    Cycle,
    LevenbergMarquardt,
    _as_2d,
    _weighted_data,
    batched_finite_jacobian,
    blocked_at_bounds,
)
from iris_lab.inversion.lm import jacobian as lm_jacobian

CoupledForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- linear algebra
@dataclasses.dataclass
class NormalBlocks:
    """Blocks of the Gauss–Newton normal equations of a coupled problem.

    Attributes
    ----------
    A, B, a
        ``(P, n, n)``, ``(P, n, k)``, ``(P, n)``: local blocks and right-hand side.
    C, c
        ``(k, k)``, ``(k,)``: global block and right-hand side.
    chi2
        ``(P,)`` χ² per pixel at the linearisation point.
    """

    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    a: torch.Tensor
    c: torch.Tensor
    chi2: torch.Tensor

    @classmethod
    def from_jacobians(cls, jl: torch.Tensor, jg: torch.Tensor, res: torch.Tensor
                       ) -> NormalBlocks:
        """Blocks from weighted Jacobians ``jl (P, m, n)``, ``jg (P, m, k)``
        and weighted residual ``res (P, m)`` (right-hand side ``−Jᵀr``)."""
        jlt = jl.transpose(-1, -2)
        return cls(A=jlt @ jl, B=jlt @ jg, C=torch.einsum("pmi,pmj->ij", jg, jg),
                   a=-(jlt @ res[..., None])[..., 0], c=-torch.einsum("pmj,pm->j", jg, res),
                   chi2=torch.sum(res ** 2, -1))

    def __add__(self, other: NormalBlocks) -> NormalBlocks:  # concatenate pixel chunks
        return NormalBlocks(A=torch.cat([self.A, other.A]), B=torch.cat([self.B, other.B]),
                            C=self.C + other.C, a=torch.cat([self.a, other.a]),
                            c=self.c + other.c, chi2=torch.cat([self.chi2, other.chi2]))

    def column_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Column norms of the weighted Jacobians: ``(P, n)`` and ``(k,)``."""
        return (torch.sqrt(torch.diagonal(self.A, dim1=-2, dim2=-1)),
                torch.sqrt(torch.diagonal(self.C)))

    def damped(self, lam: float, floor: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[NormalBlocks, torch.Tensor, torch.Tensor]:
        """Marquardt-scaled blocks with ``λ`` added to the unit diagonal.

        ``floor``: lower limits ``(P, n)``, ``(k,)`` of the column scales
        (Moré 1978: the largest column norms met so far in the fit), so that a
        parameter whose column has nearly vanished does not get a huge step
        at every λ.

        Returns the scaled blocks and the column scales ``d_local (P, n)``,
        ``d_global (k,)``; the unscaled step is ``δ = δ_scaled / d``.
        """
        dl, dg = self.column_scales()
        if floor is not None:
            dl, dg = torch.maximum(dl, floor[0]), torch.maximum(dg, floor[1])
        dl = torch.where(dl > 0, dl, torch.ones_like(dl))
        dg = torch.where(dg > 0, dg, torch.ones_like(dg))
        n, k = self.A.shape[-1], self.C.shape[-1]
        eye_n = torch.eye(n, dtype=self.A.dtype, device=self.A.device)
        eye_k = torch.eye(k, dtype=self.A.dtype, device=self.A.device)
        a_s = self.A / (dl[:, :, None] * dl[:, None, :]) + lam * eye_n
        b_s = self.B / (dl[:, :, None] * dg[None, None, :])
        c_s = self.C / (dg[:, None] * dg[None, :]) + lam * eye_k
        return (NormalBlocks(A=a_s, B=b_s, C=c_s, a=self.a / dl, c=self.c / dg, chi2=self.chi2),
                dl, dg)

    def held(self, local: torch.Tensor, glob: torch.Tensor) -> NormalBlocks:
        """The same system with some parameters held (zero step): their rows
        and columns are removed and replaced by a unit diagonal.

        Parameters
        ----------
        local, glob
            ``(P, n)`` and ``(k,)`` bool masks of the held parameters.
        """
        fl = (~local).to(self.A.dtype)
        fg = (~glob).to(self.C.dtype)
        a_h = self.A * fl[:, :, None] * fl[:, None, :] + torch.diag_embed(local.to(self.A.dtype))
        c_h = self.C * fg[:, None] * fg[None, :] + torch.diag(glob.to(self.C.dtype))
        return NormalBlocks(A=a_h, B=self.B * fl[:, :, None] * fg[None, None, :], C=c_h,
                            a=self.a * fl, c=self.c * fg, chi2=self.chi2)


def _cholesky(a: torch.Tensor) -> torch.Tensor:
    """Batched Cholesky with a growing diagonal jitter for the rare
    numerically semi-definite block."""
    chol, info = torch.linalg.cholesky_ex(a)
    jitter = 1e-12
    while bool((info != 0).any()) and jitter < 1e2:
        bad = info != 0
        scale = torch.diagonal(a[bad], dim1=-2, dim2=-1).abs().amax(-1).clamp(min=1.0)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        chol_b, info_b = torch.linalg.cholesky_ex(a[bad] + jitter * scale[:, None, None] * eye)
        chol[bad] = chol_b
        info = info.clone()
        info[bad] = info_b
        jitter *= 100
    return chol


def schur_solve(blocks: NormalBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the arrow-head system by the Schur complement on the global block.

    Cost ``O(P (n³ + n² k + n k²) + k³)``: linear in the number of pixels.

    Returns
    -------
    dx, dg
        Local steps ``(P, n)`` and global step ``(k,)``.

    Example
    -------
    >>> import torch
    >>> eye = torch.eye(2, dtype=torch.float64)
    >>> blocks = NormalBlocks(A=eye[None].repeat(3, 1, 1), B=torch.zeros(3, 2, 1).double(),
    ...                       C=eye[:1, :1], a=torch.ones(3, 2).double(),
    ...                       c=torch.ones(1).double(), chi2=torch.zeros(3).double())
    >>> dx, dg = schur_solve(blocks)
    >>> dx.tolist()[0], dg.tolist()
    ([1.0, 1.0], [1.0])
    """
    chol = _cholesky(blocks.A)
    k = blocks.C.shape[-1]
    if k == 0:
        return torch.cholesky_solve(blocks.a[..., None], chol)[..., 0], blocks.c.new_zeros(0)
    rhs = torch.cat([blocks.B, blocks.a[..., None]], dim=-1)       # (P, n, k+1)
    sol = torch.cholesky_solve(rhs, chol)                           # A⁻¹[B a]
    ainv_b, ainv_a = sol[..., :k], sol[..., k]
    schur = blocks.C - torch.einsum("pni,pnj->ij", blocks.B, ainv_b)
    g_rhs = blocks.c - torch.einsum("pni,pn->i", blocks.B, ainv_a)
    schur = 0.5 * (schur + schur.T)
    dg = torch.linalg.solve(schur, g_rhs)
    dx = ainv_a - (ainv_b @ dg)
    return dx, dg


def dense_matrix(blocks: NormalBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """The full ``(P n + k)`` normal matrix and right-hand side (for checks and
    for timing the dense alternative; memory ``O(P² n²)``)."""
    n_pix, n, _ = blocks.A.shape
    k = blocks.C.shape[-1]
    size = n_pix * n + k
    mat = blocks.A.new_zeros((size, size))
    mat[: n_pix * n, : n_pix * n] = torch.block_diag(*blocks.A) if n_pix else mat[:0, :0]
    bb = blocks.B.reshape(n_pix * n, k)
    mat[: n_pix * n, n_pix * n:] = bb
    mat[n_pix * n:, : n_pix * n] = bb.T
    mat[n_pix * n:, n_pix * n:] = blocks.C
    rhs = torch.cat([blocks.a.reshape(-1), blocks.c])
    return mat, rhs


def dense_solve(blocks: NormalBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the same system densely (``O((P n + k)³)``); reference for
    :func:`schur_solve`."""
    n_pix, n, _ = blocks.A.shape
    mat, rhs = dense_matrix(blocks)
    sol = torch.linalg.solve(mat, rhs)
    return sol[: n_pix * n].reshape(n_pix, n), sol[n_pix * n:]


def coupled_covariance(blocks: NormalBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal of the inverse (undamped) normal matrix, without forming it.

    Returns
    -------
    var_local, cov_global
        ``(P, n)`` diagonal of the local blocks of ``H⁻¹`` and the ``(k, k)``
        global block ``S⁻¹``.
    """
    chol = _cholesky(blocks.A)
    eye = torch.eye(blocks.A.shape[-1], dtype=blocks.A.dtype, device=blocks.A.device)
    ainv = torch.cholesky_solve(eye.expand_as(blocks.A), chol)
    k = blocks.C.shape[-1]
    if k == 0:
        return torch.diagonal(ainv, dim1=-2, dim2=-1), blocks.C.new_zeros((0, 0))
    ainv_b = ainv @ blocks.B
    schur = blocks.C - torch.einsum("pni,pnj->ij", blocks.B, ainv_b)
    s_inv = torch.linalg.pinv(0.5 * (schur + schur.T), hermitian=True)
    extra = torch.einsum("pni,ij,pnj->pn", ainv_b, s_inv, ainv_b)
    return torch.diagonal(ainv, dim1=-2, dim2=-1) + extra, s_inv


# ----------------------------------------------------------------------------- estimator
class CoupledLevenbergMarquardt:
    """Levenberg–Marquardt with per-pixel and global parameters (Schur solve).

    Parameters
    ----------
    max_iter
        Maximum number of iterations.
    lam0, lam_up, lam_down, lam_max
        The single Marquardt parameter: start, factors, runaway limit.
    ftol
        Relative total-χ² decrease under which an accepted step converges.
    n_perturbations, perturbation_scale
        Number of perturbation restarts after stalls and the standard
        deviation of the local perturbation, as a fraction of the parameter's
        typical size (mean ``|x| + 1`` over the pixels at the start), capped
        by its bound width.
    global_perturbation_scale
        Same for the global parameters (default 0: kept).
    stall_iterations, stall_ftol
        A stall: relative χ² gain over the last ``stall_iterations`` accepted
        steps below ``stall_ftol``, or λ above ``lam_max``.
    chi2_target
        Do not perturb once χ²_ν is at or below this (e.g. 1.0 with real
        noise); ``None`` perturbs on every stall.
    local_warmup
        Per-pixel Levenberg–Marquardt iterations of the local parameters,
        global parameters held at ``global0``, before the coupled iterations:
        each pixel with its own Marquardt parameter reaches a good atmosphere
        for the starting atomic data much faster than under the one shared
        Marquardt parameter of the coupled problem (0: off).
    n_reseeds, reseed_every, reseed_factor, reseed_pool, reseed_candidates, reseed_iterations
        Pixel reseeding after stalls and every ``reseed_every`` iterations
        (at most ``n_reseeds`` times; tried before the perturbation
        restarts). A pixel whose χ²_ν exceeds
        ``reseed_factor`` × the median is stuck in a poor local minimum of
        its own, and with one Marquardt parameter and one acceptance test
        for the whole problem it both stays there and drags the global
        parameters. Each such pixel is refitted alone (global parameters
        held): its own starting values and the current solutions of the
        ``reseed_pool`` best-fitting pixels are screened by one forward call
        each, and the ``reseed_candidates`` best get ``reseed_iterations``
        per-pixel Levenberg–Marquardt iterations (all pixels and starts in
        one batch); a pixel takes the best refit only where it lowers its
        χ², so a reseed never raises the total χ².
    jacobian
        ``"jvp"`` (forward mode), ``"finite"`` (forward differences, one
        forward call per column) or ``"batched"`` (forward differences, all
        columns in one call: :func:`batched_finite_jacobian`).
    chunk_size
        Pixels per Jacobian chunk (memory bound).
    uncertainties
        Compute σ of local and global parameters from the inverse Hessian.
    seed, progress, device, dtype
        Perturbation seed, tqdm progress bar, where and how to compute.

    Example
    -------
    >>> CoupledLevenbergMarquardt(max_iter=10).max_iter
    10
    """

    def __init__(self, max_iter: int = 50, lam0: float = 1e-1, lam_up: float = 10.0,
                 lam_down: float = 10.0, lam_max: float = 1e8, ftol: float = 1e-7,
                 n_perturbations: int = 0, perturbation_scale: float = 0.05,
                 global_perturbation_scale: float = 0.0, stall_iterations: int = 3,
                 stall_ftol: float = 1e-3, chi2_target: float | None = None,
                 local_warmup: int = 0, n_reseeds: int = 0, reseed_every: int | None = 8,
                 reseed_factor: float = 3.0,
                 reseed_pool: int = 64, reseed_candidates: int = 4, reseed_iterations: int = 8,
                 jacobian: str = "jvp", chunk_size: int = 256, uncertainties: bool = True,
                 seed: int = 0, progress: bool = False, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float64) -> None:
        self.max_iter = max_iter
        self.lam0 = lam0
        self.lam_up = lam_up
        self.lam_down = lam_down
        self.lam_max = lam_max
        self.ftol = ftol
        self.n_perturbations = n_perturbations
        self.perturbation_scale = perturbation_scale
        self.global_perturbation_scale = global_perturbation_scale
        self.stall_iterations = stall_iterations
        self.stall_ftol = stall_ftol
        self.chi2_target = chi2_target
        self.local_warmup = local_warmup
        self.n_reseeds = n_reseeds
        self.reseed_every = reseed_every
        self.reseed_factor = reseed_factor
        self.reseed_pool = reseed_pool
        self.reseed_candidates = reseed_candidates
        self.reseed_iterations = reseed_iterations
        self.jacobian = jacobian
        self.chunk_size = chunk_size
        self.uncertainties = uncertainties
        self.seed = seed
        self.progress = progress
        self.device = device
        self.dtype = dtype

    # ------------------------------------------------------------------ helpers
    def _t(self, value: Any) -> torch.Tensor:
        return torch.as_tensor(value, dtype=self.dtype, device=self.device)

    def _bounds(self, lower: Any, upper: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.full((n,), -torch.inf, dtype=self.dtype, device=self.device)
        hi = torch.full((n,), torch.inf, dtype=self.dtype, device=self.device)
        if lower is not None:
            lo = torch.broadcast_to(self._t(np.array(lower, dtype=np.float64)), (n,)).clone()
        if upper is not None:
            hi = torch.broadcast_to(self._t(np.array(upper, dtype=np.float64)), (n,)).clone()
        if bool((lo > hi).any()):
            raise ValueError("lower bound above upper bound for some parameter")
        return lo, hi

    def linearise(self, forward: CoupledForward, x: torch.Tensor, g: torch.Tensor,
                  obs: torch.Tensor, sqrt_w: torch.Tensor
                  ) -> tuple[NormalBlocks, torch.Tensor]:
        """Model and normal-equation blocks at ``(x, g)``, pixel chunk by chunk.

        Returns
        -------
        blocks, model
            :class:`NormalBlocks` and the model ``(P, m)``.
        """
        n_pix, n = x.shape
        k = g.shape[-1]
        blocks = None
        models = []
        for start in range(0, n_pix, self.chunk_size):
            sl = slice(start, start + self.chunk_size)
            xc = x[sl]
            gc = g.expand(xc.shape[0], k).clone()
            model, jl, jg = self._jacobians(forward, xc, gc)
            sw = sqrt_w[sl]
            used = sw > 0   # zero-weight samples drop out even where the model is NaN
            res = torch.where(used, (model - obs[sl]) * sw, 0.0)
            jl = torch.where(used[..., None], jl * sw[..., None], 0.0)
            jg = torch.where(used[..., None], jg * sw[..., None], 0.0)
            part = NormalBlocks.from_jacobians(jl, jg, res)
            blocks = part if blocks is None else blocks + part
            models.append(model)
        return blocks, torch.cat(models)

    def _jacobians(self, forward: CoupledForward, x: torch.Tensor, g: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model and the local ``(p, m, n)`` and global ``(p, m, k)`` Jacobians:
        :func:`~iris_lab.inversion.lm.jacobian` of the stacked vector
        ``[local, global]`` (``"finite"`` passes one column per call,
        ``"batched"`` stacks all columns into calls of up to 4096 rows)."""
        n = x.shape[-1]
        if self.jacobian not in ("jvp", "finite", "batched"):
            raise ValueError(f"unknown Jacobian method {self.jacobian!r}: 'jvp', 'finite' "
                             "or 'batched'")

        def stacked(z: torch.Tensor) -> torch.Tensor:
            return forward(z[:, :n], z[:, n:])

        z = torch.cat([x, g], -1)
        if self.jacobian == "jvp":
            model, jac = lm_jacobian(stacked, z, "jvp")
        else:
            max_rows = x.shape[0] if self.jacobian == "finite" else 4096
            model, jac = batched_finite_jacobian(stacked, z, max_rows=max_rows,
                                                 scale=getattr(self, "_fd_scale", None))
        model, jac = model.detach(), jac.detach()
        return model, jac[..., :n], jac[..., n:]

    def _evaluate(self, forward: CoupledForward, x: torch.Tensor, g: torch.Tensor
                  ) -> torch.Tensor:
        """``forward`` pixel chunk by pixel chunk, one global vector for every
        row (differentiable)."""
        return torch.cat([forward(x[s:s + self.chunk_size],
                                  g.expand(x[s:s + self.chunk_size].shape[0], g.shape[-1]))
                          for s in range(0, x.shape[0], self.chunk_size)])

    def _model(self, forward: CoupledForward, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._evaluate(forward, x, g)

    @staticmethod
    def _row_chi2(model: torch.Tensor, obs: torch.Tensor, sqrt_w: torch.Tensor) -> torch.Tensor:
        """Weighted χ² of every row; zero-weight samples drop out (also where
        the model is not finite)."""
        return torch.sum(torch.where(sqrt_w > 0, (model - obs) * sqrt_w, 0.0) ** 2, -1)

    # ------------------------------------------------------------------ fit
    def fit(self, forward: CoupledForward, observed: Any, local0: Any, global0: Any, *,
            sigma: Any = 1.0, weights: Any = 1.0, local_lower: Any = None,
            local_upper: Any = None, global_lower: Any = None, global_upper: Any = None,
            local_names: Sequence[str] | None = None, global_names: Sequence[str] | None = None,
            checkpoint: str | Path | None = None, checkpoint_every: int = 5
            ) -> CoupledLevenbergMarquardt:
        """Fit local and global parameters together.

        Parameters
        ----------
        forward
            ``forward(local (p, n), glob (p, k)) -> (p, m)``; ``glob`` is the
            global vector repeated over the pixels of the chunk.
        observed
            Data ``(P, m)``; non-finite samples are masked.
        local0, global0
            Starting values ``(P, n)`` and ``(k,)``.
        sigma, weights
            Noise and weights broadcastable to ``(P, m)``.
        local_lower, local_upper, global_lower, global_upper
            Box bounds (projection).
        local_names, global_names
            Parameter names.
        checkpoint, checkpoint_every
            netCDF state written every ``checkpoint_every`` iterations and at
            the end; an existing file resumes the run.

        Raises
        ------
        ValueError
            For inconsistent shapes or invalid noise/weights.
        """
        obs = self._t(observed)
        if obs.ndim != 2:
            raise ValueError(f"observed must have shape (pixels, m), got {tuple(obs.shape)}")
        n_pix = obs.shape[0]
        x = self._t(local0)
        if x.ndim == 1:
            x = x.expand(n_pix, -1)
        x = x.clone()
        g = self._t(global0).reshape(-1).clone()
        if x.shape[0] != n_pix:
            raise ValueError(f"local0 must have shape ({n_pix}, n), got {tuple(x.shape)}")
        n, k = x.shape[1], g.shape[0]
        obs, sqrt_w = _weighted_data(obs, sigma, weights, self.dtype, self.device)
        lo, hi = self._bounds(local_lower, local_upper, n)
        glo, ghi = self._bounds(global_lower, global_upper, k)
        x = torch.minimum(torch.maximum(x, lo), hi)
        g = torch.minimum(torch.maximum(g, glo), ghi)
        self.local_names_ = list(local_names or [f"p{i}" for i in range(n)])
        self.global_names_ = list(global_names or [f"g{i}" for i in range(k)])
        if len(self.local_names_) != n or len(self.global_names_) != k:
            raise ValueError("number of parameter names does not match the parameters")
        n_data = (sqrt_w > 0).sum(-1)
        pixel_bad = n_data < n
        # pixels without usable data take no part in the fit
        sqrt_w[pixel_bad] = 0.0

        x_start = x.clone()
        state = {"iteration": 0, "lam": self.lam0, "perturbations": 0, "reseeds": 0}
        if checkpoint is not None and Path(checkpoint).exists():
            x, g, state = self._read_checkpoint(checkpoint, x, g)
        elif self.local_warmup > 0:
            x, _ = self._local_fit(forward, x, g, obs, sqrt_w, lo, hi, self.local_warmup)
        gen = torch.Generator(device="cpu").manual_seed(self.seed + state["perturbations"])
        # perturbation scales: the typical size of a parameter, capped by its
        # bound width (a wide box, T in 2800–1e5 K, would give kicks of ~5000 K)
        span_l = torch.minimum(hi - lo, x.abs().mean(0) + 1.0)
        span_g = torch.minimum(ghi - glo, g.abs() + 1.0)
        self._fd_scale = _bound_scale(lo, hi, glo, ghi)

        t0 = time.perf_counter()
        self.perturbation_chi2_: list[float] = []
        blocks, model = self.linearise(forward, x, g, obs, sqrt_w)
        chi2_pix = blocks.chi2
        chi2 = float(chi2_pix.sum())
        if not np.isfinite(chi2):  # pixels whose model is not finite at the start: flagged
            start_bad = ~torch.isfinite(chi2_pix)
            pixel_bad |= start_bad
            sqrt_w[start_bad] = 0.0
            blocks, model = self.linearise(forward, x, g, obs, sqrt_w)
            chi2_pix = blocks.chi2
            chi2 = float(chi2_pix.sum())
        best = (x.clone(), g.clone(), chi2, model.clone(), chi2_pix.clone())
        current_pix = chi2_pix
        self.reseeded_pixels_: list[int] = []
        last_reseed = state["iteration"]
        lam = state["lam"]
        history = [chi2]
        accepted_chi2 = [chi2]
        iter_times: list[float] = []
        n_accept = 0
        converged = False
        iterator = range(state["iteration"], self.max_iter)
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="coupled LM", leave=False)
        it = state["iteration"]
        # Moré's scaling: the largest column norms of every parameter so far
        scale_l, scale_g = blocks.column_scales()
        for it in iterator:
            t_it = time.perf_counter()
            now_l, now_g = blocks.column_scales()
            scale_l, scale_g = torch.maximum(scale_l, now_l), torch.maximum(scale_g, now_g)
            scaled, dl, dgs = blocks.damped(lam, (scale_l, scale_g))
            # hold the parameters on a bound that the descent direction leaves
            held_l = blocked_at_bounds(x, blocks.a, lo, hi)
            held_g = blocked_at_bounds(g, blocks.c, glo, ghi)
            if bool(held_l.any() or held_g.any()):
                scaled = scaled.held(held_l, held_g)
            dx_s, dg_s = schur_solve(scaled)
            x_try = torch.minimum(torch.maximum(x + dx_s / dl, lo), hi)
            g_try = torch.minimum(torch.maximum(g + dg_s / dgs, glo), ghi)
            m_try = self._model(forward, x_try, g_try)
            chi2_try_pix = self._row_chi2(m_try, obs, sqrt_w)
            chi2_try = float(chi2_try_pix.sum())
            stalled = False
            if np.isfinite(chi2_try) and chi2_try < chi2:
                rel = (chi2 - chi2_try) / max(chi2, 1e-300)
                x, g, chi2 = x_try, g_try, chi2_try
                current_pix = chi2_try_pix
                lam = max(lam / self.lam_down, 1e-12)
                n_accept += 1
                accepted_chi2.append(chi2)
                if chi2 < best[2]:
                    best = (x.clone(), g.clone(), chi2, m_try.clone(), chi2_try_pix.clone())
                if rel < self.ftol:
                    converged = True
                elif len(accepted_chi2) > self.stall_iterations:
                    old = accepted_chi2[-1 - self.stall_iterations]
                    stalled = (old - chi2) / max(old, 1e-300) < self.stall_ftol
                if not converged:
                    blocks, model = self.linearise(forward, x, g, obs, sqrt_w)
            else:
                lam *= self.lam_up
                stalled = lam > self.lam_max
            history.append(chi2)
            iter_times.append(time.perf_counter() - t_it)
            due = self.reseed_every is not None and it + 1 - last_reseed >= self.reseed_every
            if (converged or stalled or due) and state["reseeds"] < self.n_reseeds:
                state["reseeds"] += 1
                last_reseed = it + 1
                x_new, n_new = self._reseed(forward, x, g, current_pix, x_start, obs, sqrt_w,
                                            lo, hi)
                self.reseeded_pixels_.append(n_new)
                if n_new:
                    x = x_new
                    blocks, model = self.linearise(forward, x, g, obs, sqrt_w)
                    current_pix = blocks.chi2
                    chi2 = float(current_pix.sum())
                    if chi2 < best[2]:
                        best = (x.clone(), g.clone(), chi2, model.clone(), current_pix.clone())
                    accepted_chi2 = [chi2]
                    lam = self.lam0
                    converged = False
                    continue
            if converged or stalled:
                dof = max(float((sqrt_w > 0).sum()) - n_pix * n - k, 1.0)
                wants = self.chi2_target is None or chi2 / dof > self.chi2_target
                if state["perturbations"] < self.n_perturbations and wants:
                    best = self._merge(forward, x, g, best, obs, sqrt_w)
                    state["perturbations"] += 1
                    self.perturbation_chi2_.append(best[2])
                    x, g = self._perturb(best[0], best[1], best[4], span_l, span_g, lo, hi,
                                         glo, ghi, gen)
                    blocks, model = self.linearise(forward, x, g, obs, sqrt_w)
                    chi2 = float(blocks.chi2.sum())
                    if not np.isfinite(chi2):  # perturbed into a bad region: back to best
                        x, g = best[0].clone(), best[1].clone()
                        blocks, model = self.linearise(forward, x, g, obs, sqrt_w)
                        chi2 = float(blocks.chi2.sum())
                    current_pix = blocks.chi2
                    accepted_chi2 = [chi2]
                    lam = self.lam0
                    converged = False
                    continue
                if converged or lam > self.lam_max:
                    break
            if checkpoint is not None and (it + 1) % checkpoint_every == 0:
                self._write_checkpoint(checkpoint, best[0], best[1],
                                       {"iteration": it + 1, "lam": lam,
                                        "perturbations": state["perturbations"],
                                        "reseeds": state["reseeds"]})
        else:
            it = self.max_iter - 1
        if state["perturbations"]:
            best = self._merge(forward, x, g, best, obs, sqrt_w)
        x, g, chi2, model, chi2_pix = best
        self.n_iter_ = it + 1
        self.converged_ = bool(converged or lam > self.lam_max)
        self.history_ = history
        self.iteration_times_ = iter_times
        self.wall_time_ = time.perf_counter() - t0
        self.perturbations_ = state["perturbations"]
        self.local_, self.global_, self.model_ = x, g, model
        self.chi2_ = chi2_pix
        dof_pix = torch.clamp(n_data.to(self.dtype) - n - k / max(n_pix, 1), min=1.0)
        self.chi2_reduced_ = chi2_pix / dof_pix
        total_dof = max(float(n_data.sum()) - n_pix * n - k, 1.0)
        self.chi2_total_reduced_ = float(chi2_pix.sum()) / total_dof

        quality = torch.zeros(n_pix, dtype=torch.int64, device=self.device)
        quality[pixel_bad | ~torch.isfinite(chi2_pix)] |= FLAG_NAN
        if not self.converged_:
            quality |= FLAG_MAX_ITER
        tol = 1e-9 * torch.where(torch.isfinite(hi - lo), hi - lo, torch.ones_like(hi))
        at_bound = ((x - lo <= tol) | (hi - x <= tol)).any(-1)
        quality[at_bound] |= FLAG_AT_BOUND
        gtol = 1e-9 * torch.where(torch.isfinite(ghi - glo), ghi - glo, torch.ones_like(ghi))
        self.global_at_bound_ = (g - glo <= gtol) | (ghi - g <= gtol)
        self.quality_ = quality

        self.local_sigma_ = torch.full_like(x, torch.nan)
        self.global_sigma_ = torch.full_like(g, torch.nan)
        if self.uncertainties:
            blocks, _ = self.linearise(forward, x, g, obs, sqrt_w)
            var_l, cov_g = coupled_covariance(blocks)
            s2 = self.chi2_total_reduced_
            self.local_sigma_ = torch.sqrt(torch.clamp(var_l * s2, min=0.0))
            self.global_covariance_ = cov_g * s2
            self.global_sigma_ = torch.sqrt(torch.clamp(torch.diagonal(cov_g) * s2, min=0.0))
        if checkpoint is not None:
            self._write_checkpoint(checkpoint, x, g, {"iteration": self.n_iter_, "lam": lam,
                                                      "perturbations": state["perturbations"],
                                                      "reseeds": state["reseeds"],
                                                      "finished": 1})
        return self

    def _reseed(self, forward, x, g, chi2_pix, x_start, obs, sqrt_w, lo, hi
                ) -> tuple[torch.Tensor, int]:
        """Refit the outlier pixels alone from several starts (see the class
        docstring); returns the new local parameters and how many pixels
        changed."""
        n_used = (sqrt_w > 0).sum(-1)
        red = chi2_pix / n_used.clamp(min=1).to(self.dtype)
        finite = torch.isfinite(red) & (n_used > 0)
        if not bool(finite.any()):
            return x, 0
        median = torch.median(red[finite])
        stuck = (~torch.isfinite(red) | (red > self.reseed_factor * median)) & (n_used > 0)
        stuck_idx = torch.nonzero(stuck).reshape(-1)
        if stuck_idx.numel() == 0:
            return x, 0
        # the pool of starts: the pixel's own start and the solutions of the
        # best-fitting other pixels; each is screened by one forward call and
        # the ``reseed_candidates`` best per stuck pixel are refitted
        order = torch.argsort(torch.where(finite & ~stuck, red, torch.inf))
        donors = order[:self.reseed_pool]
        donors = donors[torch.isfinite(red[donors]) & ~stuck[donors]]
        n_s, n = stuck_idx.numel(), x.shape[1]
        pool = torch.cat([x_start[stuck_idx, None, :],
                          x[donors][None].expand(n_s, -1, -1)], 1)          # (s, c, n)
        n_pool = pool.shape[1]
        rows = stuck_idx.repeat_interleave(n_pool)
        screen = self._model(forward, pool.reshape(-1, n), g)
        screen_chi2 = torch.nan_to_num(self._row_chi2(screen, obs[rows], sqrt_w[rows]),
                                       nan=torch.inf).reshape(n_s, n_pool)
        n_c = min(self.reseed_candidates, n_pool)
        pick = torch.argsort(screen_chi2, -1)[:, :n_c]
        starts = pool.gather(1, pick[..., None].expand(-1, -1, n)).reshape(n_s * n_c, n)
        rows = stuck_idx.repeat_interleave(n_c)
        x_fit, chi2_fit = self._local_fit(forward, starts, g, obs[rows], sqrt_w[rows], lo, hi,
                                          self.reseed_iterations)
        refit = chi2_fit.reshape(n_s, n_c)
        best_c = torch.argmin(refit, -1)
        best_chi2 = refit.gather(1, best_c[:, None])[:, 0]
        better = best_chi2 < torch.nan_to_num(chi2_pix[stuck_idx], nan=torch.inf)
        x = x.clone()
        chosen = x_fit.reshape(n_s, n_c, n)[torch.arange(n_s), best_c]
        x[stuck_idx[better]] = chosen[better]
        return x, int(better.sum())

    def _local_fit(self, forward, x, g, obs, sqrt_w, lo, hi, max_iter: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel Levenberg–Marquardt of the local parameters with the
        global ones held (each row its own pixel, Marquardt parameter and
        acceptance); returns the parameters and their χ² (inf where not
        finite). Rows without usable data keep their parameters."""
        from iris_lab.inversion.lm import LevenbergMarquardt

        has_data = (sqrt_w > 0).any(-1)
        x_out = x.clone()
        chi2_out = torch.full((x.shape[0],), torch.inf, dtype=self.dtype, device=self.device)
        if not bool(has_data.any()):
            return x_out, chi2_out
        w = sqrt_w[has_data]
        data = torch.where(w > 0, obs[has_data], torch.nan)
        sigma = torch.where(w > 0, 1.0 / torch.where(w > 0, w, 1.0), 1.0)

        def single(z: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
            # one global vector for every row (also the stacked rows of the
            # finite-difference Jacobian); the rows are independent, so taking
            # ``index`` lets the solver evaluate only its active rows
            return self._evaluate(forward, z, g)

        if self.jacobian == "jvp":
            options: dict[str, Any] = {"jacobian": "jvp"}
        else:
            scale = _bound_scale(lo, hi).to(dtype=self.dtype, device=self.device)
            options = {"jacobian": lambda z, index=None: batched_finite_jacobian(
                single, z, scale=scale)}
        lm = LevenbergMarquardt(max_iter=max_iter, lam0=self.lam0, uncertainties=False,
                                device=self.device, dtype=self.dtype, **options)
        lm.fit(single, data, x[has_data], sigma=sigma, lower=lo, upper=hi)
        chi2 = torch.nan_to_num(lm.result_.chi2, nan=torch.inf)
        fitted = torch.isfinite(chi2)
        rows = torch.nonzero(has_data).reshape(-1)
        x_out[rows[fitted]] = lm.result_.x[fitted]
        chi2_out[rows] = chi2
        return x_out, chi2_out

    def _merge(self, forward, x, g, best, obs, sqrt_w):
        """Per pixel, keep the better of the current and the best local
        parameters, both evaluated with the current global parameters."""
        m_cur = self._model(forward, x, g)
        m_best = self._model(forward, best[0], g)
        c_cur = torch.nan_to_num(self._row_chi2(m_cur, obs, sqrt_w), nan=torch.inf)
        c_best = torch.nan_to_num(self._row_chi2(m_best, obs, sqrt_w), nan=torch.inf)
        take = c_best < c_cur
        chi2_pix = torch.where(take, c_best, c_cur)
        total = float(chi2_pix.sum())
        if total < best[2]:
            return (torch.where(take[:, None], best[0], x), g.clone(), total,
                    torch.where(take[:, None], m_best, m_cur), chi2_pix)
        return best

    def _perturb(self, x, g, chi2_pix, span_l, span_g, lo, hi, glo, ghi, gen):
        worse = chi2_pix >= torch.median(chi2_pix)
        noise = torch.randn(x.shape, generator=gen, dtype=self.dtype).to(self.device)
        x = torch.where(worse[:, None], x + self.perturbation_scale * span_l * noise, x)
        x = torch.minimum(torch.maximum(x, lo), hi)
        if self.global_perturbation_scale > 0:
            gn = torch.randn(g.shape, generator=gen, dtype=self.dtype).to(self.device)
            g = torch.minimum(torch.maximum(g + self.global_perturbation_scale * span_g * gn,
                                            glo), ghi)
        return x, g

    def _write_checkpoint(self, path, x, g, state: dict) -> None:
        import xarray as xr

        ds = xr.Dataset({"local": (("pixel", "parameter"), x.cpu().numpy()),
                         "global": (("global_parameter",), g.cpu().numpy())},
                        attrs={"kind": "coupled_lm_checkpoint",
                               **{k: float(v) if k == "lam" else int(v)
                                  for k, v in state.items()}})
        tmp = Path(str(path) + ".tmp")
        ds.to_netcdf(tmp, engine="h5netcdf")
        tmp.replace(path)

    def _read_checkpoint(self, path, x, g):
        import xarray as xr

        with xr.open_dataset(path, engine="h5netcdf") as ds:
            ds = ds.load()
        if ds.attrs.get("kind") != "coupled_lm_checkpoint":
            raise ValueError(f"{path} is not a coupled-inversion checkpoint")
        xc, gc = self._t(ds["local"].values), self._t(ds["global"].values)
        if xc.shape != x.shape or gc.shape != g.shape:
            raise ValueError(f"checkpoint {path} has shapes {tuple(xc.shape)}, {tuple(gc.shape)};"
                             f" the problem has {tuple(x.shape)}, {tuple(g.shape)}")
        state = {"iteration": int(ds.attrs["iteration"]), "lam": float(ds.attrs["lam"]),
                 "perturbations": int(ds.attrs["perturbations"]),
                 "reseeds": int(ds.attrs.get("reseeds", 0))}
        if ds.attrs.get("finished"):
            state["iteration"] = self.max_iter
        return xc, gc, state


# ----------------------------------------------------------------------------- atomic parameters
@dataclasses.dataclass(frozen=True)
class AtomicParameters:
    """Which atomic parameters are global unknowns, and their layout.

    The global vector holds log(gf) offsets [dex] of every line except the
    reference line, then Δλ [Å] of every line except the reference line
    (the reference line fixes the otherwise degenerate zero points: a common
    log(gf) offset trades with temperature/abundance and a common Δλ with
    the line-of-sight velocity).

    Parameters
    ----------
    n_lines
        Number of lines.
    reference_line
        Index of the line whose atomic data stay fixed (``None``: none).
    log_gf, dlambda
        Whether log(gf) and Δλ are free.
    line_labels
        Optional labels of the lines (for parameter names).

    Example
    -------
    >>> import torch
    >>> ap = AtomicParameters(3, reference_line=0)
    >>> ap.names
    ['log_gf_1', 'log_gf_2', 'dlambda_1', 'dlambda_2']
    >>> gf, dl = ap.split(torch.tensor([0.1, 0.2, 0.01, 0.02], dtype=torch.float64))
    >>> gf.tolist(), dl.tolist()
    ([0.0, 0.1, 0.2], [0.0, 0.01, 0.02])
    """

    n_lines: int
    reference_line: int | None = 0
    log_gf: bool = True
    dlambda: bool = True
    line_labels: tuple[str, ...] | None = None

    @property
    def free_lines(self) -> list[int]:
        return [i for i in range(self.n_lines) if i != self.reference_line]

    @property
    def n_parameters(self) -> int:
        return len(self.free_lines) * (int(self.log_gf) + int(self.dlambda))

    @property
    def names(self) -> list[str]:
        labels = self.line_labels or tuple(str(i) for i in range(self.n_lines))
        out = []
        if self.log_gf:
            out += [f"log_gf_{labels[i]}" for i in self.free_lines]
        if self.dlambda:
            out += [f"dlambda_{labels[i]}" for i in self.free_lines]
        return out

    @property
    def units(self) -> list[str]:
        nf = len(self.free_lines)
        return ["dex"] * (nf if self.log_gf else 0) + ["Angstrom"] * (nf if self.dlambda else 0)

    def split(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global vector ``(..., k)`` → log(gf) offsets and Δλ ``(..., n_lines)``
        (differentiable; fixed entries are zero)."""
        free = torch.as_tensor(self.free_lines, dtype=torch.long, device=g.device)
        nf = len(self.free_lines)
        zeros = g.new_zeros((*g.shape[:-1], self.n_lines))
        gf, dl = zeros, zeros
        pos = 0
        if self.log_gf:
            gf = zeros.index_copy(-1, free, g[..., pos:pos + nf])
            pos += nf
        if self.dlambda:
            dl = zeros.index_copy(-1, free, g[..., pos:pos + nf])
        return gf, dl

    def join(self, log_gf: Any, dlambda: Any) -> np.ndarray:
        """Per-line log(gf) offsets and Δλ → global vector (numpy)."""
        gf = np.broadcast_to(np.asarray(log_gf, dtype=float), (self.n_lines,))
        dl = np.broadcast_to(np.asarray(dlambda, dtype=float), (self.n_lines,))
        parts = []
        if self.log_gf:
            parts.append(gf[self.free_lines])
        if self.dlambda:
            parts.append(dl[self.free_lines])
        return np.concatenate(parts) if parts else np.zeros(0)


def _bound_scale(*bounds: Any) -> torch.Tensor:
    """Width of each parameter's bounds (lower, upper pairs), 1 where unbounded:
    the finite-difference step scale of :func:`batched_finite_jacobian`."""
    def vector(b: Any) -> torch.Tensor:
        if isinstance(b, torch.Tensor):
            return b.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        return torch.tensor(np.array(b, dtype=np.float64).reshape(-1))

    lo = torch.cat([vector(b) for b in bounds[0::2]])
    hi = torch.cat([vector(b) for b in bounds[1::2]])
    width = hi - lo
    return torch.where(torch.isfinite(width) & (width > 0), width, torch.ones_like(width))


def _batched_option(batched: bool, fn: Callable[[torch.Tensor], torch.Tensor],
                    *bounds: Any) -> dict:
    """``jacobian=`` keyword of :class:`LevenbergMarquardt` for ``"batched"``."""
    if not batched:
        return {}
    scale = _bound_scale(*bounds)
    return {"jacobian": lambda x, index=None: batched_finite_jacobian(
        fn, x, scale=scale.to(dtype=x.dtype, device=x.device))}


Mode = Literal[1, 2, 3, "averaged"]
AtomicForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AtomicInversion:
    """Inversion of atmospheres and atomic data in one of globin's modes.

    Parameters
    ----------
    mode
        ``1``: atmosphere only, atomic data held at ``global0``; ``2``: atomic
        data free in every pixel (reported: the mean over unflagged pixels
        and its standard error); ``3``: atomic data global, fitted with all
        pixels (:class:`CoupledLevenbergMarquardt`); ``"averaged"``: the mean
        spectrum of all pixels fitted with one atmosphere and the atomic data.
    atomic
        The :class:`AtomicParameters` layout.
    max_iter
        Iterations per cycle.
    lm_options, coupled_options
        Extra keyword arguments of :class:`LevenbergMarquardt` (modes 1, 2,
        averaged) and :class:`CoupledLevenbergMarquardt` (mode 3);
        ``jacobian="batched"`` is accepted by both
        (:func:`batched_finite_jacobian`).
    device, dtype
        Where and in which precision to compute.

    Example
    -------
    >>> inv = AtomicInversion(3, AtomicParameters(4))
    >>> inv.mode
    3
    """

    def __init__(self, mode: Mode, atomic: AtomicParameters, max_iter: int = 50,
                 lm_options: dict | None = None, coupled_options: dict | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64
                 ) -> None:
        if mode not in (1, 2, 3, "averaged"):
            raise ValueError(f"mode must be 1, 2, 3 or 'averaged', got {mode!r}")
        self.mode = mode
        self.atomic = atomic
        self.max_iter = max_iter
        self.lm_options = lm_options
        self.coupled_options = coupled_options
        self.device = device
        self.dtype = dtype

    def fit(self, forward: AtomicForward | Sequence[Cycle], observed: Any, local0: Any, *,
            global0: Any = None, sigma: Any = 1.0, weights: Any = 1.0,
            local_lower: Any = None, local_upper: Any = None, global_lower: Any = None,
            global_upper: Any = None, local_names: Sequence[str] | None = None,
            checkpoint: str | Path | None = None) -> AtomicInversion:
        """Run the inversion.

        Parameters
        ----------
        forward
            ``forward(local (p, n), log_gf_offset (p, L), dlambda (p, L)) ->
            (p, m)``, or a list of :class:`~iris_lab.inversion.lm.Cycle` whose
            ``forward`` has that signature (node counts growing between
            cycles; ``transfer`` maps the local parameters).
        observed
            ``(P, m)``.
        local0
            ``(P, n)`` start of the first cycle.
        global0
            Start (mode 2, 3, averaged) or fixed value (mode 1) of the global
            vector ``(k,)``; default zeros (the line list as given).
        sigma, weights, local_lower, local_upper, global_lower, global_upper
            Noise, weights and bounds.
        local_names
            Names of the local parameters (of a single forward).
        checkpoint
            Base path: ``<checkpoint>.cycle<k>.nc`` per cycle; finished cycles
            are skipped on a rerun.
        """
        if callable(forward):
            cycles = [Cycle(forward, local_lower, local_upper, local_names or [])]
        else:
            cycles = list(forward)
        obs = torch.as_tensor(observed, dtype=self.dtype, device=self.device)
        k = self.atomic.n_parameters
        g = torch.zeros(k, dtype=self.dtype, device=self.device) if global0 is None else \
            torch.as_tensor(global0, dtype=self.dtype, device=self.device).reshape(k).clone()
        x = torch.as_tensor(local0, dtype=self.dtype, device=self.device)
        self.cycle_results_ = []
        t0 = time.perf_counter()
        for ic, cyc in enumerate(cycles):
            if ic > 0 and cyc.transfer is not None:
                x = cyc.transfer(x)
            ck = None if checkpoint is None else Path(f"{checkpoint}.cycle{ic}.nc")
            x, g = self._fit_one(cyc, obs, x, g, sigma, weights, global_lower, global_upper, ck)
            self.cycle_results_.append(self.dataset_)
        self.wall_time_ = time.perf_counter() - t0
        self.dataset_.attrs["wall_time_s"] = self.wall_time_
        return self

    def _wrap(self, fwd: AtomicForward):
        atomic = self.atomic

        def coupled(local: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
            gf, dl = atomic.split(glob)
            return fwd(local, gf, dl)
        return coupled

    def _fit_one(self, cyc: Cycle, obs, x, g, sigma, weights, glo, ghi, ck):
        import xarray as xr

        fwd = self._wrap(cyc.forward)
        n_pix, n = x.shape
        k = g.shape[0]
        names = list(cyc.parameter_names) or [f"p{i}" for i in range(n)]
        gnames = self.atomic.names
        lm_kw = {"max_iter": self.max_iter, "device": self.device, "dtype": self.dtype,
                 **(self.lm_options or {})}
        batched = lm_kw.get("jacobian") == "batched"
        if batched:
            lm_kw.pop("jacobian")
        lo_l = cyc.lower if cyc.lower is not None else [-np.inf] * n
        hi_l = cyc.upper if cyc.upper is not None else [np.inf] * n
        lo_g = glo if glo is not None else [-np.inf] * k
        hi_g = ghi if ghi is not None else [np.inf] * k
        lo_l = np.broadcast_to(np.asarray(lo_l, float), (n,))
        hi_l = np.broadcast_to(np.asarray(hi_l, float), (n,))
        lo_g = np.broadcast_to(np.asarray(lo_g, float), (k,))
        hi_g = np.broadcast_to(np.asarray(hi_g, float), (k,))
        per_pixel_global = None
        gsig = torch.full((k,), torch.nan, dtype=self.dtype)
        if self.mode == 1:
            g_fixed = g.clone()

            def fwd1(z):
                return fwd(z, g_fixed.expand(z.shape[0], k))
            lm = LevenbergMarquardt(**lm_kw, **_batched_option(batched, fwd1, lo_l, hi_l))
            lm.fit_cycles([Cycle(fwd1, lo_l, hi_l, names)], obs, x, sigma=sigma,
                          weights=weights, checkpoint=ck)
            res = lm.result_
            x_out, g_out, gsig = res.x, g_fixed, torch.zeros(k, dtype=self.dtype)
            lsig, chi2, chi2r, quality, model = (res.sigma, res.chi2, res.chi2_reduced,
                                                 res.quality, res.model)
            n_iter = int(res.n_iter.max())
        elif self.mode in (2, "averaged"):
            if self.mode == "averaged":
                sig_t = _as_2d(sigma, obs.shape, "sigma", self.dtype, self.device)
                valid = torch.isfinite(obs)
                n_valid = valid.sum(0).clamp(min=1)
                obs_fit = (torch.nansum(obs, 0) / n_valid)[None]
                sig_fit = (torch.sqrt(torch.nansum(torch.where(valid, sig_t ** 2, 0.0), 0))
                           / n_valid)[None]
                w_fit = _as_2d(weights, obs.shape, "weights", self.dtype, self.device)[:1]
                x_start = x.mean(0, keepdim=True)
            else:
                obs_fit, sig_fit, w_fit, x_start = obs, sigma, weights, x
            start = torch.cat([x_start, g.expand(x_start.shape[0], k)], -1)

            def fwd2(z):
                return fwd(z[:, :n], z[:, n:])
            lm = LevenbergMarquardt(**lm_kw, **_batched_option(batched, fwd2, lo_l, hi_l,
                                                               lo_g, hi_g))
            lm.fit_cycles([Cycle(fwd2, np.concatenate([lo_l, lo_g]),
                                 np.concatenate([hi_l, hi_g]), names + gnames)],
                          obs_fit, start, sigma=sig_fit, weights=w_fit, checkpoint=ck)
            res = lm.result_
            if self.mode == "averaged":
                g_out, gsig = res.x[0, n:], res.sigma[0, n:]
                x_out = res.x[:, :n].expand(n_pix, n).clone()
                lsig = res.sigma[:, :n].expand(n_pix, n).clone()
                model = self._wrap(cyc.forward)(x_out[:1], g_out[None]).detach()
                model = model.expand(n_pix, -1)
                sw = (torch.sqrt(_as_2d(weights, obs.shape, "weights", self.dtype, self.device))
                      / _as_2d(sigma, obs.shape, "sigma", self.dtype, self.device))
                chi2 = torch.nansum(((model - obs) * sw) ** 2, -1)
                chi2r = chi2 / max(obs.shape[1] - n, 1)
                quality = res.quality.expand(n_pix).clone()
            else:
                per_pixel_global = res.x[:, n:]
                good = res.quality & (FLAG_NAN | FLAG_DIVERGED) == 0
                sel = per_pixel_global[good]
                g_out = sel.mean(0)
                gsig = sel.std(0) / np.sqrt(max(int(good.sum()), 1))
                x_out, lsig = res.x[:, :n], res.sigma[:, :n]
                chi2, chi2r, quality, model = res.chi2, res.chi2_reduced, res.quality, res.model
            n_iter = int(res.n_iter.max())
        else:
            opts = {"max_iter": self.max_iter, "device": self.device, "dtype": self.dtype,
                    **(self.coupled_options or {})}
            cl = CoupledLevenbergMarquardt(**opts)
            cl.fit(fwd, obs, x, g, sigma=sigma, weights=weights, local_lower=lo_l,
                   local_upper=hi_l, global_lower=lo_g, global_upper=hi_g, local_names=names,
                   global_names=gnames, checkpoint=ck)
            x_out, g_out, lsig, gsig = cl.local_, cl.global_, cl.local_sigma_, cl.global_sigma_
            chi2, chi2r, quality, model = cl.chi2_, cl.chi2_reduced_, cl.quality_, cl.model_
            n_iter = cl.n_iter_
            self.coupled_ = cl
        gf, dl = self.atomic.split(g_out.detach())
        gf_s, dl_s = self.atomic.split(torch.nan_to_num(gsig.detach(), nan=0.0))

        def np_(t):
            return t.detach().cpu().numpy()

        ds = xr.Dataset(
            {
                "local": (("pixel", "parameter"), np_(x_out)),
                "sigma_local": (("pixel", "parameter"), np_(lsig)),
                "global": (("global_parameter",), np_(g_out),
                           {"units_per_parameter": ", ".join(self.atomic.units)}),
                "sigma_global": (("global_parameter",), np_(gsig)),
                "log_gf_offset": (("line",), np_(gf), {"units": "dex"}),
                "sigma_log_gf_offset": (("line",), np_(gf_s), {"units": "dex"}),
                "dlambda": (("line",), np_(dl), {"units": "Angstrom"}),
                "sigma_dlambda": (("line",), np_(dl_s), {"units": "Angstrom"}),
                "chi2": (("pixel",), np_(chi2), {"units": ""}),
                "chi2_reduced": (("pixel",), np_(chi2r), {"units": ""}),
                "quality": (("pixel",), np_(quality).astype(np.uint8),
                            {"flag_masks": np.array(FLAG_MASKS, dtype=np.uint8),
                             "flag_meanings": FLAG_MEANINGS}),
                "model": (("pixel", "sample"), np_(model)),
            },
            coords={"parameter": names, "global_parameter": gnames,
                    "line": list(self.atomic.line_labels or range(self.atomic.n_lines))},
            attrs={"method": "atomic_inversion", "mode": str(self.mode),
                   "reference_line": -1 if self.atomic.reference_line is None
                   else int(self.atomic.reference_line), "n_iter": n_iter},
        )
        if per_pixel_global is not None:
            ds["global_per_pixel"] = (("pixel", "global_parameter"), np_(per_pixel_global))
        self.dataset_ = ds
        self.local_, self.global_ = x_out.detach(), g_out.detach()
        self.local_sigma_, self.global_sigma_ = lsig, gsig
        self.chi2_, self.quality_ = chi2, quality
        self.log_gf_offset_, self.dlambda_ = gf, dl
        return x_out.detach(), g_out.detach()

    def save(self, path: str | Path) -> Path:
        """Write ``dataset_`` as netCDF (h5netcdf)."""
        if not hasattr(self, "dataset_"):
            raise ValueError("not fitted: call fit() first")
        path = Path(path)
        self.dataset_.to_netcdf(path, engine="h5netcdf")
        return path

    @staticmethod
    def load(path: str | Path):
        """Read a result written by :meth:`save` as an ``xarray.Dataset``."""
        import xarray as xr

        with xr.open_dataset(path, engine="h5netcdf") as ds:
            ds = ds.load()
        if ds.attrs.get("method") != "atomic_inversion":
            raise ValueError(f"{path} is not an atomic-inversion result")
        return ds
