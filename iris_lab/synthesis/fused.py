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
  solution (:func:`iris_lab.synthesis.formal.bezier_intensity`);
* :func:`polarized_lines` — the polarized propagation matrix: per line and
  Zeeman component ``H`` and the Faraday–Voigt ``L`` (same far wing, core
  and switch), summed into the σ_b, π, σ_r groups and combined with the
  field's inclination and azimuth into η_I … ρ_V;
* :func:`delo_bezier` — the polarized DELO-Bézier formal solution
  (:func:`iris_lab.synthesis.formal.delo_bezier`, thermalised boundary).

The kernels release the GIL and take a row range: :func:`add_lines`,
:func:`polarized_lines` and :func:`delo_bezier` split their rows (pixels,
perturbed copies, rays) into one block per thread of
``torch.get_num_threads()``, with the same result bit for bit.

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
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import torch

from iris_lab.synthesis import formal
from iris_lab.synthesis.profiles import (
    FAR_WING,
    _gauss_hermite_pairs,
    weideman_coefficients,
)

__all__ = ["add_lines", "available", "bezier_intensity", "delo_bezier", "polarized_lines", "usable"]

_TWO_OVER_PI = 2.0 / math.pi
_SQRT_PI_INV = 1.0 / math.sqrt(math.pi)
#: Rows below which a thread is not worth starting (a row is one pixel, or one
#: pixel's perturbed copy, of tens of wavelengths × depths: ~50 µs or more).
_MIN_ROWS_PER_THREAD = 4
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
               pairs, coefficients, scale, far_wing, b_start, b_stop):
    """``out (B, Λ, D) += Σ_k strength_k H(a_k, v_k)`` inside each window, for
    the rows ``b_start … b_stop − 1``."""
    n_lines, depth = centre.shape[1:]
    x0, w0 = pairs[0, 0], pairs[0, 1]
    x1, w1 = pairs[1, 0], pairs[1, 1]
    h = np.empty(depth)
    v = np.empty(depth)
    work = np.empty((6, depth))
    for b in range(b_start, b_stop):
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
        x, y = _weideman_z(scale, aa, vv, 1.0 / (la * la + vv * vv))
        zr[d] = x
        zi[d] = y
        two_x[d] = 2.0 * x
        r2[d] = x * x + y * y
        b1[d] = c0
        b2[d] = 0.0
    # P(Z) by the Goertzel recurrence b_t = c_t + 2 Re Z b_{t+1} − |Z|² b_{t+2},
    # two terms per pass (the two buffers swap roles)
    b1, b2 = _goertzel(b1, b2, two_x, r2, coefficients, 1, depth)
    for d in range(depth):
        aa = a[d]
        vv = v[d]
        la = scale + aa
        core, _ = _weideman_hl(b1[d], b2[d], zr[d], zi[d], la, vv, 1.0 / (la * la + vv * vv))
        h[d] = core if abs(vv) + aa < far_wing else h[d]


def _weideman_z(scale, a, v, inv_d2):
    """``Z = (L + i(v + i a)) / (L − i(v + i a))`` of Weideman's expansion as
    ``(Re Z, Im Z)``, given ``inv_d2 = 1 / ((L + a)² + v²)``."""
    return (scale * scale - a * a - v * v) * inv_d2, (2.0 * scale) * v * inv_d2


def _weideman_hl(b1, b2, zr, zi, la, v, inv_d2):
    """``(H, L)`` at one point from the Goertzel sums ``b1 = P``, ``b2`` of
    ``Z = zr + i zi`` and ``1 / (L + a − i v)`` (``la = L + a``,
    ``inv_d2 = 1 / |L + a − i v|²``): ``2 P(Z) / (L + a − i v)² + 1/√π / (L + a − i v)``."""
    pr = b1 - zr * b2
    pi = zi * b2
    ir = la * inv_d2
    ii = v * inv_d2
    sr = ir * ir - ii * ii
    si = 2.0 * ir * ii
    return (2.0 * (pr * sr - pi * si) + _SQRT_PI_INV * ir,
            2.0 * (pr * si + pi * sr) + _SQRT_PI_INV * ii)


