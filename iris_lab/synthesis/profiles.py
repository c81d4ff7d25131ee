"""Voigt and Faraday–Voigt line profiles in torch (vectorised, differentiable).

The Faddeeva function ``w(z) = exp(-z²) erfc(-i z)`` is evaluated for
``Im z ≥ 0`` with Weideman's (1994, SIAM J. Numer. Anal. 31, 1497) rational
expansion in ``(L + i z) / (L - i z)``: one polynomial for the whole upper
half-plane, so it is branch-free (smooth autodiff, no masked regions) and runs
unchanged on CPU and CUDA. With 24 terms (the default) the error is below
3e-5 of the local value and 1e-10 of the line-centre value for a ≥ 1e-4 (checked against
``scipy.special.wofz`` in the tests).

:func:`voigt_faraday` evaluates the expansion only near line centre
(``|v| + a < 5.5``) and Humlíček's (1982) region-II rational elsewhere, four
times faster with a relative error below 5e-5 everywhere.

Both are evaluated in real arithmetic (:func:`voigt_faraday`); the complex
:func:`faddeeva` is kept as the reference form of the expansion.

The Voigt function is ``H(a, v) = Re w(v + i a)`` and the Faraday–Voigt
(dispersion) function ``L(a, v) = Im w(v + i a)``; both integrate to √π and 0
over ``v``.

Example
-------
>>> import torch
>>> from iris_lab.synthesis.profiles import voigt_faraday
>>> h, f = voigt_faraday(torch.tensor(0.01, dtype=torch.float64),
...                      torch.tensor([0.0, 1.0], dtype=torch.float64))
>>> round(float(h[0]), 4)
0.9888
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["faddeeva", "voigt_faraday", "weideman_coefficients"]


@functools.lru_cache(maxsize=8)
def weideman_coefficients(n_terms: int = 24) -> tuple[float, tuple[float, ...]]:
    """Scale ``L`` and polynomial coefficients of Weideman's expansion.

    Parameters
    ----------
    n_terms
        Number of terms ``N`` of the expansion.

    Returns
    -------
    tuple
        ``(L, coefficients)`` with coefficients ordered from the highest power
        of ``Z`` down to ``Z⁰`` (Horner order).

    Example
    -------
    >>> scale, coefficients = weideman_coefficients(16)
    >>> len(coefficients)
    16
    """
    if n_terms < 4:
        raise ValueError(f"n_terms must be at least 4, not {n_terms}")
    m = 2 * n_terms
    m2 = 2 * m
    k = np.arange(-m + 1, m)
    scale = math.sqrt(n_terms / math.sqrt(2.0))
    theta = k * math.pi / m
    t = scale * np.tan(theta / 2.0)
    f = np.exp(-t**2) * (scale**2 + t**2)
    f = np.concatenate([[0.0], f])
    a = np.real(np.fft.fft(np.fft.fftshift(f))) / m2
    a = np.flipud(a[1:n_terms + 1])
    return scale, tuple(float(x) for x in a)


def faddeeva(z: torch.Tensor, n_terms: int = 24) -> torch.Tensor:
    """The Faddeeva function ``w(z)`` for ``Im z ≥ 0`` (complex tensor in, out).

    Parameters
    ----------
    z
        Complex tensor, any shape, imaginary part ≥ 0.
    n_terms
        Terms of Weideman's expansion (24 gives < 3e-5 relative error for a ≥ 1e-4).

    Example
    -------
    >>> import torch
    >>> w = faddeeva(torch.tensor([0.5 + 0.1j], dtype=torch.complex128))
    >>> round(float(w.real[0]), 6)
    0.717588
    """
    scale, coefficients = weideman_coefficients(n_terms)
    iz = 1j * z
    denominator = scale - iz
    big_z = (scale + iz) / denominator
    poly = torch.full_like(z, coefficients[0])
    for c in coefficients[1:]:
        poly = poly * big_z + c
    return 2.0 * poly / denominator**2 + (1.0 / math.sqrt(math.pi)) / denominator


#: Beyond |v| + a ≥ this, Humlíček's (1982) region-II rational approximation is
#: used (relative error < 5e-5 there, where H < 0.02 of its peak).
FAR_WING = 5.5

_SQRT_PI_INV = 1.0 / math.sqrt(math.pi)


def _far_wing(z: torch.Tensor) -> torch.Tensor:
    """Humlíček (1982, JQSRT 27, 437) region-II approximation of ``w(z)`` (complex)."""
    t = -1j * z
    u = t * t
    return t * (1.410474 + 0.5641896 * u) / (0.75 + u * (3.0 + u))


@functools.lru_cache(maxsize=4)
def _gauss_hermite_pairs(n_points: int = 4) -> tuple[tuple[float, float], ...]:
    """``(x², w)`` of the positive Gauss–Hermite nodes (symmetric pairs)."""
    x, w = np.polynomial.hermite.hermgauss(n_points)
    return tuple((float(xi * xi), float(wi)) for xi, wi in zip(x, w, strict=True) if xi > 0)


def _far_wing_real(a: torch.Tensor, v: torch.Tensor, faraday: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Humlíček's region II (:func:`_far_wing`) in real arithmetic.

    His rational is the 4-point Gauss–Hermite quadrature
    ``w(z) ≈ (i/π) Σ_j w_j / (z − x_j)``; summing each ± pair of nodes with
    ``s = v² + a²`` and ``d = (s + x²)² − 4 x² v²`` gives
    ``H = (2a/π) Σ w (s + x²) / d`` and ``L = (2v/π) Σ w (s − x²) / d``:
    about a dozen real operations per point for ``H``.
    """
    v2 = v * v
    s = v2 + a * a
    h = l_ = None
    for x2, w in _gauss_hermite_pairs(4):
        n = s + x2
        d = n * n - (4.0 * x2) * v2
        h = torch.div(n, d) * w if h is None else h + torch.div(n, d) * w
        if faraday:
            m = (s - x2) / d * w
            l_ = m if l_ is None else l_ + m
    h = h * (a * (2.0 / math.pi))
    return h, (l_ * v * (2.0 / math.pi) if faraday else None)


