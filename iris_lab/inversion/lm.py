"""Batched Levenberg–Marquardt least squares over independent pixels.

Every pixel ``p`` has its own parameter vector ``x_p`` (``n`` values) and
its own data vector ``y_p`` (``m`` values, e.g. four Stokes parameters times
the wavelengths, flattened). A *forward model* maps a batch of parameter
vectors ``(p, n)`` to model data ``(p, m)``; the fit minimises, per pixel,

.. math::

    \\chi^2_p = \\sum_i w_{p,i} \\, (f_i(x_p) - y_{p,i})^2 / \\sigma_{p,i}^2 .

All pixels iterate together (one batched forward model call and one batched
Jacobian per iteration; no loop over pixels). Each pixel keeps its own
Marquardt parameter ``λ_p`` and stops on its own convergence test.

Algorithm
---------
* Jacobian ``J = ∂f/∂x`` by forward-mode automatic differentiation
  (``torch.func.jvp``, one pass per parameter column, or all columns at once
  with ``torch.func.vmap``), by forward finite differences, or analytic when
  the caller supplies it.
* Marquardt scaling: the columns of the weighted Jacobian are divided by
  their norms ``D_j = ‖J̃_j‖`` so the scaled normal matrix has a unit
  diagonal; the step solves ``(J̃ᵀJ̃ + λ I) δ̃ = −J̃ᵀ r̃`` and ``δ = δ̃ / D``
  (identical to Marquardt's ``JᵀJ + λ diag(JᵀJ)``, better conditioned).
* Box bounds by *projection*: the trial point is clipped to
  ``[lower, upper]`` (a bound is active when the parameter ends on it; such
  pixels are flagged ``at_bound``).
* A step is accepted when it lowers χ²: then ``λ ← λ / lam_down``, else
  ``λ ← λ · lam_up`` and the pixel keeps its parameters.
* Convergence per pixel: an accepted step with relative χ² decrease below
  ``ftol``, or the cosine between the residual and every scaled Jacobian
  column below ``gtol`` (MINPACK's orthogonality test), or χ² below
  ``chi2_floor``. A pixel whose ``λ`` exceeds ``lam_max`` is *stalled*: it is
  converged if the undamped Gauss–Newton step predicts a relative decrease
  below ``10 · ftol`` (nothing left to gain), otherwise flagged ``diverged``.
* Uncertainties (del Toro Iniesta & Ruiz Cobo 2016, Living Rev. Sol. Phys.
  13, 4, eq. 42, in its full-Hessian form):
  ``σ²_j = χ²_p / (m_p − n) · (H⁻¹)_jj`` with ``H = JᵀWJ`` the Gauss–Newton
  Hessian of ½χ² (``W = w/σ²``) at the solution.

Flags (``quality`` bits): ``1`` nan (non-finite model, Jacobian or χ², or
fewer valid data than parameters),
``2`` diverged, ``4`` at_bound, ``8`` max_iter.

Example
-------
>>> import torch
>>> from iris_lab.inversion.lm import LevenbergMarquardt
>>> t = torch.linspace(0, 1, 20, dtype=torch.float64)
>>> def forward(x):  # two parameters per pixel: amplitude, rate
...     return x[:, :1] * torch.exp(-x[:, 1:2] * t)
>>> truth = torch.tensor([[2.0, 3.0], [1.0, 0.5]], dtype=torch.float64)
>>> fit = LevenbergMarquardt(max_iter=50).fit(
...     forward, forward(truth), x0=torch.ones(2, 2, dtype=torch.float64))
>>> bool(torch.allclose(fit.x_, truth, atol=1e-6))
True
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FLAG_NAN = 1
FLAG_DIVERGED = 2
FLAG_AT_BOUND = 4
FLAG_MAX_ITER = 8
FLAG_MASKS = (FLAG_NAN, FLAG_DIVERGED, FLAG_AT_BOUND, FLAG_MAX_ITER)
FLAG_MEANINGS = "nan diverged at_bound max_iter"

Forward = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- Jacobians
def batched_finite_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                            step: float = 1e-6, max_rows: int = 4096,
                            scale: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Model and forward-difference Jacobian of ``fn: (p, n) -> (p, m)`` in one batch.

    The ``n`` perturbed copies of every pixel are stacked with the unperturbed
    one along the pixel axis, so a Jacobian costs one call of ``fn`` on
    ``(n + 1) p`` rows (in groups of at most ``max_rows``) instead of ``n + 1``
    calls on ``p`` rows: much faster when a call has a large fixed cost (a
    forward model that runs pixels together, like the LTE engine). Rows must
    be independent (row ``i`` of the output depends on row ``i`` of ``x``).

    Parameters
    ----------
    fn
        Batched function.
    x
        Parameters ``(p, n)``.
    step
        Relative step: ``step · max(|x|, scale)``.
    max_rows
        Largest number of rows passed to ``fn`` at once (memory bound).
    scale
        Typical size ``(n,)`` of each parameter (e.g. the width of its
        bounds; default 1), so that a parameter near zero in large units
        (v_los in cm/s) still gets a step well above round-off.

    Returns
    -------
    model, J
        ``(p, m)`` and ``(p, m, n)``.

    Example
    -------
    >>> import torch
    >>> f, J = batched_finite_jacobian(lambda z: z ** 2,
    ...                                torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    >>> [round(v, 4) for v in J[0].diagonal().tolist()]
    [2.0, 4.0]
    """
    p, n = x.shape
    with torch.no_grad():
        floor = torch.ones(n, dtype=x.dtype, device=x.device) if scale is None else \
            torch.as_tensor(scale, dtype=x.dtype, device=x.device)
        h = step * torch.maximum(x.abs(), floor)                        # (p, n)
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        stacked = torch.cat([x[None], x[None] + h.T[:, :, None] * eye[:, None, :]])
        rows = stacked.reshape((n + 1) * p, n)                          # column-major blocks
        out = torch.cat([fn(rows[s:s + max_rows]) for s in range(0, rows.shape[0], max_rows)])
        out = out.reshape(n + 1, p, -1)
        model = out[0]
        jac = (out[1:] - model[None]) / h.T[:, :, None]                 # (n, p, m)
    return model, jac.permute(1, 2, 0)


def jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             method: str = "jvp", step: float = 1e-6, scale: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Model and Jacobian of a batched function ``fn: (p, n) -> (p, m)``.

    Row ``k`` of the output depends on row ``k`` of ``x`` only (independent
    pixels), so one forward-mode pass per parameter column gives the whole
    per-pixel Jacobian.

    Parameters
    ----------
    fn
        Batched function.
    x
        Parameters ``(p, n)``.
    method
        ``"jvp"`` (forward-mode AD, one pass per column), ``"vmap"`` (forward
        mode for all columns in one vectorised pass; ``fn`` must be
        ``vmap``-compatible) or ``"finite"`` (forward differences with
        relative step ``step``, all columns in one batched call:
        :func:`batched_finite_jacobian`).
    step
        Relative step of the finite differences: ``step × max(|x|, scale)``.
    scale
        Typical magnitude of each parameter ``(n,)`` (default 1), so that a
        parameter near zero (a velocity in cm/s) gets a step of its own size,
        not 1e-6 of a unit; :class:`LevenbergMarquardt` passes the widths of
        the finite bounds.

    Returns
    -------
    model, J
        ``(p, m)`` and ``(p, m, n)``.

    Example
    -------
    >>> import torch
    >>> f, J = jacobian(lambda x: x ** 2, torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    >>> J[0].diagonal().tolist()
    [2.0, 4.0]
    """
    n = x.shape[-1]
    if method == "jvp":
        cols = []
        f = None
        for j in range(n):
            tangent = torch.zeros_like(x)
            tangent[:, j] = 1.0
            f, col = torch.func.jvp(fn, (x,), (tangent,))
            cols.append(col)
        if f is None:
            f = fn(x)
            return f, f.new_zeros((*f.shape, 0))
        return f, torch.stack(cols, dim=-1)
    if method == "vmap":
        basis = torch.eye(n, dtype=x.dtype, device=x.device)[:, None, :].expand(n, *x.shape)
        f = fn(x)
        cols = torch.func.vmap(lambda t: torch.func.jvp(fn, (x,), (t,))[1])(basis)
        return f, cols.permute(1, 2, 0)
    if method == "finite":
        return batched_finite_jacobian(fn, x, step=step, scale=scale)
    raise ValueError(f"unknown Jacobian method {method!r}: use 'jvp', 'vmap' or 'finite'")


def _takes_index(fn: Callable) -> bool:
    try:
        return "index" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _as_2d(value: Any, shape: tuple[int, int], name: str, dtype, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    try:
        return torch.broadcast_to(t, shape).clone()
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to {shape}") from err


def _weighted_data(obs: torch.Tensor, sigma: Any, weights: Any, dtype, device
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``sigma``/``weights`` against ``obs`` (pixels, m).

    Returns the data with non-finite values set to zero and the per-point
    factor ``sqrt(weights) / sigma``, zero where the data are not finite.
    """
    wts = _as_2d(weights, obs.shape, "weights", dtype, device)
    sig = _as_2d(sigma, obs.shape, "sigma", dtype, device)
    if bool((sig <= 0).any()) or not bool(torch.isfinite(sig).all()):
        raise ValueError("sigma must be finite and positive")
    if bool((wts < 0).any()) or not bool(torch.isfinite(wts).all()):
        raise ValueError("weights must be finite and non-negative")
    # Non-finite data are masked (zero weight) rather than propagated.
    bad_data = ~torch.isfinite(obs)
    wts = torch.where(bad_data, torch.zeros_like(wts), wts)
    obs = torch.nan_to_num(obs, nan=0.0, posinf=0.0, neginf=0.0)
    return obs, torch.sqrt(wts) / sig


def blocked_at_bounds(x: torch.Tensor, descent: torch.Tensor, lower: torch.Tensor,
                      upper: torch.Tensor) -> torch.Tensor:
    """The active set of a box-bounded least-squares step: parameters on a
    bound where the descent direction ``−∇χ²`` points out of the box.

    The solvers hold these (zero step) and solve for the others, as in a
    projected Newton method (Bertsekas 1982): clamping a full Gauss–Newton
    step instead changes its direction and usually makes it fail, and
    judging by the sign of the step rather than of the gradient can pin a
    parameter that ought to leave its bound.

    Example
    -------
    >>> import torch
    >>> blocked_at_bounds(torch.tensor([0.0, 0.5, 1.0, 0.0]),
    ...                   torch.tensor([-1.0, -1.0, -1.0, 1.0]),
    ...                   torch.zeros(4), torch.ones(4)).tolist()
    [True, False, False, False]
    """
    return ((x <= lower) & (descent < 0)) | ((x >= upper) & (descent > 0))


def screen_starts(forward: Callable[[torch.Tensor], torch.Tensor], candidates: Any,
                  observed: Any, sigma: Any = 1.0, weights: Any = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's best starting point among a few candidates, by one forward call.

    All ``c`` candidates of all ``p`` pixels go through ``forward`` in one
    batch of ``c · p`` rows; every pixel takes the candidate with the lowest
    weighted χ² against its own data (non-finite models lose).

    Parameters
    ----------
    forward
        Batched model ``(rows, n) -> (rows, m)``.
    candidates
        ``(c, n)`` shared by all pixels, or ``(p, c, n)`` per pixel.
    observed
        Data ``(p, m)``; non-finite samples are masked.
    sigma, weights
        Noise and weights broadcastable to ``(p, m)``.

    Returns
    -------
    start, choice
        ``(p, n)`` starting points and the index ``(p,)`` of the chosen candidate.

    Example
    -------
    >>> import torch
    >>> line = lambda z: torch.exp(-(torch.linspace(-1, 1, 9) - z[:, :1]) ** 2 / 0.1)
    >>> obs = line(torch.tensor([[0.6], [-0.5]]))
    >>> start, choice = screen_starts(line, torch.tensor([[-0.4], [0.0], [0.5]]), obs)
    >>> choice.tolist()
    [2, 0]
    """
    obs = torch.as_tensor(observed)
    cand = torch.as_tensor(candidates, dtype=obs.dtype, device=obs.device)
    if obs.ndim != 2:
        raise ValueError(f"observed must have shape (pixels, m), got {tuple(obs.shape)}")
    p = obs.shape[0]
    if cand.ndim == 2:
        cand = cand[None].expand(p, *cand.shape)
    if cand.ndim != 3 or cand.shape[0] != p:
        raise ValueError(f"candidates must have shape (c, n) or ({p}, c, n), "
                         f"got {tuple(torch.as_tensor(candidates).shape)}")
    c, n = cand.shape[1], cand.shape[2]
    obs, sqrt_w = _weighted_data(obs, sigma, weights, obs.dtype, obs.device)
    with torch.no_grad():
        model = forward(cand.reshape(p * c, n)).reshape(p, c, -1)
    res = torch.where(sqrt_w[:, None] > 0, (model - obs[:, None]) * sqrt_w[:, None], 0.0)
    chi2 = torch.sum(res ** 2, -1)
    chi2 = torch.where(torch.isfinite(chi2), chi2, torch.full_like(chi2, torch.inf))
    choice = torch.argmin(chi2, -1)
    return cand[torch.arange(p, device=cand.device), choice].clone(), choice


def solve_damped(jac: torch.Tensor, res: torch.Tensor, lam: torch.Tensor,
                 held: torch.Tensor | None = None, scale_floor: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Marquardt-scaled damped Gauss–Newton step, batched over pixels.

    Parameters
    ----------
    jac
        Weighted Jacobian ``(p, m, n)`` (rows already multiplied by √w/σ).
    res
        Weighted residual ``(p, m)``.
    lam
        Marquardt parameter ``(p,)``.
    held
        Parameters to hold (zero step), ``(p, n)`` bool, e.g. the active set
        :func:`blocked_at_bounds`.
    scale_floor
        Lower limit ``(p, n)`` of the Marquardt column scales (Moré 1978: the
        largest column norm met so far in the fit). Without it a parameter
        whose column has (nearly) vanished, an inclination at 0 or π where
        the spectra are symmetric in it, gets a tiny scale and a huge step
        at any λ, and every trial step fails.

    Returns
    -------
    step, predicted
        The step ``(p, n)`` and the χ² the linear model predicts after it.

    Example
    -------
    >>> import torch
    >>> J = torch.eye(2, dtype=torch.float64)[None]
    >>> step, _ = solve_damped(J, torch.tensor([[1.0, -2.0]], dtype=torch.float64),
    ...                        torch.tensor([0.0], dtype=torch.float64))
    >>> step.tolist()
    [[-1.0, 2.0]]
    """
    if held is not None:
        jac = jac * (~held).to(jac.dtype)[:, None, :]
    scale = torch.linalg.vector_norm(jac, dim=-2)                    # (p, n)
    if scale_floor is not None:
        scale = torch.maximum(scale, scale_floor)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    js = jac / scale[:, None, :]
    hess = js.transpose(-1, -2) @ js
    grad = (js.transpose(-1, -2) @ res[..., None])[..., 0]
    eye = torch.eye(hess.shape[-1], dtype=hess.dtype, device=hess.device)
    damped = hess + lam[:, None, None] * eye
    step_s, info = torch.linalg.solve_ex(damped, -grad)
    bad = info != 0
    if bool(bad.any()):
        step_s[bad] = (torch.linalg.pinv(damped[bad]) @ (-grad[bad])[..., None])[..., 0]
    predicted = torch.sum((res + (js @ step_s[..., None])[..., 0]) ** 2, dim=-1)
    return step_s / scale, predicted


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass
class LMResult:
    """Outcome of a batched fit (tensors on the fit's device).

    Attributes
    ----------
    x, sigma
        Best parameters and their 1σ uncertainties ``(p, n)``.
    chi2, chi2_reduced
        Weighted χ² and χ² per degree of freedom ``(p,)``.
    model
        Model data at ``x`` ``(p, m)``.
    quality
        Bit flags ``(p,)`` (see module docstring).
    n_iter, lam
        Iterations used and final Marquardt parameter ``(p,)``.
    parameter_names
        Names of the ``n`` parameters.
    history
        Total χ² after every iteration (one list per cycle/restart).
    """

    x: torch.Tensor
    sigma: torch.Tensor
    chi2: torch.Tensor
    chi2_reduced: torch.Tensor
    model: torch.Tensor
    quality: torch.Tensor
    n_iter: torch.Tensor
    lam: torch.Tensor
    parameter_names: list[str]
    history: list[list[float]] = dataclasses.field(default_factory=list)

    def to_dataset(self, batch_shape: Sequence[int] | None = None,
                   batch_dims: Sequence[str] | None = None, units: dict[str, str] | None = None):
        """The result as an ``xarray.Dataset``.

        Parameters
        ----------
        batch_shape, batch_dims
            Reshape the pixel axis, e.g. ``(ny, nx)`` with dims ``("y", "x")``;
            default one ``pixel`` dimension.
        units
            Units per parameter name (attrs of ``best_fit``/``sigma`` list them).

        The best-fit parameters are ``best_fit`` (files written before were
        ``x``, a name that clashed with an ``x`` pixel dimension; both are read).
        """
        import xarray as xr

        batch_shape = tuple(batch_shape or (self.x.shape[0],))
        dims = tuple(batch_dims or (("pixel",) if len(batch_shape) == 1 else
                                    tuple(f"dim_{i}" for i in range(len(batch_shape)))))
        if len(dims) != len(batch_shape):
            raise ValueError("batch_dims and batch_shape must have the same length")

        def arr(t: torch.Tensor, *tail: int) -> np.ndarray:
            return t.detach().cpu().numpy().reshape(*batch_shape, *tail)

        n = self.x.shape[-1]
        unit_list = ", ".join((units or {}).get(name, "") or "1" for name in self.parameter_names)
        ds = xr.Dataset(
            {
                "best_fit": (dims + ("parameter",), arr(self.x, n),
                             {"long_name": "best-fit parameters",
                              "units_per_parameter": unit_list}),
                "sigma": (dims + ("parameter",), arr(self.sigma, n),
                          {"long_name": "1-sigma uncertainty (inverse Hessian)",
                           "units_per_parameter": unit_list}),
                "chi2": (dims, arr(self.chi2), {"long_name": "weighted chi-square",
                                                "units": ""}),
                "chi2_reduced": (dims, arr(self.chi2_reduced),
                                 {"long_name": "chi-square per degree of freedom", "units": ""}),
                "quality": (dims, arr(self.quality).astype(np.uint8),
                            {"flag_masks": np.array(FLAG_MASKS, dtype=np.uint8),
                             "flag_meanings": FLAG_MEANINGS}),
                "n_iter": (dims, arr(self.n_iter).astype(np.int32), {"units": ""}),
                "marquardt_lambda": (dims, arr(self.lam), {"units": ""}),
            },
            coords={"parameter": list(self.parameter_names)},
            attrs={"method": "levenberg_marquardt"},
        )
        return ds


def _pick(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    shape = (-1,) + (1,) * (new.ndim - 1)
    return torch.where(mask.reshape(shape), new, old)


def _merge_best(best: LMResult | None, new: LMResult) -> LMResult:
    """Per pixel, keep the result with the lower χ² (finite beats NaN)."""
    if best is None:
        return new
    c_old = torch.nan_to_num(best.chi2, nan=torch.inf)
    c_new = torch.nan_to_num(new.chi2, nan=torch.inf)
    take = c_new < c_old
    return LMResult(
        x=_pick(take, new.x, best.x), sigma=_pick(take, new.sigma, best.sigma),
        chi2=_pick(take, new.chi2, best.chi2),
        chi2_reduced=_pick(take, new.chi2_reduced, best.chi2_reduced),
        model=_pick(take, new.model, best.model), quality=_pick(take, new.quality, best.quality),
        n_iter=_pick(take, new.n_iter, best.n_iter), lam=_pick(take, new.lam, best.lam),
        parameter_names=new.parameter_names, history=best.history + new.history)


@dataclasses.dataclass
class Cycle:
    """One inversion cycle: a forward model, its bounds and how to start it.

    Parameters
    ----------
    forward
        ``forward(x (p, n)) -> (p, m)``; may take a keyword ``index`` (the
        pixel indices of the rows) for pixel-dependent models.
    lower, upper
        Bounds ``(n,)`` (``±inf`` for none).
    parameter_names
        Names of the ``n`` parameters.
    transfer
        ``transfer(x_previous) -> x0`` mapping the previous cycle's solution
        to this cycle's start (e.g. re-sampling node values onto more nodes);
        ``None`` for the first cycle or identical parametrisations.
    max_iter
        Override of the estimator's ``max_iter`` for this cycle.
    """

    forward: Forward
    lower: Any
    upper: Any
    parameter_names: Sequence[str]
    transfer: Callable[[torch.Tensor], torch.Tensor] | None = None
    max_iter: int | None = None


# ----------------------------------------------------------------------------- estimator
class LevenbergMarquardt:
    """Batched Levenberg–Marquardt fit of independent pixels.

    Parameters
    ----------
    max_iter
        Maximum number of iterations (each one forward model + Jacobian).
    lam0, lam_up, lam_down, lam_max, lam_min
        Initial Marquardt parameter and its update factors and limits.
    ftol
        Relative χ² decrease below which an accepted step means converged.
    gtol
        Orthogonality tolerance (cosine between residual and columns).
    chi2_floor
        χ² below which a pixel is converged (exact fits).
    jacobian
        ``"jvp"``, ``"vmap"``, ``"finite"`` or a callable
        ``(x, index) -> (model (p, m), J (p, m, n))`` (analytic).
    n_restarts
        Extra random starts; each pixel keeps its lowest-χ² solution.
    restart_scale
        Standard deviation of the restart perturbation as a fraction of the
        bound range (of ``|x0|`` + 1 for unbounded parameters).
    uncertainties
        Compute ``sigma`` from the Hessian at the solution.
    seed
        Seed of the restart perturbations.
    progress
        Show a tqdm progress bar over iterations.
    device, dtype
        Where and in which precision to compute.

    Example
    -------
    >>> import torch
    >>> lm = LevenbergMarquardt(max_iter=30)
    >>> fit = lm.fit(lambda x: torch.cat([x, x ** 2], -1),
    ...              torch.tensor([[2.0, 4.0]], dtype=torch.float64),
    ...              x0=torch.tensor([[1.0]], dtype=torch.float64))
    >>> round(float(fit.x_[0, 0]), 6)
    2.0
    """

    def __init__(self, max_iter: int = 50, lam0: float = 1e-2, lam_up: float = 10.0,
                 lam_down: float = 10.0, lam_max: float = 1e8, lam_min: float = 1e-8,
                 ftol: float = 1e-6, gtol: float = 1e-8, chi2_floor: float = 1e-20,
                 jacobian: str | Callable = "jvp", n_restarts: int = 0,
                 restart_scale: float = 0.1, uncertainties: bool = True, seed: int = 0,
                 progress: bool = False, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float64) -> None:
        self.max_iter = max_iter
        self.lam0 = lam0
        self.lam_up = lam_up
        self.lam_down = lam_down
        self.lam_max = lam_max
        self.lam_min = lam_min
        self.ftol = ftol
        self.gtol = gtol
        self.chi2_floor = chi2_floor
        self.jacobian = jacobian
        self.n_restarts = n_restarts
        self.restart_scale = restart_scale
        self.uncertainties = uncertainties
        self.seed = seed
        self.progress = progress
        self.device = device
        self.dtype = dtype

    # ------------------------------------------------------------------ public API
    def fit(self, forward: Forward, observed: Any, x0: Any, *, sigma: Any = 1.0,
            weights: Any = 1.0, lower: Any = None, upper: Any = None,
            parameter_names: Sequence[str] | None = None) -> LevenbergMarquardt:
        """Fit every pixel; results in ``result_`` (and ``x_``, ``chi2_``, ...).

        Parameters
        ----------
        forward
            ``forward(x (p, n)) -> (p, m)``; with a keyword ``index`` it also
            receives the pixel indices of the rows (only active pixels are
            evaluated then; otherwise all pixels are evaluated every
            iteration and converged ones are frozen).
        observed
            Data ``(P, m)`` (zeros when ``forward`` already is a residual).
        x0
            Starting parameters ``(P, n)`` (or ``(n,)``, broadcast).
        sigma, weights
            Noise and weights, broadcastable to ``(P, m)``; χ² sums
            ``weights · (forward − observed)² / sigma²``. Zero weight masks a
            sample.
        lower, upper
            Box bounds broadcastable to ``(n,)``.
        parameter_names
            Names of the parameters (default ``p0, p1, ...``).

        Raises
        ------
        ValueError
            For inconsistent shapes, non-positive ``sigma``, negative
            weights or ``lower > upper``.
        """
        cycle = Cycle(forward, lower, upper, parameter_names or [])
        return self.fit_cycles([cycle], observed, x0, sigma=sigma, weights=weights)

    def fit_cycles(self, cycles: Sequence[Cycle], observed: Any, x0: Any, *, sigma: Any = 1.0,
                   weights: Any = 1.0, checkpoint: str | Path | None = None
                   ) -> LevenbergMarquardt:
        """Run several cycles (e.g. growing node counts), each from the last.

        Parameters
        ----------
        cycles
            The :class:`Cycle` list; cycle ``k > 0`` starts from
            ``cycles[k].transfer(x_{k-1})``.
        observed, x0, sigma, weights
            As in :meth:`fit` (``x0`` in the first cycle's parametrisation).
        checkpoint
            netCDF file written after every cycle; if it exists, the cycles
            it records are skipped and the run resumes from its solution.
        """
        obs = torch.as_tensor(observed, dtype=self.dtype, device=self.device)
        if obs.ndim != 2:
            raise ValueError(f"observed must have shape (pixels, m), got {tuple(obs.shape)}")
        obs, sqrt_w = _weighted_data(obs, sigma, weights, self.dtype, self.device)

        start_cycle = 0
        x = None
        if checkpoint is not None and Path(checkpoint).exists():
            done, x = self._read_checkpoint(checkpoint, obs.shape[0])
            start_cycle = done + 1
        result = None
        for k, cycle in enumerate(cycles):
            if k < start_cycle:
                continue
            if x is None:
                x_start = torch.as_tensor(x0, dtype=self.dtype, device=self.device)
            else:
                x_start = cycle.transfer(x) if cycle.transfer is not None else x
            result = self._fit_restarts(cycle, obs, sqrt_w, x_start)
            x = result.x
            if checkpoint is not None:
                self._write_checkpoint(checkpoint, result, k)
        if result is None:  # everything came from the checkpoint
            cycle = cycles[-1]
            result = self._fit_restarts(dataclasses.replace(cycle, max_iter=0), obs, sqrt_w, x)
        self._set_result(result)
        return self

    def to_dataset(self, **kwargs):
        """``result_.to_dataset(**kwargs)``."""
        self._check_fitted()
        return self.result_.to_dataset(**kwargs)

    def save(self, path: str | Path, **kwargs) -> Path:
        """Write the result as netCDF (h5netcdf); returns the path."""
        path = Path(path)
        ds = self.to_dataset(**kwargs)
        ds.attrs.update({k: v for k, v in self.get_params().items()
                         if isinstance(v, int | float | str) and not isinstance(v, bool)})
        ds.to_netcdf(path, engine="h5netcdf")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LevenbergMarquardt:
        """Read a file written by :meth:`save` (parameters and results)."""
        import xarray as xr

        with xr.open_dataset(path, engine="h5netcdf") as ds:
            ds = ds.load()
        best = _best_fit_name(ds)
        if ds.attrs.get("method") != "levenberg_marquardt" or best is None:
            raise ValueError(f"{path} is not a Levenberg–Marquardt result file")
        params = {k: ds.attrs[k] for k in cls().get_params() if k in ds.attrs
                  and k not in ("device", "dtype", "jacobian")}
        self = cls(**params)
        n = ds.sizes["parameter"]

        def t(name: str, *tail: int) -> torch.Tensor:
            return torch.as_tensor(ds[name].values.reshape(-1, *tail))

        self._set_result(LMResult(
            x=t(best, n), sigma=t("sigma", n), chi2=t("chi2"), chi2_reduced=t("chi2_reduced"),
            model=torch.empty(0), quality=t("quality").to(torch.int64), n_iter=t("n_iter"),
            lam=t("marquardt_lambda"), parameter_names=[str(v) for v in ds.parameter.values]))
        return self

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (scikit-learn convention)."""
        names = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in names if k != "self"}

    # ------------------------------------------------------------------ internals
    def _check_fitted(self) -> None:
        if not hasattr(self, "result_"):
            raise ValueError("not fitted: call fit() first")

    def _set_result(self, result: LMResult) -> None:
        self.result_ = result
        self.x_ = result.x
        self.sigma_ = result.sigma
        self.chi2_ = result.chi2
        self.quality_ = result.quality

    def _bounds(self, cycle: Cycle, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.full((n,), -torch.inf, dtype=self.dtype, device=self.device)
        hi = torch.full((n,), torch.inf, dtype=self.dtype, device=self.device)
        if cycle.lower is not None:
            lo = torch.broadcast_to(torch.as_tensor(np.array(cycle.lower, dtype=np.float64),
                                                    dtype=self.dtype, device=self.device),
                                    (n,)).clone()
        if cycle.upper is not None:
            hi = torch.broadcast_to(torch.as_tensor(np.array(cycle.upper, dtype=np.float64),
                                                    dtype=self.dtype, device=self.device),
                                    (n,)).clone()
        if bool((lo > hi).any()):
            raise ValueError("lower bound above upper bound for some parameter")
        return lo, hi

    def _fit_restarts(self, cycle: Cycle, obs: torch.Tensor, sqrt_w: torch.Tensor,
                      x0: torch.Tensor) -> LMResult:
        n_pix = obs.shape[0]
        x0 = torch.as_tensor(x0, dtype=self.dtype, device=self.device)
        if x0.ndim == 1:
            x0 = x0.expand(n_pix, -1)
        if x0.ndim != 2 or x0.shape[0] != n_pix:
            raise ValueError(f"x0 must have shape ({n_pix}, n), got {tuple(x0.shape)}")
        n = x0.shape[1]
        names = list(cycle.parameter_names) or [f"p{i}" for i in range(n)]
        if len(names) != n:
            raise ValueError(f"{len(names)} parameter names for {n} parameters")
        lo, hi = self._bounds(cycle, n)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        span = torch.where(torch.isfinite(hi - lo), hi - lo, x0.abs().mean(0) + 1.0)
        best = None
        for restart in range(self.n_restarts + 1):
            start = x0.clone()
            if restart > 0:
                noise = torch.randn(x0.shape, generator=gen, dtype=self.dtype).to(self.device)
                start = start + self.restart_scale * span * noise
            start = torch.minimum(torch.maximum(start, lo), hi)
            max_iter = self.max_iter if cycle.max_iter is None else cycle.max_iter
            best = _merge_best(best, self._run(cycle.forward, obs, sqrt_w, start, lo, hi,
                                               max_iter, names))
        return best

    def _evaluate(self, forward: Forward, x: torch.Tensor, index: torch.Tensor,
                  with_jac: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        use_index = _takes_index(forward)

        def fn(z: torch.Tensor) -> torch.Tensor:
            return forward(z, index=index) if use_index else forward(z)

        if not with_jac:
            with torch.no_grad():
                return fn(x), None
        if callable(self.jacobian):
            return self.jacobian(x, index)
        return jacobian(fn, x, self.jacobian, scale=getattr(self, "_step_scale", None))

    def _run(self, forward: Forward, obs: torch.Tensor, sqrt_w: torch.Tensor, x: torch.Tensor,
             lo: torch.Tensor, hi: torch.Tensor, max_iter: int, names: list[str]) -> LMResult:
        n_pix, n = x.shape
        span = (hi - lo).reshape(-1, n)
        span = torch.where(torch.isfinite(span) & (span > 0), span, torch.ones_like(span))
        self._step_scale = span.amin(0)      # finite-difference step floor per parameter
        subset = _takes_index(forward)
        all_idx = torch.arange(n_pix, device=self.device)
        n_data = (sqrt_w > 0).sum(-1).to(self.dtype)
        dof = torch.clamp(n_data - n, min=1.0)

        def weighted(model: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return (model - obs[idx]) * sqrt_w[idx]

        model, jac = self._evaluate(forward, x, all_idx, with_jac=True)
        model = model.detach()
        if tuple(model.shape) != tuple(obs.shape):
            raise ValueError(f"forward model returned shape {tuple(model.shape)}, "
                             f"observed data have shape {tuple(obs.shape)}")
        res = weighted(model, all_idx)
        chi2 = torch.sum(res ** 2, -1)
        lam = torch.full((n_pix,), self.lam0, dtype=self.dtype, device=self.device)
        quality = torch.zeros(n_pix, dtype=torch.int64, device=self.device)
        n_iter = torch.zeros(n_pix, dtype=torch.int64, device=self.device)
        nonfinite = ~torch.isfinite(chi2) | (n_data < n)  # NaN model or too few valid data
        quality[nonfinite] |= FLAG_NAN
        active = ~nonfinite
        converged = torch.zeros(n_pix, dtype=torch.bool, device=self.device)
        jac_all = torch.zeros((n_pix, res.shape[-1], n), dtype=self.dtype, device=self.device)
        jac_all[:] = jac.detach()
        fresh = torch.ones(n_pix, dtype=torch.bool, device=self.device)  # jac_all is current
        # Moré's scaling: the largest weighted column norm of each parameter so far
        col_scale = torch.zeros((n_pix, n), dtype=self.dtype, device=self.device)
        history = [float(torch.nansum(chi2))]

        iterator = range(max_iter)
        if self.progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="LM", leave=False)
        for _ in iterator:
            if not bool(active.any()):
                break
            # Jacobians of active pixels whose parameters changed
            stale = active & ~fresh
            if bool(stale.any()):
                idx = stale.nonzero()[:, 0] if subset else all_idx
                m_new, j_new = self._evaluate(forward, x[idx], idx, with_jac=True)
                keep = stale[idx]
                jac_all[idx[keep]] = j_new.detach()[keep]
                fresh |= stale
            idx = active.nonzero()[:, 0]
            jw = jac_all[idx] * sqrt_w[idx][..., None]
            r_a = res[idx]
            bad_jac = ~torch.isfinite(jw).all(dim=(-1, -2))
            if bool(bad_jac.any()):
                quality[idx[bad_jac]] |= FLAG_NAN
                active[idx[bad_jac]] = False
                keep = ~bad_jac
                idx, jw, r_a = idx[keep], jw[keep], r_a[keep]
                if idx.numel() == 0:
                    break
            descent = -(jw.transpose(-1, -2) @ r_a[..., None])[..., 0]
            held = blocked_at_bounds(x[idx], descent, lo, hi)
            col_scale[idx] = torch.maximum(col_scale[idx], torch.linalg.vector_norm(jw, dim=-2))
            step, _ = solve_damped(jw, r_a, lam[idx], held if bool(held.any()) else None,
                                   scale_floor=col_scale[idx])
            x_try = torch.minimum(torch.maximum(x[idx] + step, lo), hi)
            eval_idx = idx if subset else all_idx
            if subset:
                m_try, _ = self._evaluate(forward, x_try, idx, with_jac=False)
            else:
                x_full = x.clone()
                x_full[idx] = x_try
                m_full, _ = self._evaluate(forward, x_full, eval_idx, with_jac=False)
                m_try = m_full[idx]
            r_try = weighted(m_try, idx)
            chi2_try = torch.sum(r_try ** 2, -1)
            ok = torch.isfinite(chi2_try) & (chi2_try < chi2[idx])
            acc = idx[ok]
            rel = (chi2[acc] - chi2_try[ok]) / torch.clamp(chi2[acc], min=1e-300)
            x[acc] = x_try[ok]
            res[acc] = r_try[ok]
            model[acc] = m_try[ok]
            chi2[acc] = chi2_try[ok]
            fresh[acc] = False
            n_iter[idx] += 1
            lam[acc] = torch.clamp(lam[acc] / self.lam_down, min=self.lam_min)
            rej = idx[~ok]
            lam[rej] = lam[rej] * self.lam_up
            # convergence tests
            done = torch.zeros(n_pix, dtype=torch.bool, device=self.device)
            done[acc] = rel < self.ftol
            done |= active & (chi2 <= self.chi2_floor)
            # orthogonality test at the accepted pixels' previous Jacobian
            cos = self._max_cosine(jw, r_a)
            done[idx[cos < self.gtol]] = True
            stalled = active & ~done & (lam > self.lam_max)
            if bool(stalled.any()):
                sidx = stalled.nonzero()[:, 0]
                pos = torch.searchsorted(idx, sidx)
                pos = torch.clamp(pos, max=idx.numel() - 1)
                found = idx[pos] == sidx
                _, pred = solve_damped(jw[pos], r_a[pos],
                                       torch.full_like(lam[sidx], 1e-12))
                gain = (chi2[sidx] - pred) / torch.clamp(chi2[sidx], min=1e-300)
                fine = found & (gain < 10 * self.ftol)
                quality[sidx[~fine]] |= FLAG_DIVERGED
                done[sidx] = True
            converged |= done
            active &= ~done
            history.append(float(torch.nansum(chi2)))
        quality[active] |= FLAG_MAX_ITER
        finite_lo = torch.isfinite(lo)
        finite_hi = torch.isfinite(hi)
        tol = 1e-9 * torch.where(torch.isfinite(hi - lo), hi - lo, torch.ones_like(hi))
        at_bound = ((finite_lo & (x - lo <= tol)) | (finite_hi & (hi - x <= tol))).any(-1)
        quality[at_bound] |= FLAG_AT_BOUND
        quality[~torch.isfinite(chi2)] |= FLAG_NAN

        sigma = torch.full_like(x, torch.nan)
        if self.uncertainties:
            if not bool(fresh.all()):
                idx = (~fresh).nonzero()[:, 0] if subset else all_idx
                _, j_new = self._evaluate(forward, x[idx], idx, with_jac=True)
                keep = (~fresh)[idx]
                jac_all[idx[keep]] = j_new.detach()[keep]
            sigma = hessian_sigma(jac_all * sqrt_w[..., None], chi2, dof)
        return LMResult(x=x, sigma=sigma, chi2=chi2, chi2_reduced=chi2 / dof, model=model,
                        quality=quality, n_iter=n_iter, lam=lam, parameter_names=names,
                        history=[history])

    @staticmethod
    def _max_cosine(jw: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        norm_j = torch.linalg.vector_norm(jw, dim=-2)
        norm_r = torch.linalg.vector_norm(res, dim=-1, keepdim=True)
        g = (jw.transpose(-1, -2) @ res[..., None])[..., 0].abs()
        cos = g / torch.clamp(norm_j * norm_r, min=1e-300)
        cos = torch.where(norm_j > 0, cos, torch.zeros_like(cos))
        return cos.amax(-1) if cos.shape[-1] else torch.zeros(cos.shape[0], dtype=cos.dtype)

    def _write_checkpoint(self, path: str | Path, result: LMResult, cycle: int) -> None:
        ds = result.to_dataset()
        ds.attrs["completed_cycle"] = int(cycle)
        tmp = Path(str(path) + ".tmp")
        ds.to_netcdf(tmp, engine="h5netcdf")
        tmp.replace(path)

    def _read_checkpoint(self, path: str | Path, n_pix: int) -> tuple[int, torch.Tensor]:
        import xarray as xr

        with xr.open_dataset(path, engine="h5netcdf") as ds:
            ds = ds.load()
        best = _best_fit_name(ds)
        if "completed_cycle" not in ds.attrs or best is None:
            raise ValueError(f"{path} is not a Levenberg–Marquardt checkpoint")
        x = torch.as_tensor(ds[best].values, dtype=self.dtype, device=self.device)
        if x.shape[0] != n_pix:
            raise ValueError(f"checkpoint {path} has {x.shape[0]} pixels, data have {n_pix}")
        return int(ds.attrs["completed_cycle"]), x


def _best_fit_name(ds: Any) -> str | None:
    """Name of the best-fit parameters in a result file (``x`` in older files)."""
    for name in ("best_fit", "x"):
        if name in ds.variables and "parameter" in ds[name].dims:
            return name
    return None


def hessian_sigma(jw: torch.Tensor, chi2: torch.Tensor, dof: torch.Tensor) -> torch.Tensor:
    """1σ uncertainties ``sqrt(χ²/ν · diag(H⁻¹))`` with ``H = J̃ᵀJ̃``.

    Parameters
    ----------
    jw
        Weighted Jacobian ``(p, m, n)`` (rows multiplied by √w/σ).
    chi2, dof
        χ² and degrees of freedom ``(p,)``.

    Example
    -------
    >>> import torch
    >>> J = torch.ones(1, 4, 1, dtype=torch.float64)  # mean of 4 samples
    >>> float(hessian_sigma(J, torch.tensor([3.0]).double(), torch.tensor([3.0]).double()))
    0.5
    """
    hess = jw.transpose(-1, -2) @ jw
    scale = torch.sqrt(torch.clamp(torch.diagonal(hess, dim1=-2, dim2=-1), min=1e-300))
    hs = hess / (scale[..., :, None] * scale[..., None, :])
    cov_diag = torch.diagonal(torch.linalg.pinv(hs, hermitian=True), dim1=-2, dim2=-1)
    cov_diag = cov_diag / scale ** 2
    sigma = torch.sqrt(torch.clamp(cov_diag * (chi2 / dof)[..., None], min=0.0))
    return torch.where(torch.isfinite(sigma), sigma, torch.full_like(sigma, torch.nan))
