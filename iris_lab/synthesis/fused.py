"""Fused CPU kernels (numba) for the no-grad forward path of the LTE engine.

The torch engine (:mod:`iris_lab.synthesis.lte`) evaluates each line's
Voigt profile with ~20 elementwise kernels per line; on a CPU most of that
time is memory traffic and launch overhead. The kernels here do the same
arithmetic point by point in compiled loops:

* :func:`add_lines` — Stokes-I line opacity of every line added to the
  continuum: Humlíček's region-II far wing (:func:`~iris_lab.synthesis.profiles.
  voigt_faraday`'s Gauss–Hermite pairs) everywhere, Weideman's expansion (the
  same Goertzel recurrence) where ``|v| + a <`` :data:`~iris_lab.synthesis.
  profiles.FAR_WING`, each line only inside its wavelength window;
* :func:`bezier_intensity` — the unpolarized quadratic-Bézier formal
  solution (:func:`iris_lab.synthesis.formal.bezier_intensity`).

They reproduce the torch path to rounding (tested to 1e-10 relative) and are
used only where no derivative is wanted: CPU tensors, no ``requires_grad``,
outside ``torch.func`` transforms and forward-mode AD (:func:`usable`). The
numba functions are compiled on first use (cached on disk by numba), nothing
happens at import, and without numba the torch path runs.

Example
-------
>>> import torch
>>> from iris_lab.synthesis import fused
>>> tau = torch.logspace(-6, 2, 60, dtype=torch.float64)[None]
>>> round(float(fused.bezier_intensity(tau, 1.0 + 1.5 * tau)[0]), 4)
2.5
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch

from iris_lab.synthesis import formal
from iris_lab.synthesis.profiles import (
    FAR_WING,
    _gauss_hermite_pairs,
    weideman_coefficients,
)

__all__ = ["add_lines", "available", "bezier_intensity", "usable"]

_TWO_OVER_PI = 2.0 / math.pi
_SQRT_PI_INV = 1.0 / math.sqrt(math.pi)
#: The formal solution stops where the attenuation e^{-(τ - τ₀)} of every
#: ray is below this (τ - τ₀ > 50: invisible at float64 precision).
_OPAQUE = math.exp(-50.0)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when numba can be imported (the fused path is possible at all).

    Example
    -------
    >>> isinstance(available(), bool)
    True
    """
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def usable(*tensors: torch.Tensor) -> bool:
    """True when the fused kernels may replace torch for these tensors.

    That is: numba is available and every tensor is a plain CPU float64
    tensor that needs no derivative (no ``requires_grad`` under grad mode,
    not wrapped by ``torch.func`` transforms, no forward-mode tangent).

    Example
    -------
    >>> import torch
    >>> x = torch.ones(3, dtype=torch.float64)
    >>> usable(x) == available()
    True
    >>> usable(x.requires_grad_())
    False
    """
    if not available():
        return False
    from torch._C._functorch import is_functorch_wrapped_tensor
    from torch.autograd import forward_ad

    grad = torch.is_grad_enabled()
    for x in tensors:
        if (x.device.type != "cpu" or x.dtype != torch.float64
                or (grad and x.requires_grad) or is_functorch_wrapped_tensor(x)
                or forward_ad.unpack_dual(x).tangent is not None):
            return False
    return True


# ---------------------------------------------------------------------------
# Kernels as plain Python (compiled lazily by numba, see _compiled; they also
# run, slowly, as Python).
def _add_lines(out, lam, centre, inv_doppler, damping, strength, j0, j1,
               pairs, coefficients, scale, far_wing):
    """``out (B, Λ, D) += Σ_k strength_k H(a_k, v_k)`` inside each window."""
    n_batch, n_lines, depth = centre.shape
    x0, w0 = pairs[0, 0], pairs[0, 1]
    x1, w1 = pairs[1, 0], pairs[1, 1]
    h = np.empty(depth)
    v = np.empty(depth)
    work = np.empty((6, depth))
    for b in range(n_batch):
        for k in range(n_lines):
            cen = centre[b, k]
            inv = inv_doppler[b, k]
            a = damping[b, k]
            s = strength[b, k]
            # wavelengths outside [low, high] have |v| + a ≥ far_wing at
            # every depth: far wing only (the slack only sends a few more
            # rows through the exact test below)
            low, high = np.inf, -np.inf
            for d in range(depth):
                if a[d] < far_wing:
                    reach = (far_wing - a[d]) / inv[d]
                    low = min(low, cen[d] - reach)
                    high = max(high, cen[d] + reach)
            if low <= high:
                slack = 1e-9 * (abs(low) + abs(high))
                low, high = low - slack, high + slack
            for j in range(j0[k], j1[k]):
                lj = lam[j]
                row = out[b, j]
                if lj < low or lj > high:
                    for d in range(depth):
                        row[d] += s[d] * _far_wing(lj, cen[d], inv[d], a[d], x0, w0, x1, w1)
                    continue
                for d in range(depth):
                    vv = (lj - cen[d]) * inv[d]
                    v[d] = vv
                    h[d] = _far_wing(lj, cen[d], inv[d], a[d], x0, w0, x1, w1)
                _core(h, v, a, coefficients, scale, far_wing, work)
                for d in range(depth):
                    row[d] += s[d] * h[d]