def _goertzel(b1, b2, two_x, r2, coefficients, start, n):
    """Goertzel passes ``b_t = c_t + 2 Re Z b_{t+1} − |Z|² b_{t+2}`` for the
    terms ``start …`` of ``coefficients`` on the first ``n`` points, two terms
    per pass (the two buffers swap roles); returns the buffers ``(b1, b2)``."""
    n_terms = coefficients.shape[0]
    t = start
    while t + 1 < n_terms:
        c = coefficients[t]
        c_next = coefficients[t + 1]
        for d in range(n):
            x = two_x[d]
            r = r2[d]
            newer = (x * b1[d] + c) - r * b2[d]
            b2[d] = (x * newer + c_next) - r * b1[d]
            b1[d] = newer
        b1, b2 = b2, b1
        t += 2
    if t < n_terms:
        c = coefficients[t]
        for d in range(n):
            newer = (two_x[d] * b1[d] + c) - r2[d] * b2[d]
            b2[d] = b1[d]
            b1[d] = newer
    return b1, b2


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


def _polarized_lines(out, continuum, angles, lam, centre, inv_doppler, damping, strength,
                     larmor, j0, j1, first, group, shift, weight, pairs, coefficients,
                     scale, far_wing, order, starts, u_start, u_stop):
    """``out (7, B, Λ, D)``: η_I (with ``continuum``), η_Q, η_U, η_V, ρ_Q, ρ_U, ρ_V,
    for the row groups ``u_start … u_stop − 1``.

    Group ``u`` is the rows ``order[starts[u]:starts[u + 1]]``, which share
    ``centre``, ``inv_doppler``, ``damping`` and ``larmor`` (the line profiles):
    the profiles are computed once, from the group's first row, and summed with
    each row's own ``strength``, then combined with its own ``angles`` and
    ``continuum`` (a group of one row is the plain computation).

    Per Zeeman group (σ_b, π, σ_r) ``Σ_k S_k Σ_c w_c H`` and the same with
    ``L``, each line inside its window, combined with ``angles (5, B, D)``:
    sin²γ, 1 + cos²γ, cos γ, cos 2χ, sin 2χ. Line ``k`` owns the components
    ``first[k] … first[k + 1] − 1`` (their ``group``, ``shift`` [Δλ_B] and
    ``weight``); sums and the combination run in the torch path's order
    (components within a group, then lines). The inner loops run along
    wavelength (a line's window) at one depth: the near-core points of a
    component are one contiguous span there, and the spans of all the
    line's components go through Weideman's expansion together.
    """
    n_lines, depth = centre.shape[1:]
    n_lambda = lam.shape[0]
    x0, w0 = pairs[0, 0], pairs[0, 1]
    x1, w1 = pairs[1, 0], pairs[1, 1]
    n_comp_max = 1
    for k in range(n_lines):
        n_comp_max = max(n_comp_max, first[k + 1] - first[k])
    h = np.empty((n_comp_max, n_lambda))
    l_ = np.empty((n_comp_max, n_lambda))
    spans = np.empty((n_comp_max, 3), dtype=np.int64)
    g = np.empty((6, n_lambda))
    work = np.empty((10, n_comp_max * n_lambda))
    n_dep_max = 1
    for u in range(u_start, u_stop):
        n_dep_max = max(n_dep_max, starts[u + 1] - starts[u])
    acc_all = np.empty((n_dep_max, 6, depth, n_lambda))
    for u in range(u_start, u_stop):
        rows = order[starts[u]:starts[u + 1]]
        n_dep = rows.shape[0]
        b = rows[0]
        acc_all[:n_dep] = 0.0
        for k in range(n_lines):
            lo_k, hi_k = j0[k], j1[k]
            if hi_k <= lo_k:
                continue
            window = lam[lo_k:hi_k]
            n = hi_k - lo_k
            c0 = first[k]
            n_comp = first[k + 1] - c0
            for d in range(depth):
                cen = centre[b, k, d]
                inv = inv_doppler[b, k, d]
                a = damping[b, k, d]
                split = larmor[b, k, d]
                packed = work[0]
                m = 0
                for q in range(n_comp):
                    off = shift[c0 + q] * split
                    # v = (λ − cen) · inv − off rises with λ: the points with
                    # |v| + a < far_wing are one span [lo, hi) around v = 0
                    lo, hi = 0, n
                    while lo < hi:
                        mid = (lo + hi) // 2
                        if (window[mid] - cen) * inv - off < 0.0:
                            lo = mid + 1
                        else:
                            hi = mid
                    hi = lo
                    while hi < n and abs((window[hi] - cen) * inv - off) + a < far_wing:
                        hi += 1
                    while lo > 0 and abs((window[lo - 1] - cen) * inv - off) + a < far_wing:
                        lo -= 1
                    hq = h[q]
                    lq = l_[q]
                    for t in range(lo):              # far wing outside the span
                        hq[t], lq[t] = _far_wing_hl((window[t] - cen) * inv - off, a,
                                                    x0, w0, x1, w1)
                    for t in range(hi, n):
                        hq[t], lq[t] = _far_wing_hl((window[t] - cen) * inv - off, a,
                                                    x0, w0, x1, w1)
                    for t in range(lo, hi):          # the span, packed for Weideman
                        packed[m + t - lo] = (window[t] - cen) * inv - off
                    spans[q, 0] = lo
                    spans[q, 1] = hi
                    spans[q, 2] = m
                    m += hi - lo
                if m > 0:                            # Weideman on all spans at once
                    _core_hl(work, m, a, coefficients, scale)
                    core_h = work[8]
                    core_l = work[9]
                    for q in range(n_comp):
                        lo, hi, start = spans[q, 0], spans[q, 1], spans[q, 2]
                        hq = h[q]
                        lq = l_[q]
                        for t in range(lo, hi):
                            hq[t] = core_h[start + t - lo]
                            lq[t] = core_l[start + t - lo]
                g[:, :n] = 0.0
                for q in range(n_comp):
                    wc = weight[c0 + q]
                    gh = g[group[c0 + q]]
                    gl = g[group[c0 + q] + 3]
                    hq = h[q]
                    lq = l_[q]
                    for t in range(n):
                        gh[t] += wc * hq[t]
                        gl[t] += wc * lq[t]
                for i in range(n_dep):
                    s = strength[rows[i], k, d]
                    acc = acc_all[i]
                    for p in range(6):
                        row = acc[p, d, lo_k:hi_k]
                        gp = g[p]
                        for t in range(n):
                            row[t] += s * gp[t]
        for i in range(n_dep):
            b = rows[i]
            acc = acc_all[i]
            sin2, one_cos2, cos_g = angles[0, b], angles[1, b], angles[2, b]
            cos2chi, sin2chi = angles[3, b], angles[4, b]
            for j in range(n_lambda):
                for d in range(depth):
                    for p in range(2):               # η, then ρ
                        blue = acc[3 * p, d, j]
                        pi = acc[3 * p + 1, d, j]
                        red = acc[3 * p + 2, d, j]
                        sigma = 0.5 * (blue + red)
                        lin = 0.5 * (pi - sigma) * sin2[d]
                        if p == 0:
                            i_term = 0.5 * (pi * sin2[d] + sigma * one_cos2[d])
                            out[0, b, j, d] = continuum[b, j, d] + i_term
                        out[1 + 3 * p, b, j, d] = lin * cos2chi[d]
                        out[2 + 3 * p, b, j, d] = lin * sin2chi[d]
                        out[3 + 3 * p, b, j, d] = 0.5 * (red - blue) * cos_g[d]


