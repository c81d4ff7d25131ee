"""IRIS NUV and CRISP instrument models against analytic references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr

from iris_lab import instrument as ins


def _gaussian(wl, centre, sigma, amplitude):
    return amplitude * np.exp(-0.5 * ((wl - centre) / sigma) ** 2)


def test_iris_grid_matches_iris2_layout():
    wl = ins.iris_mgii_wavelengths()
    assert wl.shape == (473,)
    np.testing.assert_allclose(np.diff(wl), 0.02546, rtol=1e-9)
    # both Mg II k (2796.35 Å) and h (2803.53 Å), vacuum, lie well inside
    assert wl[0] < 2796.35 - 2.0 and wl[-1] > 2803.53 + 2.0


def test_iris_degradation_conserves_flux():
    wl = np.linspace(2793.0, 2807.0, 9001)
    lines = (_gaussian(wl, 2796.35, 0.08, 4e5) + _gaussian(wl, 2803.53, 0.05, 3e5)
             - _gaussian(wl, 2799.0, 0.3, 2e4))
    out = ins.iris_degrade(wl, lines[None, :] * np.array([[1.0], [2.5]]))
    flux_in = np.trapezoid(lines, wl)
    flux_out = out.sum(-1) * ins.IRIS_NUV_DISPERSION
    # pixel responses sum to one, so the only error is the quadrature of the
    # linearly interpolated input (sampling 1.6 mÅ vs σ ≥ 50 mÅ): < 1e-5 relative
    np.testing.assert_allclose(flux_out, flux_in * np.array([1.0, 2.5]), rtol=1e-5)


def test_iris_degradation_matches_analytic_gaussian():
    # a Gaussian line convolved with the Gaussian PSF is a Gaussian of
    # σ_c² = σ_line² + σ_psf²; its mean over a pixel is a difference of erfs
    wl = np.linspace(2793.0, 2807.0, 14001)
    sigma_line, amplitude, centre = 0.04, 1.0e5, 2796.3512
    out = ins.iris_degrade(wl, _gaussian(wl, centre, sigma_line, amplitude))
    sigma_psf = ins.IRIS_NUV_FWHM / (2 * np.sqrt(2 * np.log(2)))
    sigma_c = np.hypot(sigma_line, sigma_psf)
    grid, half = ins.iris_mgii_wavelengths(), ins.IRIS_NUV_DISPERSION / 2
    area = amplitude * sigma_line * np.sqrt(2 * np.pi)
    expected = area * (ndtr((grid + half - centre) / sigma_c)
                       - ndtr((grid - half - centre) / sigma_c)) / (2 * half)
    # 1e-4 of the peak: input sampled at 1 mÅ, linear interpolation error ~ (dx/σ)²/8
    np.testing.assert_allclose(out, expected, atol=1e-4 * expected.max())


def test_iris_degradation_xarray_and_errors():
    import xarray as xr

    wl = np.linspace(2793.5, 2806.5, 2001)
    da = xr.DataArray(np.ones((2, wl.size)), dims=("entry", "wavelength"),
                      coords={"wavelength": wl}, attrs={"units": "erg / (s cm2 sr Angstrom)"})
    out = ins.iris_degrade(None, da)
    assert out.dims == ("entry", "wavelength") and out.sizes["wavelength"] == 473
    assert out.attrs["units"] == "erg / (s cm2 sr Angstrom)"
    np.testing.assert_allclose(out.values, 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="cover"):
        ins.iris_degrade(np.linspace(2795, 2805, 100), np.ones(100))
    with pytest.raises(ValueError, match="increasing"):
        ins.iris_degrade(wl[::-1], np.ones(wl.size))
    with pytest.raises(ValueError, match="samples"):
        ins.iris_degrade(wl, np.ones(wl.size + 1))


def test_dn_conversion_against_astropy_radiometry():
    import astropy.constants as const
    import astropy.units as u

    intensity = 2.0e5 * u.erg / (u.s * u.cm**2 * u.sr * u.AA)
    wavelength = 2796.35 * u.AA
    solid_angle = (0.33 * u.arcsec * 0.16635 * u.arcsec).to(u.sr)
    photons = (intensity * 0.25 * u.cm**2 * solid_angle * 25.46e-3 * u.AA
               / (const.h * const.c / wavelength)).to(1 / u.s)
    expected_dn = photons.value / 18.0 * 8.0
    dn = ins.iris_intensity_to_dn(np.array([2.0e5]), 8.0, wavelength=[2796.35])
    np.testing.assert_allclose(dn, expected_dn, rtol=1e-6)
    back = ins.iris_dn_to_intensity(dn / 8.0, wavelength=[2796.35])
    np.testing.assert_allclose(back, 2.0e5, rtol=1e-12)
    with pytest.raises(ValueError, match="exptime"):
        ins.iris_intensity_to_dn(np.ones(473), 0.0)


def test_nominal_effective_area_matches_irispy_response():
    area = ins.iris_nuv_effective_area([2796.35, 2803.53], date="2014-03-29")
    # the nominal constant is irispy's response at the date; 2 % covers h vs k
    np.testing.assert_allclose(area, ins.IRIS_NUV_EFFECTIVE_AREA_2014, rtol=0.02)


def test_noise_statistics_match_the_model():
    expected = np.full(200_000, 40.0)
    noisy = ins.iris_add_noise(expected, np.random.default_rng(5))
    sigma = float(ins.iris_noise_sigma(40.0))
    assert sigma == pytest.approx(np.sqrt(40.0 / 18.0 + 1.2**2))
    # mean within 5 standard errors; variance within 5 σ of its estimator (√(2/n) rel.)
    assert abs(noisy.mean() - 40.0) < 5 * sigma / np.sqrt(noisy.size)
    assert abs(noisy.var() / sigma**2 - 1.0) < 5 * np.sqrt(2.0 / noisy.size)
    # read noise alone at zero signal
    dark = ins.iris_add_noise(np.zeros(200_000), 1)
    assert abs(dark.std() - 1.2) < 5 * 1.2 / np.sqrt(2 * dark.size)
    # photon counts are quantised in units of 1/18 DN before the read noise
    shot = ins.iris_add_noise(np.full(1000, 3.0), 2, read_noise=0.0)
    np.testing.assert_allclose(shot * 18.0, np.round(shot * 18.0), atol=1e-9)
    # seeded: reproducible
    np.testing.assert_array_equal(ins.iris_add_noise(expected[:10], 7),
                                  ins.iris_add_noise(expected[:10], 7))


def test_observe_chains_degradation_counts_and_noise():
    wl = np.linspace(2793.0, 2807.0, 4001)
    spectrum = 3.0e4 + _gaussian(wl, 2796.35, 0.1, 2.0e5)
    degraded = ins.iris_degrade(wl, spectrum)
    many = ins.iris_observe(wl, np.broadcast_to(spectrum, (400, wl.size)), 4.0, rng=3)
    # unbiased: the mean of 400 noisy spectra sits within 5 standard errors of the model
    sigma_dn = ins.iris_noise_sigma(ins.iris_intensity_to_dn(degraded, 4.0))
    sigma_i = ins.iris_dn_to_intensity(sigma_dn / 4.0)
    assert np.all(np.abs(many.mean(0) - degraded) < 5 * sigma_i / np.sqrt(400))
    rate = ins.iris_observe(wl, spectrum, 4.0, rng=3, units="dn/s")
    single = ins.iris_observe(wl, spectrum, 4.0, rng=3)
    np.testing.assert_allclose(ins.iris_dn_to_intensity(rate), single, rtol=1e-12)
    with pytest.raises(ValueError, match="units"):
        ins.iris_observe(wl, spectrum, 4.0, units="photons")


def test_crisp_positions():
    ha, ca = ins.crisp_positions("halpha"), ins.crisp_positions("ca8542")
    assert ha.size == 15 and ca.size == 25
    np.testing.assert_allclose(np.diff(ha), 0.2, atol=1e-9)
    np.testing.assert_allclose(np.diff(ca), 0.1, atol=1e-9)
    assert ha[7] == 0.0 and ca[12] == 0.0
    with pytest.raises(ValueError, match="unknown CRISP line"):
        ins.crisp_positions("mg2k")


@pytest.mark.parametrize(("line", "fwhm_published"), [("halpha", 0.066), ("ca8542", 0.107)])
def test_crisp_transmission_width(line, fwhm_published):
    # the CRISP FWHM quoted in the literature: 66 mÅ at Hα, 107 mÅ at Ca II 8542; the
    # model (nominal CRISPRED reflectivities, uniform f/165 pupil) is within 5 %
    assert ins.crisp_fwhm(line) == pytest.approx(fwhm_published, rel=0.05)
    # free spectral range of the HRE, λ²/2d: its next order is suppressed by the LRE
    fsr = ins.CRISP_LINES[line]["center"] ** 2 / (2 * ins.CRISP_HRE_SEPARATION_AA)
    side = ins.crisp_transmission(np.array([fsr, -fsr]), line)
    assert np.all(side < 0.2 * ins.crisp_transmission(np.array([0.0]), line))


def test_crisp_degrade_against_direct_quadrature():
    x = np.linspace(-2.0, 2.0, 1001)
    profile = 1.0 - 0.8 * np.exp(-0.5 * (x / 0.12) ** 2)
    out = ins.crisp_degrade(x, profile, "halpha")
    assert out.shape == (15,)
    # reference: the analytic profile times the transmission on a 0.1 mÅ grid
    t = np.linspace(-2.0, 2.0, 40001)
    analytic = 1.0 - 0.8 * np.exp(-0.5 * (t / 0.12) ** 2)
    positions = ins.crisp_positions("halpha")
    trans = ins.crisp_transmission(t[None, :] - positions[:, None], "halpha")
    expected = np.trapezoid(analytic * trans, t, axis=1) / np.trapezoid(trans, t, axis=1)
    # input sampled at 4 mÅ and linearly interpolated: error ~ (dx/σ)²/8 ~ 1e-4
    np.testing.assert_allclose(out, expected, atol=2e-4)
    # a flat spectrum passes unchanged; batches are supported
    flat = ins.crisp_degrade(x, np.full((3, x.size), 2.0), "ca8542")
    np.testing.assert_allclose(flat, 2.0, rtol=1e-12)
    with pytest.raises(ValueError, match="cover"):
        ins.crisp_degrade(np.linspace(-1, 1, 101), np.ones(101), "halpha")