def _far_wing(lj, cen, inv, a, x0, w0, x1, w1):
    """Humlíček's region II as two Gauss–Hermite pairs (see profiles)."""
    v = (lj - cen) * inv
    v2 = v * v
    s = v2 + a * a
    n0 = s + x0
    n1 = s + x1
    h = (n0 / (n0 * n0 - (4.0 * x0) * v2)) * w0
    h = h + (n1 / (n1 * n1 - (4.0 * x1) * v2)) * w1
    return h * (a * _TWO_OVER_PI)


def _core(h, v, a, coefficients, scale, far_wing, work):
    """Weideman's expansion into ``h`` where ``|v| + a < far_wing``.

    The expansion runs over the whole row (vectorised; most points of a row
    that has any near-core point are near the core) and replaces ``h`` only
    at the near-core points. ``work`` (6, D) is scratch space.
    """
    depth = v.shape[0]
    count = 0
    for d in range(depth):
        count += abs(v[d]) + a[d] < far_wing
    if count == 0:
        return
    zr, zi, two_x, r2, b1, b2 = work[0], work[1], work[2], work[3], work[4], work[5]
    c0 = coefficients[0]
    for d in range(depth):
        aa = a[d]
        vv = v[d]
        la = scale + aa
        inv_d2 = 1.0 / (la * la + vv * vv)
        x = (scale * scale - aa * aa - vv * vv) * inv_d2
        y = (2.0 * scale) * vv * inv_d2
        zr[d] = x
        zi[d] = y
        two_x[d] = 2.0 * x
        r2[d] = x * x + y * y
        b1[d] = c0
        b2[d] = 0.0
    # P(Z) by the Goertzel recurrence b_t = c_t + 2 Re Z b_{t+1} − |Z|² b_{t+2},
    # two terms per pass (the two buffers swap roles)
    n_terms = coefficients.shape[0]
    t = 1
    while t + 1 < n_terms:
        c = coefficients[t]
        c_next = coefficients[t + 1]
        for d in range(depth):
            x = two_x[d]
            r = r2[d]
            newer = (x * b1[d] + c) - r * b2[d]
            b2[d] = (x * newer + c_next) - r * b1[d]
            b1[d] = newer
        b1, b2 = b2, b1
        t += 2
    if t < n_terms:
        c = coefficients[t]
        for d in range(depth):
            newer = (two_x[d] * b1[d] + c) - r2[d] * b2[d]
            b2[d] = b1[d]
            b1[d] = newer
    for d in range(depth):
        aa = a[d]
        vv = v[d]
        la = scale + aa
        inv_d2 = 1.0 / (la * la + vv * vv)
        pr = b1[d] - zr[d] * b2[d]
        pi = zi[d] * b2[d]
        ir = la * inv_d2
        ii = vv * inv_d2
        sr = ir * ir - ii * ii
        si = 2.0 * ir * ii
        core = 2.0 * (pr * sr - pi * si) + _SQRT_PI_INV * ir
        h[d] = core if abs(vv) + aa < far_wing else h[d]


