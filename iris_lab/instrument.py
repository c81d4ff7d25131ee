"""Instrument models: IRIS NUV spectrograph and the SST/CRISP imaging spectropolarimeter.

IRIS NUV (De Pontieu et al. 2014, Sol. Phys. 289, 2733):

- spectral PSF: a Gaussian of FWHM 53 mÅ, the NUV spectral resolution, integrated
  over detector pixels of 25.46 mÅ (the NUV dispersion);
- the 473-point Mg II h&k grid of the IRIS² database,
  ``2794.0 + 0.02546 i`` Å (vacuum), :func:`iris_mgii_wavelengths`;
- radiometry: DN = photons / 18 for the NUV CCDs (gain 18 e⁻/DN, one e⁻ per
  photon) and a read noise of 1.2 DN, as in ``irispy.utils.constants``; the
  effective area comes from the IRIS response shipped with ``irispy-lmsal``
  (:func:`iris_nuv_effective_area`), the slit is 0.33″ wide and a pixel spans
  0.16635″ along it.

CRISP (Scharmer 2006, A&A 447, 1111; Scharmer et al. 2008; parameters of the
CRISPRED pipeline, de la Cruz Rodríguez et al. 2015, A&A 573, A40): a
high- and a low-resolution Fabry–Pérot etalon in series (cavity separations
787 µm and 295.5 µm, reflectivities 0.933/0.849 at 6563 Å and 0.930/0.852 at
8542 Å) in an f/165 telecentric beam; the transmission is the product of two
Airy functions averaged over the beam's incidence angles. Line positions follow
the Radynversion data (Osborne et al. 2019): 15 Hα positions at 200 mÅ and 25
Ca II 8542 positions at 100 mÅ.

Line centres: Hα 6564.6 Å (vacuum), Ca II 8542.1 Å (air); CRISP offsets are
relative to these.

Every function takes batch-first arrays ``(..., wavelength)`` (numpy, or an
``xarray.DataArray`` with a ``wavelength`` dimension for :func:`iris_degrade`).

Example
-------
>>> import numpy as np
>>> from iris_lab.instrument import iris_degrade, iris_mgii_wavelengths
>>> wl = np.linspace(2793.0, 2807.0, 5601)
>>> spectrum = 1e5 * (1 - 0.5 * np.exp(-0.5 * ((wl - 2796.35) / 0.1) ** 2))
>>> iris_degrade(wl, spectrum).shape
(473,)
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np

#: IRIS NUV dispersion [Å per pixel] and spectral resolution (FWHM) [Å], De Pontieu et al. 2014.
IRIS_NUV_DISPERSION = 0.02546
IRIS_NUV_FWHM = 0.053
#: Photons per DN and read noise [DN] of the NUV spectrograph CCDs (De Pontieu et al. 2014).
IRIS_NUV_PHOTONS_PER_DN = 18.0
IRIS_NUV_READ_NOISE = 1.2
#: Slit width and spatial pixel size along the slit [arcsec].
IRIS_SLIT_WIDTH = 0.33
IRIS_PIXEL_ALONG_SLIT = 0.16635
#: NUV spectrograph effective area [cm²] at 2796-2804 Å on 2014-03-29 from the IRIS response
#: in irispy-lmsal 0.5 (``iris_sra_c_20231106``: 0.249-0.252 cm²); pass ``date=`` for others.
IRIS_NUV_EFFECTIVE_AREA_2014 = 0.25

_PLANCK = 6.62607015e-27  # erg s
_C_AA = 2.99792458e18  # Å/s
_ARCSEC = np.pi / 180.0 / 3600.0

#: CRISP dual-FPI parameters per line (CRISPRED, de la Cruz Rodríguez et al. 2015).
CRISP_LINES: dict[str, dict[str, Any]] = {
    "halpha": {"center": 6564.6, "medium": "vacuum", "r_hre": 0.9330, "r_lre": 0.8492,
               "n_positions": 15, "step": 0.200},
    "ca8542": {"center": 8542.1, "medium": "air", "r_hre": 0.930, "r_lre": 0.852,
               "n_positions": 25, "step": 0.100},
}
CRISP_HRE_SEPARATION_AA = 787.0e4
CRISP_LRE_SEPARATION_AA = 295.5e4
CRISP_F_NUMBER = 165.0

Line = Literal["halpha", "ca8542"]


# -- helpers -------------------------------------------------------------------------
def _as_increasing(wavelength: Any, name: str = "wavelength") -> np.ndarray:
    x = np.asarray(wavelength, dtype=float)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"{name} must be a 1-D array of at least 2 samples")
    if not np.all(np.isfinite(x)) or not np.all(np.diff(x) > 0):
        raise ValueError(f"{name} must be finite and strictly increasing")
    return x


def _interpolation_matrix(x_in: np.ndarray, x_out: np.ndarray):
    """Sparse (n_out, n_in) matrix of linear interpolation from x_in to x_out (inside)."""
    from scipy.sparse import csr_matrix

    idx = np.clip(np.searchsorted(x_in, x_out) - 1, 0, x_in.size - 2)
    frac = (x_out - x_in[idx]) / (x_in[idx + 1] - x_in[idx])
    rows = np.repeat(np.arange(x_out.size), 2)
    cols = np.stack([idx, idx + 1], axis=1).ravel()
    vals = np.stack([1.0 - frac, frac], axis=1).ravel()
    return csr_matrix((vals, (rows, cols)), shape=(x_out.size, x_in.size))


def _fine_grid(x_in: np.ndarray, lo: float, hi: float, step: float) -> np.ndarray:
    """Uniform grid of ``step`` on [lo, hi] merged with the input samples inside it,
    so the linear interpolant of the input is represented exactly."""
    uniform = np.linspace(lo, hi, int(np.ceil((hi - lo) / step)) + 1)
    inside = x_in[(x_in > lo) & (x_in < hi)]
    return np.unique(np.concatenate([uniform, inside]))


def _trapezoid_weights(x: np.ndarray) -> np.ndarray:
    w = np.zeros_like(x)
    dx = np.diff(x)
    w[:-1] += 0.5 * dx
    w[1:] += 0.5 * dx
    return w


def _apply(matrix: np.ndarray, intensity: Any, n_in: int, name: str = "intensity") -> np.ndarray:
    values = np.asarray(intensity, dtype=float)
    if values.shape[-1:] != (n_in,):
        raise ValueError(f"{name} has {values.shape[-1:]} samples on its last axis, "
                         f"the wavelength grid has {n_in}")
    return values @ matrix.T


# -- IRIS ----------------------------------------------------------------------------
def iris_mgii_wavelengths() -> np.ndarray:
    """The 473-point IRIS² Mg II h&k wavelength grid [Å, vacuum].

    Example
    -------
    >>> wl = iris_mgii_wavelengths()
    >>> wl.size, round(float(wl[0]), 2), round(float(wl[-1]), 3)
    (473, 2794.0, 2806.017)
    """
    return 2794.0 + IRIS_NUV_DISPERSION * np.arange(473)


def iris_psf_matrix(wavelength: Any, grid: Any = None, fwhm: float = IRIS_NUV_FWHM) -> np.ndarray:
    """Linear operator (n_grid, n_in) of the IRIS NUV degradation.

    Maps a spectrum sampled at ``wavelength`` (linearly interpolated between
    samples) to the mean over each detector pixel of the spectrum convolved
    with a Gaussian of FWHM ``fwhm``: the pixel response is the Gaussian
    convolved with a box of one pixel, ``[Φ((x + Δ/2)/σ) - Φ((x - Δ/2)/σ)] / Δ``.
    Since those pixel responses sum to one, flux is conserved:
    ``Σ out Δ = ∫ I dλ`` for a line inside the grid.
    """
    from scipy.special import ndtr

    x_in = _as_increasing(wavelength)
    centres = iris_mgii_wavelengths() if grid is None else _as_increasing(grid, "grid")
    if fwhm <= 0:
        raise ValueError("fwhm must be > 0")
    pixel = float(np.median(np.diff(centres)))
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    if x_in[0] > centres[0] - 0.5 * pixel or x_in[-1] < centres[-1] + 0.5 * pixel:
        raise ValueError(
            f"the spectrum ({x_in[0]:.3f}-{x_in[-1]:.3f} Å) must cover the output grid "
            f"({centres[0] - 0.5 * pixel:.3f}-{centres[-1] + 0.5 * pixel:.3f} Å)")
    reach = 0.5 * pixel + 6.0 * sigma
    lo = max(x_in[0], centres[0] - reach)
    hi = min(x_in[-1], centres[-1] + reach)
    from scipy.sparse import csr_matrix

    fine = _fine_grid(x_in, lo, hi, sigma / 8.0)
    # banded: each fine sample reaches the pixels within ``reach`` only
    n_band = int(np.ceil(2.0 * reach / pixel)) + 2
    first = np.searchsorted(centres, fine - reach)
    cols = first[:, None] + np.arange(n_band)[None, :]
    valid = cols < centres.size
    cols = np.minimum(cols, centres.size - 1)
    offset = fine[:, None] - centres[cols]
    kernel = (ndtr((offset + 0.5 * pixel) / sigma) - ndtr((offset - 0.5 * pixel) / sigma)) / pixel
    kernel = np.where(valid, kernel, 0.0) * _trapezoid_weights(fine)[:, None]
    rows = np.broadcast_to(np.arange(fine.size)[:, None], cols.shape)
    weighted = csr_matrix((kernel.ravel(), (cols.ravel(), rows.ravel())),
                          shape=(centres.size, fine.size))
    norm = np.asarray(weighted.sum(axis=1)).ravel()  # each pixel response integrates to 1
    matrix = (weighted @ _interpolation_matrix(x_in, fine)).toarray()
    return matrix / norm[:, None]


def iris_degrade(wavelength: Any, intensity: Any, *, grid: Any = None,
                 fwhm: float = IRIS_NUV_FWHM):
    """Degrade spectra to IRIS NUV resolution and sampling (flux-conserving).

    Parameters
    ----------
    wavelength
        Input wavelengths [Å, vacuum], 1-D, strictly increasing; must cover the
        output grid. Ignored for an ``xarray.DataArray`` input (its ``wavelength``
        coordinate is used).
    intensity
        Spectra ``(..., n_wavelength)`` (numpy) or an ``xarray.DataArray`` with a
        ``wavelength`` dimension.
    grid
        Output pixel centres [Å]; the IRIS² grid :func:`iris_mgii_wavelengths` by default.
    fwhm
        Spectral resolution [Å]; 53 mÅ by default.

    Returns
    -------
    numpy.ndarray or xarray.DataArray
        Pixel-averaged intensities ``(..., n_grid)`` in the input units.

    Example
    -------
    >>> wl = np.linspace(2793.5, 2806.5, 3000)
    >>> flat = np.full((2, wl.size), 3.0)
    >>> bool(np.allclose(iris_degrade(wl, flat), 3.0))
    True
    """
    if hasattr(intensity, "dims") and "wavelength" in intensity.dims:
        import xarray as xr

        data = intensity.transpose(..., "wavelength")
        out_grid = iris_mgii_wavelengths() if grid is None else np.asarray(grid, dtype=float)
        values = iris_degrade(data["wavelength"].values, data.values, grid=out_grid, fwhm=fwhm)
        coords = {k: v for k, v in data.coords.items() if "wavelength" not in v.dims}
        coords["wavelength"] = xr.Variable("wavelength", out_grid,
                                           {"units": "Angstrom", "medium": "vacuum"})
        return xr.DataArray(values, dims=data.dims, coords=coords,
                            attrs={**data.attrs, "instrument": "IRIS NUV",
                                   "spectral_fwhm_aa": fwhm})
    matrix = iris_psf_matrix(wavelength, grid, fwhm)
    return _apply(matrix, intensity, np.asarray(wavelength).size)


@functools.lru_cache(maxsize=8)
def _iris_response(date: str):
    from astropy.time import Time
    from irispy.utils.response import get_latest_response

    return get_latest_response(Time(date))


def iris_nuv_effective_area(wavelength: Any, date: str = "2014-03-29") -> np.ndarray:
    """IRIS NUV spectrograph effective area [cm²] at ``date`` (irispy-lmsal response).

    Example
    -------
    >>> area = iris_nuv_effective_area([2796.35, 2803.53])  # doctest: +SKIP
    """
    import astropy.units as u
    from irispy.utils.response import get_interpolated_effective_area

    area = get_interpolated_effective_area(_iris_response(str(date)), "NUV",
                                           np.asarray(wavelength, dtype=float) * u.AA)
    return np.asarray(area.to_value(u.cm**2), dtype=float)


def iris_dn_per_s_per_intensity(wavelength: Any, *, effective_area: Any = None,
                                date: str | None = None) -> np.ndarray:
    """Count rate [DN s⁻¹] per unit specific intensity [erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹], per pixel.

    ``A_eff Ω_pix Δλ_pix / (h c / λ) / 18`` with Ω_pix = 0.33″ × 0.16635″ and
    Δλ_pix = 25.46 mÅ. ``effective_area`` [cm²] overrides; otherwise ``date``
    selects irispy's response, and without either the 2014 value
    :data:`IRIS_NUV_EFFECTIVE_AREA_2014` is used.
    """
    wl = np.asarray(wavelength, dtype=float)
    if effective_area is not None:
        area = np.asarray(effective_area, dtype=float)
    elif date is not None:
        area = iris_nuv_effective_area(wl, date)
    else:
        area = IRIS_NUV_EFFECTIVE_AREA_2014
    solid_angle = IRIS_SLIT_WIDTH * IRIS_PIXEL_ALONG_SLIT * _ARCSEC**2
    photon_energy = _PLANCK * _C_AA / wl
    return area * solid_angle * IRIS_NUV_DISPERSION / photon_energy / IRIS_NUV_PHOTONS_PER_DN


def _default_wavelength(intensity: Any, wavelength: Any) -> np.ndarray:
    if wavelength is not None:
        return np.asarray(wavelength, dtype=float)
    if hasattr(intensity, "coords") and "wavelength" in intensity.coords:
        return np.asarray(intensity["wavelength"].values, dtype=float)
    n = np.shape(intensity)[-1]
    if n != 473:
        raise ValueError("give wavelength= for spectra not on the 473-point IRIS² grid")
    return iris_mgii_wavelengths()


def iris_intensity_to_dn(intensity: Any, exptime: float, *, wavelength: Any = None,
                         effective_area: Any = None, date: str | None = None) -> np.ndarray:
    """Expected counts [DN] in an exposure of ``exptime`` seconds (no noise).

    Parameters
    ----------
    intensity
        Specific intensity [erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹] on IRIS pixels ``(..., n_wavelength)``.
    exptime
        Exposure time [s], > 0.
    wavelength, effective_area, date
        See :func:`iris_dn_per_s_per_intensity`; the IRIS² grid by default.

    Example
    -------
    >>> dn = iris_intensity_to_dn(np.full(473, 1e5), 8.0)
    >>> bool(np.allclose(iris_dn_to_intensity(dn / 8.0), 1e5))
    True
    """
    if not exptime > 0:
        raise ValueError(f"exptime must be > 0 s, not {exptime!r}")
    wl = _default_wavelength(intensity, wavelength)
    rate = iris_dn_per_s_per_intensity(wl, effective_area=effective_area, date=date)
    return np.asarray(intensity, dtype=float) * rate * exptime


def iris_dn_to_intensity(dn_per_s: Any, *, wavelength: Any = None, effective_area: Any = None,
                         date: str | None = None) -> np.ndarray:
    """Specific intensity [erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹] from a count rate [DN s⁻¹] (inverse of
    :func:`iris_intensity_to_dn` per second); float32 input gives float32 output.

    Example
    -------
    >>> wl = np.array([2796.2, 2803.5])
    >>> dn = iris_intensity_to_dn(np.array([1e5, 1e5]), wavelength=wl, exptime=1.0)
    >>> np.allclose(iris_dn_to_intensity(dn, wavelength=wl), 1e5)
    True
    >>> iris_dn_to_intensity(dn.astype(np.float32), wavelength=wl).dtype
    dtype('float32')
    """
    wl = _default_wavelength(dn_per_s, wavelength)
    rate = iris_dn_per_s_per_intensity(wl, effective_area=effective_area, date=date)
    data = np.asarray(dn_per_s)
    if data.dtype != np.float32:        # float32 rasters stay float32 (a full raster is GBs)
        data = data.astype(float)
    return data / np.asarray(rate, dtype=data.dtype)


def iris_noise_sigma(dn: Any, *, photons_per_dn: float = IRIS_NUV_PHOTONS_PER_DN,
                     read_noise: float = IRIS_NUV_READ_NOISE) -> np.ndarray:
    """1σ noise [DN] of a count: ``sqrt(max(dn, 0) / photons_per_dn + read_noise²)``."""
    dn = np.asarray(dn, dtype=float)
    return np.sqrt(np.maximum(dn, 0.0) / photons_per_dn + read_noise**2)


def iris_add_noise(dn: Any, rng: np.random.Generator | int | None = None, *,
                   photons_per_dn: float = IRIS_NUV_PHOTONS_PER_DN,
                   read_noise: float = IRIS_NUV_READ_NOISE) -> np.ndarray:
    """Photon (Poisson) and read (Gaussian) noise on expected counts [DN].

    Parameters
    ----------
    dn
        Expected counts [DN] of an exposure, any shape; negative values count
        as zero photons.
    rng
        A ``numpy.random.Generator`` or a seed.

    Example
    -------
    >>> noisy = iris_add_noise(np.full(100_000, 50.0), rng=0)
    >>> bool(abs(noisy.std() - float(iris_noise_sigma(50.0))) < 0.05)
    True
    """
    if read_noise < 0 or photons_per_dn <= 0:
        raise ValueError("read_noise must be >= 0 and photons_per_dn > 0")
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    dn = np.asarray(dn, dtype=float)
    if not np.all(np.isfinite(dn)):
        raise ValueError("dn contains NaN or infinite values")
    photons = generator.poisson(np.maximum(dn, 0.0) * photons_per_dn)
    return photons / photons_per_dn + generator.normal(0.0, read_noise, dn.shape)


def iris_observe(wavelength: Any, intensity: Any, exptime: float,
                 rng: np.random.Generator | int | None = None, *, units: str = "intensity",
                 effective_area: Any = None, date: str | None = None) -> np.ndarray:
    """Synthetic IRIS NUV observation: PSF and 473-pixel grid, counts, noise.

    Parameters
    ----------
    wavelength, intensity
        Spectra before the instrument, as for :func:`iris_degrade`.
    exptime
        Exposure time [s].
    rng
        Generator or seed of the photon and read noise; ``None`` gives fresh noise.
    units
        ``"intensity"`` (calibrated back to erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹) or ``"dn/s"``.

    Returns
    -------
    numpy.ndarray
        Noisy spectra on :func:`iris_mgii_wavelengths`, ``(..., 473)``.

    Example
    -------
    >>> wl = np.linspace(2793.5, 2806.5, 3000)
    >>> iris_observe(wl, np.full(wl.size, 1e5), 8.0, rng=0).shape
    (473,)
    """
    if units not in ("intensity", "dn/s"):
        raise ValueError(f"units must be 'intensity' or 'dn/s', not {units!r}")
    grid = iris_mgii_wavelengths()
    degraded = np.asarray(iris_degrade(wavelength, intensity))
    dn = iris_intensity_to_dn(degraded, exptime, wavelength=grid,
                              effective_area=effective_area, date=date)
    rate = iris_add_noise(dn, rng) / exptime
    if units == "dn/s":
        return rate
    return iris_dn_to_intensity(rate, wavelength=grid, effective_area=effective_area, date=date)


# -- CRISP ---------------------------------------------------------------------------
def _crisp_line(line: str) -> dict[str, Any]:
    key = str(line).lower().replace(" ", "").replace("_", "")
    key = {"ha": "halpha", "h-alpha": "halpha", "caii8542": "ca8542", "ca": "ca8542"}.get(key, key)
    if key not in CRISP_LINES:
        raise ValueError(f"unknown CRISP line {line!r}; choose from {sorted(CRISP_LINES)}")
    return CRISP_LINES[key]


def crisp_positions(line: Line) -> np.ndarray:
    """Line positions [Å from line centre]: 15 at 200 mÅ (Hα), 25 at 100 mÅ (Ca II 8542).

    Example
    -------
    >>> crisp_positions("halpha")[[0, 7, -1]]
    array([-1.4,  0. ,  1.4])
    """
    spec = _crisp_line(line)
    n = spec["n_positions"]
    return np.round((np.arange(n) - (n - 1) / 2) * spec["step"], 6)


def crisp_transmission(offset_aa: Any, line: Line) -> np.ndarray:
    """CRISP dual-FPI transmission at ``offset_aa`` [Å] from the tuned wavelength.

    Product of the Airy functions of the high- and low-resolution etalons,
    ``1 / (1 + F sin²(2π d cos θ / λ))`` with ``F = 4R/(1-R)²``, averaged over a
    uniformly filled f/165 pupil (Gauss–Legendre in cos θ); the cavities are
    tuned so that the beam-averaged peak sits at zero offset (peak ≈ 0.93: the
    converging beam broadens and lowers it).

    Example
    -------
    >>> tr = crisp_transmission(np.array([0.0, 1.0]), "halpha")
    >>> bool(tr[0] > 0.9 and tr[1] < 0.01)
    True
    """
    spec = _crisp_line(line)
    centre = spec["center"]
    offset = np.asarray(offset_aa, dtype=float)
    nodes, weights = np.polynomial.legendre.leggauss(8)
    theta_max = 0.5 / CRISP_F_NUMBER
    # uniform in sin²θ ≈ θ² over the pupil: θ² = θmax² (node + 1) / 2
    cos_theta = np.cos(theta_max * np.sqrt(0.5 * (nodes + 1.0)))
    mean_cos = float(np.sum(0.5 * weights * cos_theta))
    total = np.zeros(offset.shape)
    wl = centre + offset
    for c, w in zip(cos_theta, weights, strict=True):
        t = np.ones(offset.shape)
        for r_key, sep in (("r_hre", CRISP_HRE_SEPARATION_AA),
                           ("r_lre", CRISP_LRE_SEPARATION_AA)):
            order = np.round(2.0 * sep * mean_cos / centre)
            cavity = order * centre / (2.0 * mean_cos)
            r = spec[r_key]
            finesse = 4.0 * r / (1.0 - r) ** 2
            t = t / (1.0 + finesse * np.sin(2.0 * np.pi * cavity * c / wl) ** 2)
        total = total + 0.5 * w * t
    return total


def crisp_degrade(offset_aa: Any, intensity: Any, line: Line, positions: Any = None) -> np.ndarray:
    """Observe spectra through the CRISP transmission profile at line positions.

    Each output is ``∫ I(λ) T(λ - p) dλ / ∫ T(λ - p) dλ`` over the input range
    (the input linearly interpolated on a fine grid), so a flat spectrum is
    returned unchanged and the profile's wings beyond the input are not counted.

    Parameters
    ----------
    offset_aa
        Input wavelengths [Å from the line centre], 1-D, increasing; must cover
        the positions.
    intensity
        Spectra ``(..., n_wavelength)``.
    line
        ``"halpha"`` or ``"ca8542"``.
    positions
        Tuning offsets [Å]; :func:`crisp_positions` by default.

    Returns
    -------
    numpy.ndarray
        ``(..., n_positions)``, in the input units.

    Example
    -------
    >>> x = np.linspace(-2.0, 2.0, 801)
    >>> crisp_degrade(x, np.ones(x.size), "ca8542").shape
    (25,)
    """
    x_in = _as_increasing(offset_aa, "offset_aa")
    pos = crisp_positions(line) if positions is None else np.asarray(positions, dtype=float)
    if pos.min() < x_in[0] or pos.max() > x_in[-1]:
        raise ValueError("the input offsets must cover every CRISP position")
    fine = _fine_grid(x_in, x_in[0], x_in[-1], 0.004)
    kernel = crisp_transmission(fine[None, :] - pos[:, None], line) * _trapezoid_weights(fine)
    kernel /= kernel.sum(axis=1, keepdims=True)
    matrix = np.asarray((_interpolation_matrix(x_in, fine).T @ kernel.T).T)
    return _apply(matrix, intensity, x_in.size)


def crisp_fwhm(line: Line) -> float:
    """FWHM [Å] of :func:`crisp_transmission` (numerical)."""
    x = np.linspace(-0.3, 0.3, 6001)
    t = crisp_transmission(x, line)
    half = t.max() / 2.0
    inside = x[t >= half]
    return float(inside[-1] - inside[0])
