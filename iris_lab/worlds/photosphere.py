"""An MHD-like photospheric field of view for LTE inversions.

:func:`sample_photosphere_fov` builds a map ``(ny, nx)`` of stratified
atmospheres on a log τ500 grid: a sunspot (umbra and penumbra) in a field of
granulation (granules and intergranular lanes). Families blend smoothly in
space, so the field holds every intermediate state, and the stratifications
are *not* node-shaped (they are smooth functions with features narrower than
the node spacing used by inversions, plus a random smooth component):

* **granulation** — a Voronoi cell pattern (cells ~4 px); a granularity
  ``c ∈ [−1, 1]`` (+1 cell centre, −1 lane) sets the temperature contrast
  (±≈800 K at log τ = 0, vanishing near log τ = −1.2 and reversed by
  ≈−100/+100 K above log τ = −1.8: reversed granulation, e.g. Cheung et al.
  2007), upflows of ≈1.8 km/s in granules and narrower, faster downflows of
  ≈2.8 km/s in lanes, both decaying with height; weak fields in granules and
  up to a few hundred G in lanes;
* **umbra** — temperature scaled from the quiet model to ≈4000 K at
  log τ = 0 and ≈3400 K at log τ = −3 (close to Maltby et al. 1986 model M),
  2.4–3 kG nearly vertical field decreasing with height, no flows;
* **penumbra** — ≈5700 K at log τ = 0, 1.2–1.7 kG inclined (≈70°) field,
  with an embedded hot, horizontal-field flow channel (Gaussian in log τ of
  width 0.25 dex at a random depth −0.9…−0.2: +300 K, −40 % B, 90°
  inclination, Evershed downflow +1.5 km/s at disk centre), radial azimuth.

The quiet reference is FAL-C (Fontenla et al. 1993) on the photospheric grid.
Random smooth perturbations (sums of random Fourier modes in log τ with a
0.6-dex correlation length) are added to T (60 K), v_los (0.25 km/s) and B
(5 %).

:func:`synthesize_fov` computes the Stokes spectra with the LTE engine
(:class:`iris_lab.synthesis.lte.LTESynthesizer`) in the 4015–4017 Å window
(air), normalised to the quiet-Sun (FAL-C) continuum at the same μ, with an
optional Gaussian spectral PSF and photon noise of a given continuum S/N.

Example
-------
>>> from iris_lab.worlds.photosphere import sample_photosphere_fov
>>> atm, family = sample_photosphere_fov(10, 12, seed=0)
>>> atm.batch_shape, sorted(set(family.ravel().tolist()))
((10, 12), ['granule', 'intergranule', 'penumbra', 'umbra'])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iris_lab.atmosphere import Atmosphere

FAMILIES = ("granule", "intergranule", "penumbra", "umbra")
KM = 1e5  # cm


def photosphere_log_tau() -> np.ndarray:
    """The depth grid of the field of view: log τ500 from −4 to 1 in 0.1 steps.

    Example
    -------
    >>> photosphere_log_tau()[[0, -1]].tolist()
    [-4.0, 1.0]
    """
    return np.round(np.arange(-4.0, 1.0 + 1e-9, 0.1), 2)


def _logistic(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _smooth_random(rng: np.random.Generator, shape: tuple[int, ...], x: np.ndarray,
                   length: float = 0.6, n_modes: int = 6) -> np.ndarray:
    """Unit-variance smooth random functions of ``x`` (random Fourier modes)."""
    k = rng.normal(0.0, 1.0 / length, size=(*shape, n_modes, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(*shape, n_modes, 1))
    return np.sqrt(2.0 / n_modes) * np.cos(k * x + phase).sum(-2)


def _granularity(ny: int, nx: int, rng: np.random.Generator, cell: float = 4.0) -> np.ndarray:
    """Granularity ``c ∈ [−1, 1]`` of a Voronoi cell pattern (1 centre, −1 lane)."""
    n_cells = max(4, int(round(ny * nx / cell ** 2 * 1.5)))
    centres = rng.uniform([-cell, -cell], [ny + cell, nx + cell], size=(n_cells, 2))
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    d = np.hypot(yy[..., None] - centres[:, 0], xx[..., None] - centres[:, 1])
    d.sort(axis=-1)
    edge = (d[..., 1] - d[..., 0]) / (0.5 * cell)       # 0 on the lane, ~1 in the centre
    return np.clip(2.0 * np.tanh(1.6 * edge) - 1.0, -1.0, 1.0)


def sample_photosphere_fov(ny: int = 12, nx: int = 12, *, seed: int = 0, spot: bool = True,
                           log_tau: np.ndarray | None = None
                           ) -> tuple[Atmosphere, np.ndarray]:
    """A seeded field of view of photospheric atmospheres.

    Parameters
    ----------
    ny, nx
        Map size (pixels). ``ny * nx`` ≥ 100 is the intended use.
    seed
        Random seed (pattern, parameters and perturbations).
    spot
        Include the sunspot (umbra + penumbra) in the map centre.
    log_tau
        Depth grid (default :func:`photosphere_log_tau`).

    Returns
    -------
    atmosphere, family
        :class:`~iris_lab.atmosphere.Atmosphere` ``(ny, nx, depth)`` on the
        log τ scale (T, v_los, v_turb, B, inclination, azimuth; densities
        left to the equation of state) and the family label of every pixel
        (``ny, nx``), the dominant one where families blend.

    Raises
    ------
    ValueError
        For a map smaller than 2×2.

    Example
    -------
    >>> atm, family = sample_photosphere_fov(12, 12, seed=3)
    >>> bool((atm.temperature > 3000).all())
    True
    """
    if ny < 2 or nx < 2:
        raise ValueError(f"the field of view must be at least 2x2 pixels, got {ny}x{nx}")
    rng = np.random.default_rng(seed)
    x = photosphere_log_tau() if log_tau is None else np.asarray(log_tau, dtype=float)
    falc = Atmosphere.reference("falc")
    order = np.argsort(falc.log_tau)
    t_quiet = np.interp(x, falc.log_tau[order], falc.temperature[order])

    # spatial weights
    c = _granularity(ny, nx, rng)[..., None]                           # (ny, nx, 1)
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    cy, cx = (ny - 1) / 2 + rng.uniform(-0.5, 0.5), (nx - 1) / 2 + rng.uniform(-0.5, 0.5)
    r = np.hypot(yy - cy, xx - cx)
    size = min(ny, nx)
    r_umbra, r_penumbra = 0.17 * size, 0.36 * size
    if spot:
        w_umbra = _logistic((r_umbra - r) / 0.6)
        w_pen = _logistic((r_penumbra - r) / 0.6) - w_umbra
    else:
        w_umbra = np.zeros_like(r)
        w_pen = np.zeros_like(r)
    w_quiet = 1.0 - w_umbra - w_pen
    shape = (ny, nx)

    # quiet Sun: granules and lanes
    up = c > 0
    d_t = c * (850.0 * _logistic((x + 0.6) / 0.3) - 120.0 * _logistic(-(x + 1.8) / 0.4))
    v_gran = -c * np.where(up, 1.8, 2.8) * KM * np.exp((x - np.where(up, 0.5, 0.3))
                                                        / np.where(up, 1.2, 0.9))
    b_quiet = (20.0 + 380.0 * ((1 - c) / 2) ** 3 * rng.uniform(0.3, 1.0, (*shape, 1))) \
        * (1.0 + 0.05 * x)
    incl_quiet = np.broadcast_to(rng.uniform(0.2, 2.9, (*shape, 1)), b_quiet.shape)
    azi_quiet = np.broadcast_to(rng.uniform(0, np.pi, (*shape, 1)), b_quiet.shape)
    t_q = t_quiet + d_t

    # umbra
    t_u = t_quiet * (0.63 + 0.15 * _logistic(-(x + 1.5) / 0.6)) * \
        rng.uniform(0.97, 1.03, (*shape, 1))
    b_u = rng.uniform(2400, 3000, (*shape, 1)) * (1.0 + 0.08 * x)
    incl_u = np.deg2rad(rng.uniform(5, 20, (*shape, 1))) + 0.0 * x
    v_u = rng.normal(0, 0.15, (*shape, 1)) * KM + 0.0 * x

    # penumbra with a flow channel
    x_ch = rng.uniform(-0.9, -0.2, (*shape, 1))
    chan = np.exp(-(((x - x_ch) / 0.25) ** 2)) * rng.uniform(0.5, 1.0, (*shape, 1))
    t_p = t_quiet * 0.9 + 300.0 * chan
    b_p = rng.uniform(1200, 1700, (*shape, 1)) * (1.0 + 0.06 * x) * (1.0 - 0.4 * chan)
    incl_p = np.deg2rad(70.0 + 20.0 * chan)
    v_p = 1.5 * KM * chan + rng.normal(0, 0.2, (*shape, 1)) * KM
    azi_spot = np.broadcast_to(np.mod(np.arctan2(yy - cy, xx - cx), np.pi)[..., None],
                               b_p.shape)

    wq, wp, wu = (w[..., None] for w in (w_quiet, w_pen, w_umbra))
    temperature = wq * t_q + wp * t_p + wu * t_u
    v_los = wq * v_gran + wp * v_p + wu * v_u
    b_field = wq * b_quiet + wp * b_p + wu * b_u
    inclination = wq * incl_quiet + wp * incl_p + wu * incl_u
    # azimuths blend on the spot side only (avoid averaging angles across 0/π)
    azimuth = np.where((wq > 0.5), azi_quiet, azi_spot)

    # random smooth components (not node-shaped)
    temperature = temperature + 60.0 * _smooth_random(rng, shape, x)
    v_los = v_los + 0.25 * KM * _smooth_random(rng, shape, x)
    b_field = b_field * (1.0 + 0.05 * _smooth_random(rng, shape, x))
    v_turb = np.broadcast_to(rng.uniform(0.5, 1.3, (*shape, 1)) * KM, temperature.shape)

    temperature = np.clip(temperature, 3000.0, 20000.0)
    b_field = np.clip(b_field, 0.0, 5000.0)
    inclination = np.clip(inclination, 0.0, np.pi)
    family = np.where(w_umbra >= np.maximum(w_pen, w_quiet), "umbra",
                      np.where(w_pen >= w_quiet, "penumbra",
                               np.where(c[..., 0] > 0, "granule", "intergranule")))
    atm = Atmosphere(temperature=temperature, log_tau=np.broadcast_to(x, temperature.shape),
                     v_los=v_los, v_turb=np.array(v_turb), b_field=b_field,
                     inclination=inclination, azimuth=np.array(azimuth), scale="log_tau")
    return atm, family.astype(str)


def gaussian_psf_matrix(wavelengths: np.ndarray, fwhm_aa: float) -> np.ndarray:
    """Row-normalised matrix applying a Gaussian spectral PSF on a grid.

    ``degraded = spectra @ M.T``; rows near the edges are renormalised to
    unit sum (the PSF is truncated by the window).

    Example
    -------
    >>> import numpy as np
    >>> m = gaussian_psf_matrix(np.linspace(0, 1, 11), 0.2)
    >>> np.allclose(m.sum(1), 1.0)
    True
    """
    w = np.asarray(wavelengths, dtype=float)
    if fwhm_aa <= 0:
        raise ValueError(f"fwhm_aa must be positive, got {fwhm_aa}")
    s = fwhm_aa / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    m = np.exp(-0.5 * ((w[:, None] - w[None, :]) / s) ** 2)
    return m / m.sum(1, keepdims=True)


def photon_noise_sigma(stokes_i: np.ndarray, snr: float) -> np.ndarray:
    """Photon-noise standard deviation in continuum units: ``sqrt(I) / S/N``.

    ``stokes_i`` is normalised to the continuum (so σ = 1/SNR there); the same
    σ applies to Q, U, V (their photon noise is set by I).

    Example
    -------
    >>> float(photon_noise_sigma(np.array(1.0), 100.0))
    0.01
    """
    if snr <= 0:
        raise ValueError(f"snr must be positive, got {snr}")
    return np.sqrt(np.clip(stokes_i, 1e-6, None)) / snr


def default_wavelengths() -> np.ndarray:
    """4015.0–4017.0 Å (air) at 10 mÅ, 201 points.

    Example
    -------
    >>> default_wavelengths().size
    201
    """
    return np.round(np.linspace(4015.0, 4017.0, 201), 4)


def synthesize_fov(atmosphere: Atmosphere, line_list: Any = "4015_4017",
                   wavelengths: np.ndarray | None = None, *, mu: float = 1.0,
                   snr: float | None = None, psf_fwhm_aa: float | None = None, seed: int = 0,
                   chunk: int = 128, device: str = "cpu", progress: bool = False):
    """Stokes spectra of a field of view with the LTE engine.

    Parameters
    ----------
    atmosphere
        Atmospheres on a log τ scale, any batch shape (e.g. from
        :func:`sample_photosphere_fov`).
    line_list
        A :class:`iris_lab.atomic.LineList` or the name of a shipped list.
    wavelengths
        Air wavelengths [Å] (default :func:`default_wavelengths`).
    mu
        Cosine of the heliocentric angle.
    snr
        Continuum signal-to-noise ratio of the photon noise; ``None``: none.
    psf_fwhm_aa
        FWHM [Å] of a Gaussian spectral PSF; ``None``: none.
    seed
        Noise seed.
    chunk
        Pixels per synthesis call (memory bound).
    device
        Torch device.
    progress
        Show a tqdm bar over the chunks.

    Returns
    -------
    xarray.Dataset
        ``spectra`` (*batch, stokes, wavelength) normalised to the FAL-C
        quiet-Sun continuum at μ, ``clean`` (noise-free, PSF applied) and
        ``sigma`` (the noise σ, zeros when ``snr`` is None); coordinate
        ``wavelength`` (air, Å).
    """
    import torch
    import xarray as xr

    from iris_lab.atomic import LineList
    from iris_lab.synthesis.lte import LTESynthesizer

    lines = LineList.shipped(line_list) if isinstance(line_list, str) else line_list
    wave = default_wavelengths() if wavelengths is None else np.asarray(wavelengths, float)
    synth = LTESynthesizer(lines, wave, mu=mu, device=device)
    i_c = float(np.asarray(synth.continuum_intensity().detach().cpu()).ravel()[0])
    batch = atmosphere.batch_shape
    flat = atmosphere.reshape(-1) if batch else atmosphere.reshape(1)
    n = flat.batch_shape[0]
    names = ("log_tau", "temperature", "v_los", "v_turb", "b_field", "inclination", "azimuth")
    out = []
    starts = range(0, n, chunk)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="LTE synthesis")
    for s in starts:
        fields = {k: torch.as_tensor(np.ascontiguousarray(getattr(flat, k)[s:s + chunk]),
                                     dtype=torch.float64, device=device) for k in names}
        with torch.no_grad():
            out.append(synth.stokes(fields).cpu().numpy())
    spectra = np.concatenate(out) / i_c                                  # (n, 4, w)
    if psf_fwhm_aa:
        spectra = spectra @ gaussian_psf_matrix(wave, psf_fwhm_aa).T
    clean = spectra.reshape(*batch, 4, wave.size)
    sigma = np.zeros_like(clean)
    noisy = clean
    if snr is not None:
        rng = np.random.default_rng(seed)
        sig_i = photon_noise_sigma(clean[..., :1, :], snr)
        sigma = np.broadcast_to(sig_i, clean.shape).copy()
        noisy = clean + sigma * rng.standard_normal(clean.shape)
    dims = tuple(f"dim_{i}" for i in range(len(batch)))
    if len(batch) == 2:
        dims = ("y", "x")
    elif len(batch) == 1:
        dims = ("pixel",)
    dims = dims + ("stokes", "wavelength")
    attrs = {"units": "1 (quiet-Sun continuum at mu)", "mu": mu, "medium": "air",
             "snr": -1.0 if snr is None else float(snr),
             "psf_fwhm_aa": 0.0 if not psf_fwhm_aa else float(psf_fwhm_aa),
             "continuum_intensity": i_c,
             "continuum_intensity_units": "erg / (s cm2 sr Angstrom)"}
    coords = {"stokes": list("IQUV"), "wavelength": ("wavelength", wave, {"units": "Angstrom",
                                                                          "medium": "air"})}
    return xr.Dataset({"spectra": (dims, noisy, attrs), "clean": (dims, clean, attrs),
                       "sigma": (dims, sigma, {"units": attrs["units"]})}, coords=coords,
                      attrs={"line_list": line_list if isinstance(line_list, str) else "custom"})
