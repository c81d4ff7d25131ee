"""Hinode/SP Stokes spectra (Fe I 6301.5/6302.5 Å) and the SP instrument profile.

:func:`read_hinode_sp` reads the small level-1 sample layout used for tests
(primary HDU ``(y, x, stokes, wavelength)`` in data counts, HDU
``WAVELENGTH`` in air Å, HDU ``CONTINUUM_INTENSITY`` with the quiet-Sun
continuum level ``IC_HSRA`` in its header) and returns the spectra
normalised to that level. :func:`read_instrument_profile` reads the
two-column spectral profile (Δλ [Å], relative transmission) and
:func:`instrument_matrix` turns it into a matrix mapping a fine synthesis
grid onto the observed samples. :func:`estimate_noise` measures the noise
from the scatter of Q and U in line-free windows.

A real sample ships with the package (:func:`shipped_sample`: 5 × 5 pixels
of Hinode/SP, 2013-09-12, and the SP instrument profile).

Example
-------
>>> from iris_lab.io.hinode import read_hinode_sp, shipped_sample
>>> cube, profile = shipped_sample()
>>> read_hinode_sp(cube)["spectra"].dims
('y', 'x', 'stokes', 'wavelength')
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

#: Air wavelengths [Å] of the two Fe I lines and of the telluric O2 lines in the window.
FE_6301 = 6301.5008
FE_6302 = 6302.4936
TELLURIC_O2 = (6302.0005, 6302.7640)
#: Half width [Å] of the windows around the telluric O2 lines that fits leave out of
#: Stokes I.
TELLURIC_HALF_WIDTH = 0.04


def telluric_free(wavelength: Any, half_width: float = TELLURIC_HALF_WIDTH) -> np.ndarray:
    """True where a wavelength lies outside the windows around the telluric O2 lines.

    Example
    -------
    >>> telluric_free(np.array([6301.5, 6302.0, 6302.76])).tolist()
    [True, False, False]
    """
    wavelength = np.asarray(wavelength, dtype=float)
    free = np.ones(wavelength.shape, dtype=bool)
    for line in TELLURIC_O2:
        free &= np.abs(wavelength - line) >= half_width
    return free


def shipped_sample() -> tuple[Path, Path]:
    """Paths of the real Hinode/SP sample shipped in ``iris_lab/data``: the cube
    (5 × 5 pixels, 112 wavelengths around Fe I 6301/6302 Å, 2013-09-12) and
    the SP instrument profile (provenance in ``iris_lab/data/README.md``).

    Example
    -------
    >>> [p.name for p in shipped_sample()]
    ['hinode_sp_20130912_5x5.fits', 'hinode_sp_instrument_profile.dat']
    """
    data = Path(__file__).resolve().parent.parent / "data"
    return data / "hinode_sp_20130912_5x5.fits", data / "hinode_sp_instrument_profile.dat"


def read_hinode_sp(path: str | PathLike):
    """Read a Hinode/SP sample cube, normalised to the quiet-Sun continuum.

    Parameters
    ----------
    path
        FITS file (layout in the module docstring).

    Returns
    -------
    xarray.Dataset
        ``spectra (y, x, stokes, wavelength)`` divided by ``IC_HSRA``,
        ``continuum_intensity (y, x)`` (same units), coordinate ``wavelength``
        (air Å); attrs ``ic_hsra`` and ``noise_header`` (the file's NOISE card,
        −1 when unknown).

    Raises
    ------
    ValueError
        If the file lacks the expected HDUs, shapes or ``IC_HSRA``.
    """
    import xarray as xr
    from astropy.io import fits

    path = Path(path)
    with fits.open(path) as hdul:
        names = [h.name for h in hdul]
        for needed in ("WAVELENGTH", "CONTINUUM_INTENSITY"):
            if needed not in names:
                raise ValueError(f"{path.name}: missing HDU {needed!r} (have {names})")
        data = np.asarray(hdul[0].data, dtype=np.float64)
        wave = np.asarray(hdul["WAVELENGTH"].data, dtype=np.float64)
        cont_hdu = hdul["CONTINUUM_INTENSITY"]
        if "IC_HSRA" not in cont_hdu.header:
            raise ValueError(f"{path.name}: CONTINUUM_INTENSITY header has no IC_HSRA")
        ic = float(cont_hdu.header["IC_HSRA"])
        cont = np.asarray(cont_hdu.data, dtype=np.float64)
        noise = float(hdul[0].header.get("NOISE", -1.0))
    if data.ndim != 4 or data.shape[2] != 4 or data.shape[3] != wave.size:
        raise ValueError(f"{path.name}: expected (y, x, 4, {wave.size}) Stokes data, "
                         f"got {data.shape}")
    if ic <= 0:
        raise ValueError(f"{path.name}: IC_HSRA must be positive, got {ic}")
    ny, nx = data.shape[:2]
    return xr.Dataset(
        {"spectra": (("y", "x", "stokes", "wavelength"), data / ic,
                    {"units": "1 (HSRA quiet-Sun continuum)"}),
         "continuum_intensity": (("y", "x"), cont / ic if cont.max() > 10 else cont,
                                 {"units": "1 (HSRA quiet-Sun continuum)"})},
        coords={"y": np.arange(ny), "x": np.arange(nx), "stokes": list("IQUV"),
                "wavelength": ("wavelength", wave, {"units": "Angstrom", "medium": "air"})},
        attrs={"ic_hsra": ic, "noise_header": noise, "source": path.name,
               "instrument": "Hinode/SP"},
    )


def read_instrument_profile(path: str | PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The spectral instrument profile: offsets [Å] and unit-area transmission.

    Example
    -------
    >>> import numpy as np, tempfile, os
    >>> f = os.path.join(tempfile.mkdtemp(), "p.dat")
    >>> np.savetxt(f, np.column_stack([[-0.01, 0.0, 0.01], [0.0, 1.0, 0.0]]))
    >>> dl, t = read_instrument_profile(f)
    >>> float(np.trapezoid(t, dl))
    1.0
    """
    table = np.loadtxt(path, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] < 2 or table.shape[0] < 3:
        raise ValueError(f"{path}: expected two columns (offset [Å], transmission)")
    dl, t = table[:, 0], table[:, 1]
    if np.any(np.diff(dl) <= 0) or np.any(t < 0):
        raise ValueError(f"{path}: offsets must increase and transmission be >= 0")
    return dl, t / np.trapezoid(t, dl)