def _weideman_real(a: torch.Tensor, v: torch.Tensor, n_terms: int, faraday: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`faddeeva` at ``z = v + i a`` in real arithmetic (same expansion).

    ``Z = (L + i z) / (L − i z) = ((L² − a² − v²) + 2 i L v) / ((L + a)² + v²)``
    and ``w = 2 P(Z) / (L − i z)² + 1 / (√π (L − i z))``.
    """
    scale, coefficients = weideman_coefficients(n_terms)
    la = scale + a
    d2 = la * la + v * v
    inv_d2 = 1.0 / d2
    zr = (scale * scale - a * a - v * v) * inv_d2
    zi = (2.0 * scale) * v * inv_d2
    # P(Z) with real coefficients by the second-order (Goertzel) recurrence
    # b_k = c_k + 2 Re Z b_{k+1} − |Z|² b_{k+2}, which gives
    # P(Z) = (b_0 − Re Z b_1) + i Im Z b_1: one real sequence, half the work
    # of complex Horner.
    two_x = 2.0 * zr
    r2 = zr * zr + zi * zi
    b1 = torch.full_like(zr, coefficients[0])
    b2 = torch.zeros_like(zr)
    for c in coefficients[1:]:
        b1, b2 = torch.addcmul(two_x * b1 + c, r2, b2, value=-1.0), b1
    pr, pi = b1 - zr * b2, zi * b2
    ir, ii = la * inv_d2, v * inv_d2                    # 1 / (L − i z)
    sr, si = ir * ir - ii * ii, 2.0 * ir * ii           # 1 / (L − i z)²
    h = 2.0 * (pr * sr - pi * si) + _SQRT_PI_INV * ir
    return h, (2.0 * (pr * si + pi * sr) + _SQRT_PI_INV * ii if faraday else None)


def voigt_faraday(
    a: torch.Tensor, v: torch.Tensor, n_terms: int = 24, *, fast: bool = True,
    faraday: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Voigt ``H(a, v)`` and Faraday–Voigt ``L(a, v)`` functions (broadcast).

    Real arithmetic throughout (no complex tensors), so it is fast on CPU,
    runs unchanged on CUDA and differentiates in forward and reverse mode.

    Parameters
    ----------
    a
        Damping parameter (≥ 0), real tensor.
    v
        Distance from line centre in Doppler widths, real tensor.
    n_terms
        Terms of Weideman's expansion (see :func:`faddeeva`).
    fast
        Evaluate the expansion only where ``|v| + a <`` :data:`FAR_WING` and
        Humlíček's far-wing rational elsewhere (automatically off inside
        ``torch.vmap``, which cannot index by a mask).
    faraday
        Also compute ``L`` (``False`` returns ``None`` in its place and saves
        about a third of the work, for Stokes I only).

    Returns
    -------
    tuple of torch.Tensor
        ``H`` (area √π over ``v``) and ``L`` (odd in ``v``), broadcast shape.

    Example
    -------
    >>> import torch
    >>> h, f = voigt_faraday(torch.tensor(0.0, dtype=torch.float64),
    ...                      torch.tensor([0.0], dtype=torch.float64))
    >>> round(float(h[0]), 9), float(f[0])
    (1.0, 0.0)
    """
    dtype = torch.promote_types(a.dtype, v.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    a, v = a.to(dtype), v.to(dtype)
    if fast and not _batched(v):
        h, l_ = _far_wing_real(a, v, faraday)
        near = (v.abs() + a) < FAR_WING
        if not bool(near.any()):
            return h, l_
        # Weideman only inside the slab of the last-but-one axis that holds
        # every near-core point: for line profiles on a (..., λ, depth) grid
        # this is a band of wavelengths; slicing beats gathering the points.
        shape = torch.broadcast_shapes(a.shape, v.shape)
        near = near.expand(shape)
        axis = -2 if len(shape) >= 2 else -1
        rows = near.reshape(-1, *shape[axis:]).any(0)
        rows = rows.any(-1) if axis == -2 else rows
        where = rows.nonzero()
        lo, hi = int(where[0]), int(where[-1]) + 1
        a_s, v_s = (x.expand(shape).narrow(axis, lo, hi - lo) for x in (a, v))
        h_s, l_s = _weideman_real(a_s, v_s, n_terms, faraday)
        near_s = near.narrow(axis, lo, hi - lo)
        h = _splice(h.expand(shape), torch.where(near_s, h_s, h.expand(shape).narrow(
            axis, lo, hi - lo)), axis, lo, hi)
        if faraday:
            l_ = _splice(l_.expand(shape), torch.where(near_s, l_s, l_.expand(shape).narrow(
                axis, lo, hi - lo)), axis, lo, hi)
        return h, l_
    return _weideman_real(a, v, n_terms, faraday)


def _splice(full: torch.Tensor, middle: torch.Tensor, axis: int, lo: int, hi: int
            ) -> torch.Tensor:
    """``full`` with ``[lo:hi]`` along ``axis`` replaced by ``middle``."""
    n = full.shape[axis]
    parts = [full.narrow(axis, 0, lo)] if lo > 0 else []
    parts.append(middle)
    if hi < n:
        parts.append(full.narrow(axis, hi, n - hi))
    return torch.cat(parts, dim=axis) if len(parts) > 1 else middle


def _batched(x: torch.Tensor) -> bool:
    try:
        bool((x.reshape(-1)[:1] > 0).any())
    except RuntimeError:
        return True
    return False