def _bezier_intensity(tau, source, series, small_step, opaque):
    """Emergent intensity per column of ``tau``, ``source`` (D, R) (see formal).

    Depth runs along the first axis so that the loops over the ``R``
    independent rays vectorise. Depths where every ray's attenuation
    ``e^{−(τ − τ₀)}`` is below ``opaque`` are skipped.
    """
    depth, n_rays = tau.shape
    last = depth - 1
    total = np.zeros(n_rays)
    deriv = np.empty(n_rays)
    attenuation = np.ones(n_rays)
    decay = np.empty(n_rays)
    for r in range(n_rays):                        # one-sided at the top
        deriv[r] = (source[1, r] - source[0, r]) / (tau[1, r] - tau[0, r])
    for k in range(last):
        t0, t1, s0, s1 = tau[k], tau[k + 1], source[k], source[k + 1]
        inner = k + 1 < last
        t2, s2 = tau[min(k + 2, last)], source[min(k + 2, last)]
        for r in range(n_rays):                    # libm exp only for thick steps
            step = t1[r] - t0[r]
            decay[r] = math.exp(-step) if step >= small_step else _exp_small(step)
        for r in range(n_rays):                    # branch-free: vectorised
            step = t1[r] - t0[r]
            slope = (s1[r] - s0[r]) / step
            deriv_next = slope                       # one-sided at the bottom
            if inner:
                deriv_next = _fritsch_butland(slope, (s2[r] - s1[r]) / (t2[r] - t1[r]),
                                              step, t2[r] - t1[r])
            upper = s0[r] + 0.5 * step * deriv[r]
            lower = s1[r] - 0.5 * step * deriv_next
            low = s0[r] if s0[r] < s1[r] else s1[r]
            high = s1[r] if s0[r] < s1[r] else s0[r]
            control = 0.5 * (upper + lower)
            control = low if control < low else control
            control = high if control > high else control
            w0, wc, wu = _bezier_weights(step, decay[r], series, small_step)
            total[r] += attenuation[r] * (w0 * s0[r] + wc * control + wu * s1[r])
            attenuation[r] *= decay[r]
            deriv[r] = deriv_next
        if _all_below(attenuation, opaque):
            return total
    for r in range(n_rays):                        # thermalised lower boundary
        boundary = source[last, r] + (source[last, r] - source[last - 1, r]) / (
            tau[last, r] - tau[last - 1, r])
        total[r] += attenuation[r] * boundary
    return total


def _all_below(values, threshold):
    """Whether every element of ``values`` is below ``threshold``."""
    for x in values:
        if x >= threshold:
            return False
    return True


def _fritsch_butland(s0, s1, h0, h1):
    """Non-overshooting derivative between slopes ``s0``, ``s1`` (see formal)."""
    product = s0 * s1
    alpha = (1.0 + h1 / (h0 + h1)) / 3.0
    derivative = product / (alpha * s1 + (1.0 - alpha) * s0)
    return derivative if product > 0 else 0.0


def _bezier_weights(step, decay, series, small_step):
    """``(w₀, w_c, w_u)`` of one interval (``decay = e^{−step}``); the Taylor
    series (``series``: three 9-tuples) below ``small_step``, where the closed
    forms cancel."""
    inv = 1.0 / step
    e0 = 1.0 - decay
    e1d = (1.0 - decay * (1.0 + step)) * inv
    e2d2 = (2.0 - decay * (step * step + 2.0 * step + 2.0)) * inv * inv
    small = step < small_step
    return (_horner9(series[0], step) * step if small else e0 - 2.0 * e1d + e2d2,
            2.0 * (_horner9(series[1], step) * step) if small else 2.0 * (e1d - e2d2),
            _horner9(series[2], step) * step if small else e2d2)


def _exp_small(x):
    """``e^{−x}`` for ``0 ≤ x < 0.05`` by its Taylor series (error < 1e-19)."""
    return _horner9((1.0, -1.0, 1.0 / 2.0, -1.0 / 6.0, 1.0 / 24.0, -1.0 / 120.0,
                     1.0 / 720.0, -1.0 / 5040.0, 1.0 / 40320.0), x) - x ** 9 / 362880.0


def _horner9(c, x):
    """``Σ_n c[n] xⁿ`` for 9 coefficients, unrolled (no loop: vectorisable)."""
    return ((((((((c[8] * x + c[7]) * x + c[6]) * x + c[5]) * x + c[4]) * x + c[3]) * x
              + c[2]) * x + c[1]) * x + c[0])


@functools.lru_cache(maxsize=1)
def _compiled() -> SimpleNamespace:
    """The numba-compiled kernels (compiled on first call, cached on disk)."""
    import numba

    # error_model="numpy": x / 0 gives inf like numpy instead of a Python
    # ZeroDivisionError check, which keeps the loops vectorisable (no
    # fast-math: IEEE results, same rounding as torch's kernels). The small
    # helpers are inlined (a call inside a loop stops its vectorisation).
    options = {"cache": True, "fastmath": False, "nogil": True, "error_model": "numpy"}
    # the functions call each other by their module-level names: compile
    # them in a namespace where those names are the compiled functions
    namespace = dict(globals())

    def compiled(function, **extra):
        rebound = types.FunctionType(function.__code__, namespace, function.__name__)
        return numba.njit(**options, **extra)(rebound)

    for name in ("_far_wing", "_fritsch_butland", "_bezier_weights", "_horner9",
                 "_all_below", "_exp_small"):
        namespace[name] = compiled(globals()[name], inline="always")
    namespace["_core"] = compiled(_core)
    return SimpleNamespace(add_lines=compiled(_add_lines),
                           bezier_intensity=compiled(_bezier_intensity))


