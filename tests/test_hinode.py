"""Tests of the Hinode/SP reader, instrument profile, noise estimate and the LTE
forward model used by the inversions (the real sample shipped in iris_lab/data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iris_lab.io.hinode import (
    continuum_windows,
    estimate_noise,
    instrument_matrix,
    read_hinode_sp,
    read_instrument_profile,
    shipped_sample,
)

CUBE, PROFILE = shipped_sample()


@pytest.fixture(scope="module")
def obs():
    return read_hinode_sp(CUBE)


def test_reader_normalisation(obs):
    spectra = obs["spectra"].values
    assert spectra.shape == (5, 5, 4, 112) and obs["spectra"].dims[-1] == "wavelength"
    free = continuum_windows(obs.wavelength.values)
    i_cont = np.median(spectra[:, :, 0, free], axis=-1)
    # the stored continuum map and the line-free Stokes I agree (both / IC_HSRA);
    # 2 %: the windows sit in the far wings where the Fe I lines still absorb ~1 %
    assert np.allclose(i_cont, obs["continuum_intensity"].values, rtol=0.02)
    assert 0.8 < i_cont.mean() < 1.1


def test_noise_estimate_consistent_across_stokes(obs):
    spectra = obs["spectra"].values
    wave = obs.wavelength.values
    sigma = estimate_noise(spectra, wave)
    # Hinode/SP normal maps: a few 1e-3 of the continuum
    assert 5e-4 < sigma < 3e-3
    # independent check: Stokes V in the same windows (no signal there either)
    v = spectra[:, :, 3, continuum_windows(wave)]
    v = v - v.mean(-1, keepdims=True)
    sigma_v = 1.4826 * np.median(np.abs(v - np.median(v)))
    assert sigma_v == pytest.approx(sigma, rel=0.3)


def test_instrument_profile_conserves_line_strength(obs):
    offsets, trans = read_instrument_profile(PROFILE)
    half = trans >= trans.max() / 2
    # Hinode/SP spectral resolution: FWHM ≈ 25 mÅ at 630 nm (R ≈ 2.5e5)
    assert 0.015 < offsets[half][-1] - offsets[half][0] < 0.035
    wave = obs.wavelength.values
    step = np.median(np.diff(wave)) / 4
    fine = np.arange(wave[0] - 0.1, wave[-1] + 0.1, step)
    m = instrument_matrix(fine, wave, offsets, trans)
    line = 1 - 0.7 * np.exp(-(((fine - 6302.0) / 0.05) ** 2))
    observed = m @ line
    eq_fine = np.sum(1 - line) * step
    eq_obs = np.sum(1 - observed) * np.median(np.diff(wave))
    # equivalent width conserved to 0.5 % (coarse 21.4 mÅ sampling of a 50 mÅ line)
    assert eq_obs == pytest.approx(eq_fine, rel=5e-3)
    with pytest.raises(ValueError):
        instrument_matrix(fine[:3], wave, offsets, trans)


@pytest.mark.slow  # ~90 s on the shared 2-core machine (LTE engine with HE per call)
def test_lte_forward_jacobian_matches_finite_differences():
    from iris_lab.atomic import LineList
    from iris_lab.inversion.lm import jacobian
    from iris_lab.inversion.lte import LTEForward
    from iris_lab.nodes import NodeModel
    from iris_lab.synthesis.lte import LTESynthesizer

    wave = np.linspace(6302.35, 6302.65, 13)
    synth = LTESynthesizer(LineList.shipped("fe6301_6302").select([1]), wave)
    model = NodeModel({"temperature": [-2.0, 0.0], "b_field": [-1.0]},
                      log_tau=np.round(np.arange(-4.0, 1.01, 0.25), 2))
    fwd = LTEForward(model, synth, continuum=float(synth.continuum_intensity()[0]))
    x = torch.tensor([[4800.0, 6400.0, 1200.0]], dtype=torch.float64)
    _, j_ad = jacobian(fwd, x, "jvp")
    cols = []
    for i, h in enumerate((1.0, 1.0, 1.0)):
        d = torch.zeros_like(x)
        d[0, i] = h
        cols.append((fwd(x + d) - fwd(x - d)) / (2 * h))
    j_fd = torch.stack(cols, -1)
    # central differences with a 1 K / 1 G step: truncation error ~ h² f''' ≪ 1e-6
    # of the largest derivative; forward-mode AD must agree to that level
    scale = j_ad.abs().amax(dim=(0, 1))
    assert torch.allclose(j_ad / scale, j_fd / scale, atol=1e-5)
    assert fwd(x).shape == (1, 4 * wave.size)


def test_mode1_inversion_of_real_pixels_fits_and_is_labelled():
    """invert_hinode_mode1 on two real Hinode/SP pixels: three LM iterations bring
    χ²_ν well down from the start, and the result is a labelled dataset."""
    from iris_lab.inversion.lte import invert_hinode_mode1

    start = invert_hinode_mode1(str(CUBE), str(PROFILE), max_iter=0, pixels=[0, 12])
    ds = invert_hinode_mode1(str(CUBE), str(PROFILE), max_iter=3, pixels=[0, 12])
    assert ds["chi2_reduced"].dims == ("pixel",)
    assert np.all(ds["chi2_reduced"].values < 0.5 * start["chi2_reduced"].values)
    assert ds["temperature"].dims == ("pixel", "log_tau_map")
    assert ds["temperature"].attrs["units"] == "K"
    assert ds["log_tau_map"].values.tolist() == [-1.0, 0.0]
    assert ds["fit"].dims == ("pixel", "stokes", "wavelength")
    assert ds["stokes"].values.tolist() == list("IQUV")
    for name in ("temperature", "v_los", "b_field", "inclination", "fit"):
        assert np.all(np.isfinite(ds[name].values)), name
    assert 3000.0 < float(ds["temperature"].sel(log_tau_map=0.0).min()) < 8000.0
    assert ds.attrs["instrument"] == "Hinode/SP" and ds.attrs["noise_sigma"] > 0


def test_screened_starts_of_real_pixels_are_never_worse():
    """The screened start of every real pixel (atmospheres, velocities, azimuth
    from its own Q and U or not) fits it at least as well as the single
    quiet-Sun start, and the start matters for some pixels of this quiet field."""
    from iris_lab.inversion.lte import HINODE_START_NAMES, invert_hinode_mode1

    pixels = list(range(0, 25, 3))
    plain = invert_hinode_mode1(str(CUBE), str(PROFILE), max_iter=0, pixels=pixels,
                                screen=False)
    screened = invert_hinode_mode1(str(CUBE), str(PROFILE), max_iter=0, pixels=pixels)
    before, after = plain["chi2_reduced"].values, screened["chi2_reduced"].values
    assert np.all(after <= before * (1 + 1e-9))
    assert np.any(after < 0.97 * before)
    plain_start = HINODE_START_NAMES.index("quiet_v+0.0_azimuth_fixed")
    assert plain["start"].values.tolist() == [plain_start] * len(pixels)
    assert set(screened["start"].values.tolist()) <= set(range(len(HINODE_START_NAMES)))