def _far_wing_hl(v, a, x0, w0, x1, w1):
    """``(H, L)`` of Humlíček's region II as two Gauss–Hermite pairs (see profiles)."""
    v2 = v * v
    s = v2 + a * a
    n0 = s + x0
    n1 = s + x1
    d0 = n0 * n0 - (4.0 * x0) * v2
    d1 = n1 * n1 - (4.0 * x1) * v2
    i0 = 1.0 / d0                       # two divisions instead of four (a
    i1 = 1.0 / d1                       # rounding apart, profiles' arithmetic)
    h = (n0 * i0) * w0
    h = h + (n1 * i1) * w1
    f = (s - x0) * i0 * w0
    f = f + (s - x1) * i1 * w1
    return h * (a * _TWO_OVER_PI), f * v * _TWO_OVER_PI


def _core_hl(work, n, a, coefficients, scale):
    """Weideman's expansion of ``(H, L)`` at ``n`` points ``v = work[0, :n]``
    of damping ``a`` into ``work[8, :n]``, ``work[9, :n]`` (the arithmetic of
    :func:`_core`; rows 1-7 are scratch)."""
    v = work[0]
    zr, zi, two_x, r2, b1, b2 = work[1], work[2], work[3], work[4], work[5], work[6]
    inverse, h, l_ = work[7], work[8], work[9]
    c0 = coefficients[0]
    la = scale + a
    for t in range(n):
        vv = v[t]
        inv_d2 = 1.0 / (la * la + vv * vv)
        inverse[t] = inv_d2
        x, y = _weideman_z(scale, a, vv, inv_d2)
        zr[t] = x
        zi[t] = y
        two_x[t] = 2.0 * x
        r2[t] = x * x + y * y
        b1[t] = c0
        b2[t] = 0.0
    # P(Z) by the Goertzel recurrence (see _core), eight, then two, then one
    # term(s) per pass (the same operations; fewer loads and stores)
    n_terms = coefficients.shape[0]
    i = 1
    while i + 7 < n_terms:
        c = coefficients[i:i + 8]
        for t in range(n):
            x = two_x[t]
            r = r2[t]
            q0 = b2[t]
            q1 = b1[t]
            q2 = (x * q1 + c[0]) - r * q0
            q3 = (x * q2 + c[1]) - r * q1
            q4 = (x * q3 + c[2]) - r * q2
            q5 = (x * q4 + c[3]) - r * q3
            q6 = (x * q5 + c[4]) - r * q4
            q7 = (x * q6 + c[5]) - r * q5
            q8 = (x * q7 + c[6]) - r * q6
            q9 = (x * q8 + c[7]) - r * q7
            b1[t] = q9
            b2[t] = q8
        i += 8
    b1, b2 = _goertzel(b1, b2, two_x, r2, coefficients, i, n)
    for t in range(n):
        h[t], l_[t] = _weideman_hl(b1[t], b2[t], zr[t], zi[t], la, v[t], inverse[t])