def instrument_matrix(fine: np.ndarray, observed: np.ndarray, offsets: np.ndarray,
                      transmission: np.ndarray) -> np.ndarray:
    """Matrix ``M (n_obs, n_fine)``: ``observed = M @ fine_spectrum``.

    Each observed sample is the profile-weighted mean of the fine spectrum
    (trapezoidal weights on the fine grid, rows normalised to unit sum).

    Example
    -------
    >>> import numpy as np
    >>> fine = np.linspace(0, 1, 101)
    >>> m = instrument_matrix(fine, np.array([0.5]), np.array([-0.1, 0, 0.1]),
    ...                       np.array([0.0, 10.0, 0.0]))
    >>> round(float((m @ fine)[0]), 12)
    0.5
    """
    fine = np.asarray(fine, dtype=float)
    observed = np.asarray(observed, dtype=float)
    step = np.gradient(fine)
    kern = np.interp(fine[None, :] - observed[:, None], offsets, transmission,
                     left=0.0, right=0.0) * step[None, :]
    total = kern.sum(1, keepdims=True)
    if np.any(total <= 0):
        raise ValueError("the fine grid does not cover the instrument profile of every sample")
    return kern / total


def continuum_windows(wavelength: np.ndarray, half_width: float = 0.35,
                      telluric_half_width: float = 0.06) -> np.ndarray:
    """Boolean mask of line-free samples (away from Fe I and O2 lines).

    Example
    -------
    >>> import numpy as np
    >>> continuum_windows(np.array([6301.0, 6301.5, 6303.1])).tolist()
    [True, False, True]
    """
    w = np.asarray(wavelength, dtype=float)
    free = (np.abs(w - FE_6301) > half_width) & (np.abs(w - FE_6302) > half_width)
    for t in TELLURIC_O2:
        free &= np.abs(w - t) > telluric_half_width
    return free


def estimate_noise(stokes: np.ndarray, wavelength: np.ndarray) -> float:
    """Noise σ in continuum units from Q and U in line-free windows.

    Q and U carry no signal in the continuum (and only weak ones far in the
    wings), so their scatter there measures the photon + detector noise. The
    per-pixel mean is removed (residual crosstalk offsets) and a robust
    standard deviation (1.4826 × MAD) is pooled over pixels, windows and
    both parameters.

    Parameters
    ----------
    stokes
        ``(..., 4, n_wavelength)`` normalised spectra.
    wavelength
        ``(n_wavelength,)`` air Å.

    Example
    -------
    >>> import numpy as np
    >>> w = np.linspace(6300.9, 6303.2, 112)
    >>> s = np.random.default_rng(0).normal(0, 1e-3, (5, 5, 4, 112))
    >>> round(estimate_noise(s, w), 4)
    0.001
    """
    free = continuum_windows(wavelength)
    if free.sum() < 5:
        raise ValueError("fewer than 5 line-free samples to estimate the noise")
    qu = np.asarray(stokes)[..., 1:3, :][..., free]
    qu = qu - qu.mean(-1, keepdims=True)
    flat = qu.ravel()
    return float(1.4826 * np.median(np.abs(flat - np.median(flat))))