@functools.lru_cache(maxsize=8)
def _constants(n_terms: int) -> tuple[np.ndarray, np.ndarray, float]:
    scale, coefficients = weideman_coefficients(n_terms)
    pairs = np.array(_gauss_hermite_pairs(4), dtype=np.float64)
    return pairs, np.array(coefficients, dtype=np.float64), float(scale)


def _array(x: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    return np.ascontiguousarray(x.detach().expand(*shape).numpy(), dtype=np.float64)


def add_lines(
    continuum: torch.Tensor, wavelengths: torch.Tensor, centre: torch.Tensor,
    inv_doppler: torch.Tensor, damping: torch.Tensor, strength: torch.Tensor,
    windows: Sequence[tuple[int, int]], n_terms: int = 24,
) -> torch.Tensor:
    """Continuum plus the Stokes-I opacity of every line, (..., λ, D).

    Same result as the unpolarized loop of
    :meth:`iris_lab.synthesis.lte.LTESynthesizer.propagation`:
    ``κ_c + Σ_k S_k H(a_k, (λ − λ_k) / Δλ_D,k)`` with ``H`` of
    :func:`~iris_lab.synthesis.profiles.voigt_faraday`.

    Parameters
    ----------
    continuum
        Continuum opacity (..., λ, D).
    wavelengths
        Grid (λ,) [Å].
    centre, inv_doppler, damping, strength
        Per line and depth (..., L, D): shifted line centre [Å], inverse
        Doppler width [1/Å], damping ``a`` and line-centre opacity factor.
    windows
        Per line the grid slice ``(j0, j1)`` where its profile is added.
    n_terms
        Terms of Weideman's expansion.

    Example
    -------
    >>> import torch
    >>> grid = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    >>> one = torch.ones(1, 1, dtype=torch.float64)
    >>> kappa = add_lines(torch.zeros(5, 1, dtype=torch.float64), grid, 0 * one,
    ...                   10 * one, 0 * one, one, [(0, 5)])
    >>> round(float(kappa[2, 0]), 6)
    1.0
    """
    n_lambda, depth = continuum.shape[-2:]
    n_lines = centre.shape[-2]
    batch = torch.broadcast_shapes(continuum.shape[:-2], centre.shape[:-2],
                                   inv_doppler.shape[:-2], damping.shape[:-2],
                                   strength.shape[:-2])
    shape = (*batch, n_lines, depth)
    out = np.array(continuum.detach().expand(*batch, n_lambda, depth).numpy(),
                   dtype=np.float64, order="C").reshape(-1, n_lambda, depth)
    per_line = [_array(x, shape).reshape(-1, n_lines, depth)
                for x in (centre, inv_doppler, damping, strength)]
    j0 = np.array([w[0] for w in windows], dtype=np.int64)
    j1 = np.array([w[1] for w in windows], dtype=np.int64)
    pairs, coefficients, scale = _constants(int(n_terms))
    lam = np.ascontiguousarray(wavelengths.detach().numpy(), dtype=np.float64)
    _compiled().add_lines(out, lam, *per_line, j0, j1, pairs, coefficients, scale,
                          float(FAR_WING))
    return torch.from_numpy(out.reshape(*batch, n_lambda, depth))


def bezier_intensity(tau: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """:func:`iris_lab.synthesis.formal.bezier_intensity` compiled, (...,).

    Example
    -------
    >>> import torch
    >>> tau = torch.logspace(-6, 2, 60, dtype=torch.float64)
    >>> round(float(bezier_intensity(tau, 1.0 + 1.5 * tau)), 4)
    2.5
    """
    shape = torch.broadcast_shapes(tau.shape, source.shape)
    t, s = (np.ascontiguousarray(_array(x, shape).reshape(-1, shape[-1]).T)
            for x in (tau, source))
    series = tuple(tuple(float(c) for c in formal._SERIES[key])
                   for key in ((0, 2), (1, 1), (2, 0)))
    if any(len(c) != 9 for c in series):
        return formal.bezier_intensity(tau, source)
    out = _compiled().bezier_intensity(t, s, series, float(formal._SMALL_STEP), _OPAQUE)
    return torch.from_numpy(out.reshape(shape[:-1]))