def _delo_bezier(tau, planck, eq, eu, ev, rq, ru, rv, series, small_step, out, r_start,
                 r_stop):
    """Emergent Stokes vector ``out (R, 4)`` of the rows ``r_start … r_stop − 1``
    of the (R, D) inputs.

    The DELO-Bézier recursion of :func:`iris_lab.synthesis.formal.delo_bezier`
    from the thermalised bottom up, one ray at a time (its state stays in
    registers). ``series``: the five 9-term Taylor series of the weights
    (ψ₀, ψ_u, w₀, w_c, w_u) used below ``small_step``.
    """
    depth = tau.shape[1]
    last = depth - 1
    for r in range(r_start, r_stop):
        t_r, p_r = tau[r], planck[r]
        eq_r, eu_r, ev_r = eq[r], eu[r], ev[r]
        rq_r, ru_r, rv_r = rq[r], ru[r], rv[r]
        step = t_r[last] - t_r[last - 1]
        p0, p1 = p_r[last - 1], p_r[last]
        si = p1 + (p1 - p0) / step                # thermalised: (B + dB/dτ, 0, 0, 0)
        sq = 0.0
        su = 0.0
        sv = 0.0
        # derivatives of the sources at the lower point (one-sided at the bottom)
        d_i = (p1 - p0) / step
        d_q = (p1 * eq_r[last] - p0 * eq_r[last - 1]) / step
        d_u = (p1 * eu_r[last] - p0 * eu_r[last - 1]) / step
        d_v = (p1 * ev_r[last] - p0 * ev_r[last - 1]) / step
        # slopes of the current interval (the one above becomes the next)
        g_i, g_q, g_u, g_v = d_i, d_q, d_u, d_v
        for k in range(last - 1, -1, -1):
            t0 = t_r[k]
            step = t_r[k + 1] - t0
            decay = math.exp(-step) if step >= small_step else _exp_small(step)
            psi0, psiu, w0, wc, wu = _delo_weights(step, decay, series, small_step)
            # sources (B, B η_Q/η_I, …) at k, k + 1 and their control points
            p0, p1 = p_r[k], p_r[k + 1]
            eq0, eu0, ev0 = eq_r[k], eu_r[k], ev_r[k]
            eq1, eu1, ev1 = eq_r[k + 1], eu_r[k + 1], ev_r[k + 1]
            si0, sq0, su0, sv0 = p0, p0 * eq0, p0 * eu0, p0 * ev0
            si1, sq1, su1, sv1 = p1, p1 * eq1, p1 * eu1, p1 * ev1
            outer = k == 0
            km = max(k - 1, 0)
            h_up = t0 - t_r[km]
            pm = p_r[km]
            up_i = (si0 - pm) / h_up
            up_q = (sq0 - pm * eq_r[km]) / h_up
            up_u = (su0 - pm * eu_r[km]) / h_up
            up_v = (sv0 - pm * ev_r[km]) / h_up
            ci, d_i = _control(si0, si1, g_i, up_i, step, h_up, d_i, outer)
            cq, d_q = _control(sq0, sq1, g_q, up_q, step, h_up, d_q, outer)
            cu, d_u = _control(su0, su1, g_u, up_u, step, h_up, d_u, outer)
            cv, d_v = _control(sv0, sv1, g_v, up_v, step, h_up, d_v, outer)
            g_i, g_q, g_u, g_v = up_i, up_q, up_u, up_v
            # rhs = e I_u − ψ_u K′_u I_u + w₀ S₀ + w_c S_c + w_u S_u
            rq1, ru1, rv1 = rq_r[k + 1], ru_r[k + 1], rv_r[k + 1]
            ki = eq1 * sq + eu1 * su + ev1 * sv
            kq = eq1 * si + rv1 * su - ru1 * sv
            ku = eu1 * si - rv1 * sq + rq1 * sv
            kv = ev1 * si + ru1 * sq - rq1 * su
            bi = decay * si - psiu * ki + w0 * si0 + wc * ci + wu * si1
            bq = decay * sq - psiu * kq + w0 * sq0 + wc * cq + wu * sq1
            bu = decay * su - psiu * ku + w0 * su0 + wc * cu + wu * su1
            bv = decay * sv - psiu * kv + w0 * sv0 + wc * cv + wu * sv1
            si, sq, su, sv = _solve(psi0 * eq0, psi0 * eu0, psi0 * ev0, psi0 * rq_r[k],
                                    psi0 * ru_r[k], psi0 * rv_r[k], bi, bq, bu, bv)
        out[r, 0] = si
        out[r, 1] = sq
        out[r, 2] = su
        out[r, 3] = sv


