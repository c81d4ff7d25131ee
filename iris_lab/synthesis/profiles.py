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
    0.713825
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


def _far_wing(z: torch.Tensor) -> torch.Tensor:
    """Humlíček (1982, JQSRT 27, 437) region-II approximation of ``w(z)``."""
    t = -1j * z
    u = t * t
    return t * (1.410474 + 0.5641896 * u) / (0.75 + u * (3.0 + u))


def voigt_faraday(
    a: torch.Tensor, v: torch.Tensor, n_terms: int = 24, *, fast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Voigt ``H(a, v)`` and Faraday–Voigt ``L(a, v)`` functions (broadcast).

    Parameters
    ----------
    a
        Damping parameter (≥ 0), real tensor.
    v
        Distance from line centre in Doppler widths, real tensor.
    n_terms
        Terms of the expansion of :func:`faddeeva`.
    fast
        Evaluate the expansion only where ``|v| + a <`` :data:`FAR_WING` and
        the cheap far-wing rational elsewhere (automatically off inside
        ``torch.vmap``, which cannot index by a mask).

    Returns
    -------
    tuple of torch.Tensor
        ``H`` (area √π over ``v``) and ``L`` (odd in ``v``), broadcast shape.

    Example
    -------
    >>> import torch
    >>> h, f = voigt_faraday(torch.tensor(0.0, dtype=torch.float64),
    ...                      torch.tensor([0.0], dtype=torch.float64))
    >>> float(h[0]), float(f[0])
    (1.0, 0.0)
    """
    dtype = torch.promote_types(a.dtype, v.dtype)
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    z = torch.complex(v.to(dtype), a.to(dtype).expand_as(v) if a.dim() <= v.dim()
                      else a.to(dtype))
    if z.dtype != cdtype:
        z = z.to(cdtype)
    if fast and not _batched(z):
        near = (z.real.abs() + z.imag) < FAR_WING
        w = _far_wing(z)
        w = w.index_put((near,), faddeeva(z[near], n_terms))
    else:
        w = faddeeva(z, n_terms)
    return w.real, w.imag


def _batched(x: torch.Tensor) -> bool:
    try:
        bool((x.real.reshape(-1)[:1] > 0).any())
    except RuntimeError:
        return True
    return False