def _control(s0, s1, slope, slope_up, step, h_up, deriv_low, outer):
    """Clamped Bézier control point of the interval [s0 (top), s1] (slope
    ``slope``) and the derivative at ``s0`` (Fritsch–Butland with the slope
    ``slope_up`` of the interval above, one-sided at the top)."""
    deriv_high = slope
    if not outer:
        deriv_high = _fritsch_butland(slope_up, slope, h_up, step)
    upper = s0 + 0.5 * step * deriv_high
    lower = s1 - 0.5 * step * deriv_low
    control = 0.5 * (upper + lower)
    low = s0 if s0 < s1 else s1
    high = s1 if s0 < s1 else s0
    control = low if control < low else control
    control = high if control > high else control
    return control, deriv_high


def _delo_weights(step, decay, series, small_step):
    """``(ψ₀, ψ_u, w₀, w_c, w_u)`` of one interval (see formal._weights)."""
    inv = 1.0 / step
    e0 = 1.0 - decay
    e1d = (1.0 - decay * (1.0 + step)) * inv
    e2d2 = (2.0 - decay * (step * step + 2.0 * step + 2.0)) * inv * inv
    small = step < small_step
    return (_horner9(series[0], step) * step if small else e0 - e1d,
            _horner9(series[1], step) * step if small else e1d,
            _horner9(series[2], step) * step if small else e0 - 2.0 * e1d + e2d2,
            2.0 * (_horner9(series[3], step) * step) if small else 2.0 * (e1d - e2d2),
            _horner9(series[4], step) * step if small else e2d2)


def _solve(eq, eu, ev, rq, ru, rv, i, q, u, v):
    """``(1 + K′) x = (i, q, u, v)`` in closed form (formal.solve_one_plus_kprime)."""
    e2 = eq * eq + eu * eu + ev * ev
    r2 = rq * rq + ru * ru + rv * rv
    theta = eq * rq + eu * ru + ev * rv
    det = 1.0 - e2 + r2 - theta * theta
    m00 = 1.0 + r2
    m01 = -eq * (1.0 + rq * rq) - eu * (rq * ru + rv) + ev * (ru - rq * rv)
    m02 = eq * (rv - rq * ru) - eu * (1.0 + ru * ru) - ev * (rq + ru * rv)
    m03 = -eq * (rq * rv + ru) + eu * (rq - ru * rv) - ev * (1.0 + rv * rv)
    m10 = -eq * (1.0 + rq * rq) + eu * (rv - rq * ru) - ev * (rq * rv + ru)
    m11 = 1.0 - eu * eu - ev * ev + rq * rq
    m12 = eq * (eu + ev * rq) + eu * ev * ru + ev * ev * rv + rq * ru - rv
    m13 = eq * (ev - eu * rq) - eu * eu * ru - eu * ev * rv + rq * rv + ru
    m20 = -eq * (rq * ru + rv) - eu * (1.0 + ru * ru) + ev * (rq - ru * rv)
    m21 = eq * (eu - ev * rq) - eu * ev * ru - ev * ev * rv + rq * ru + rv
    m22 = 1.0 - eq * eq - ev * ev + ru * ru
    m23 = eq * eq * rq + eq * (eu * ru + ev * rv) + eu * ev - rq + ru * rv
    m30 = eq * (ru - rq * rv) - eu * (rq + ru * rv) - ev * (1.0 + rv * rv)
    m31 = eq * (eu * rq + ev) + eu * eu * ru + eu * ev * rv + rq * rv - ru
    m32 = -eq * eq * rq - eq * (eu * ru + ev * rv) + eu * ev + rq + ru * rv
    m33 = 1.0 - eq * eq - eu * eu + rv * rv
    return ((m00 * i + m01 * q + m02 * u + m03 * v) / det,
            (m10 * i + m11 * q + m12 * u + m13 * v) / det,
            (m20 * i + m21 * q + m22 * u + m23 * v) / det,
            (m30 * i + m31 * q + m32 * u + m33 * v) / det)


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
                 "_all_below", "_exp_small", "_far_wing_hl", "_control", "_delo_weights",
                 "_solve", "_goertzel", "_weideman_z", "_weideman_hl"):
        namespace[name] = compiled(globals()[name], inline="always")
    namespace["_core"] = compiled(_core)
    namespace["_core_hl"] = compiled(_core_hl)
    return SimpleNamespace(add_lines=compiled(_add_lines),
                           bezier_intensity=compiled(_bezier_intensity),
                           polarized_lines=compiled(_polarized_lines),
                           delo_bezier=compiled(_delo_bezier))


@functools.lru_cache(maxsize=8)
def _constants(n_terms: int) -> tuple[np.ndarray, np.ndarray, float]:
    scale, coefficients = weideman_coefficients(n_terms)
    pairs = np.array(_gauss_hermite_pairs(4), dtype=np.float64)
    return pairs, np.array(coefficients, dtype=np.float64), float(scale)


def _in_threads(kernel, n_rows: int, *args) -> None:
    """``kernel(*args, start, stop)`` over the rows ``0 … n_rows − 1`` in
    contiguous blocks, one per thread of ``torch.get_num_threads()`` (the
    compiled kernels release the GIL and write disjoint rows of their output;
    each block allocates its own scratch). Every row is computed by the same
    arithmetic whatever the split: the result does not depend on the threads.
    """
    n_threads = max(1, min(torch.get_num_threads(), n_rows // _MIN_ROWS_PER_THREAD))
    if n_threads == 1:
        kernel(*args, 0, n_rows)
        return
    bounds = np.linspace(0, n_rows, n_threads + 1).round().astype(np.int64)
    with ThreadPoolExecutor(n_threads) as pool:
        for done in [pool.submit(kernel, *args, int(bounds[i]), int(bounds[i + 1]))
                     for i in range(n_threads)]:
            done.result()


def _profile_groups(*per_line: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with bit-identical per-line arrays (B, L, D) in groups: ``order``
    lists the rows group by group (first occurrence first), ``starts`` the
    group offsets (CSR). Rows of a finite-difference Jacobian that perturb only
    the field angles or a line's strength (log gf) share their line profiles.

    Example
    -------
    >>> a = np.array([[[1.0]], [[2.0]], [[1.0]]])
    >>> _profile_groups(a)
    (array([0, 2, 1]), array([0, 2, 3]))
    """
    n_rows = per_line[0].shape[0]
    keys = np.ascontiguousarray(np.concatenate([x.reshape(n_rows, -1) for x in per_line], 1))
    _, first, inverse = np.unique(keys.view(np.dtype((np.void, keys.shape[1] * 8))).ravel(),
                                  return_index=True, return_inverse=True)
    # groups numbered by their first row (row order kept), rows stable within a group
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    label = rank[inverse.ravel()]
    order = np.argsort(label, kind="stable").astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(np.bincount(label, minlength=first.size))])
    return order, starts.astype(np.int64)


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
    _in_threads(_compiled().add_lines, out.shape[0], out, lam, *per_line, j0, j1, pairs,
                coefficients, scale, float(FAR_WING))
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


def polarized_lines(
    continuum: torch.Tensor, wavelengths: torch.Tensor, centre: torch.Tensor,
    inv_doppler: torch.Tensor, damping: torch.Tensor, strength: torch.Tensor,
    larmor: torch.Tensor, components: Sequence[Sequence[tuple[int, float, float]]],
    windows: Sequence[tuple[int, int]], inclination: torch.Tensor, azimuth: torch.Tensor,
    n_terms: int = 24,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Polarized propagation-matrix elements of every line, (..., λ, D) each.

    Same result as the polarized loop of
    :meth:`iris_lab.synthesis.lte.LTESynthesizer.propagation`: per line,
    inside its window, per Zeeman component the Voigt ``H`` and
    Faraday–Voigt ``L`` of :func:`~iris_lab.synthesis.profiles.voigt_faraday`
    at ``v − shift · Δλ_B/Δλ_D``, summed with the component weights into the
    σ_b, π, σ_r groups and with the line strength over lines, then combined
    with the field inclination γ and azimuth χ (the same expressions), all
    in one compiled kernel.

    Parameters
    ----------
    continuum
        Continuum opacity (..., λ, D), added to ``η_I``.
    wavelengths
        Grid (λ,) [Å].
    centre, inv_doppler, damping, strength, larmor
        Per line and depth (..., L, D): shifted line centre [Å], inverse
        Doppler width [1/Å], damping ``a``, line-centre opacity factor and
        Zeeman splitting ``Δλ_B / Δλ_D``.
    components
        Per line its Zeeman components ``(group, shift [Δλ_B], weight)``,
        groups 0, 1, 2 = σ_b, π, σ_r.
    windows
        Per line the grid slice ``(j0, j1)`` where its profile is added.
    inclination, azimuth
        Field angles (..., D) [rad].
    n_terms
        Terms of Weideman's expansion.

    Returns
    -------
    tuple of dict
        ``({"i", "q", "u", "v"}: η, {"q", "u", "v"}: ρ)``, unnormalised.

    Example
    -------
    >>> import torch
    >>> grid = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    >>> one = torch.ones(1, 1, dtype=torch.float64)
    >>> zero = torch.zeros(1, dtype=torch.float64)
    >>> eta, rho = polarized_lines(torch.zeros(5, 1, dtype=torch.float64), grid,
    ...                            0 * one, 10 * one, 0 * one, one, 0 * one,
    ...                            [[(1, 0.0, 1.0), (0, -1.0, 1.0), (2, 1.0, 1.0)]],
    ...                            [(0, 5)], zero, zero)
    >>> round(float(eta["i"][2, 0]), 6), float(eta["v"][2, 0])
    (1.0, 0.0)
    """
    n_lambda, depth = continuum.shape[-2:]
    n_lines = centre.shape[-2]
    batch = torch.broadcast_shapes(*(x.shape[:-2] for x in (
        continuum, centre, inv_doppler, damping, strength, larmor)),
        inclination.shape[:-1], azimuth.shape[:-1])
    shape = (*batch, n_lines, depth)
    per_line = [_array(x, shape).reshape(-1, n_lines, depth)
                for x in (centre, inv_doppler, damping, strength, larmor)]
    j0 = np.array([w[0] for w in windows], dtype=np.int64)
    j1 = np.array([w[1] for w in windows], dtype=np.int64)
    first = np.cumsum([0] + [len(c) for c in components]).astype(np.int64)
    flat = [c for line in components for c in line]
    group = np.array([c[0] for c in flat], dtype=np.int64)
    shift = np.array([c[1] for c in flat], dtype=np.float64)
    weight = np.array([c[2] for c in flat], dtype=np.float64)
    pairs, coefficients, scale = _constants(int(n_terms))
    lam = np.ascontiguousarray(wavelengths.detach().numpy(), dtype=np.float64)
    n_flat = per_line[0].shape[0]
    # the torch path's angle factors (…, D), one row each
    angles = torch.stack(torch.broadcast_tensors(
        torch.sin(inclination) ** 2, 1.0 + torch.cos(inclination) ** 2, torch.cos(inclination),
        torch.cos(2.0 * azimuth), torch.sin(2.0 * azimuth)))
    angles = _array(angles, (5, *batch, depth)).reshape(5, n_flat, depth)
    kappa = _array(continuum, (*batch, n_lambda, depth)).reshape(n_flat, n_lambda, depth)
    out = np.empty((7, n_flat, n_lambda, depth))
    order, starts = _profile_groups(per_line[0], per_line[1], per_line[2], per_line[4])
    _in_threads(_compiled().polarized_lines, starts.size - 1, out, kappa, angles, lam,
                *per_line, j0, j1, first, group, shift, weight, pairs, coefficients, scale,
                float(FAR_WING), order, starts)
    e_i, e_q, e_u, e_v, r_q, r_u, r_v = torch.from_numpy(out).reshape(
        7, *batch, n_lambda, depth).unbind(0)
    return {"i": e_i, "q": e_q, "u": e_u, "v": e_v}, {"q": r_q, "u": r_u, "v": r_v}


def delo_bezier(tau: torch.Tensor, planck: torch.Tensor,
                ratios: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`iris_lab.synthesis.formal.delo_bezier` compiled (thermalised
    lower boundary), (..., 4).

    Example
    -------
    >>> import torch
    >>> tau = torch.logspace(-6, 2, 60, dtype=torch.float64)
    >>> zero = torch.zeros_like(tau)
    >>> round(float(delo_bezier(tau, 1.0 + 1.5 * tau, [zero] * 6)[0]), 4)
    2.5
    """
    shape = torch.broadcast_shapes(tau.shape, planck.shape, *(r.shape for r in ratios))
    rows = [_array(x, shape).reshape(-1, shape[-1]) for x in (tau, planck, *ratios)]
    series = tuple(tuple(float(c) for c in formal._SERIES[key])
                   for key in ((0, 1), (1, 0), (0, 2), (1, 1), (2, 0)))
    if any(len(c) != 9 for c in series):
        return formal.delo_bezier(tau, planck, ratios)
    out = np.empty((rows[0].shape[0], 4))
    _in_threads(_compiled().delo_bezier, out.shape[0], *rows, series,
                float(formal._SMALL_STEP), out)
    return torch.from_numpy(out.reshape(*shape[:-1], 4))
