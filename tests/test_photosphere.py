"""Tests of the MHD-like photospheric field of view (iris_lab.worlds.photosphere)."""

from __future__ import annotations

import numpy as np
import pytest

from iris_lab.worlds.photosphere import (
    FAMILIES,
    gaussian_psf_matrix,
    photon_noise_sigma,
    photosphere_log_tau,
    sample_photosphere_fov,
)


@pytest.fixture(scope="module")
def fov():
    return sample_photosphere_fov(12, 12, seed=0)


def _at(atm, name, family, fam, log_tau):
    i = int(np.argmin(np.abs(photosphere_log_tau() - log_tau)))
    return getattr(atm, name)[family == fam][:, i]


def test_shape_families_and_bounds(fov):
    atm, family = fov
    assert atm.batch_shape == (12, 12) and atm.n_depth == photosphere_log_tau().size
    assert set(family.ravel().tolist()) == set(FAMILIES)
    assert atm.temperature.min() >= 3000 and atm.temperature.max() < 12000
    assert np.abs(atm.v_los).max() < 8e5 and atm.b_field.min() >= 0
    assert np.all((atm.inclination >= 0) & (atm.inclination <= np.pi))


def test_family_physics(fov):
    atm, family = fov
    # granulation: hot upflowing granules, cool downflowing lanes at log τ = 0 ...
    t_g, t_i = _at(atm, "temperature", family, "granule", 0.0), \
        _at(atm, "temperature", family, "intergranule", 0.0)
    assert t_g.mean() - t_i.mean() > 300.0
    assert _at(atm, "v_los", family, "granule", 0.0).mean() < 0 < \
        _at(atm, "v_los", family, "intergranule", 0.0).mean()
    # ... and reversed granulation in the upper photosphere (granules cooler)
    assert _at(atm, "temperature", family, "granule", -2.5).mean() < \
        _at(atm, "temperature", family, "intergranule", -2.5).mean()
    # umbra: coolest, strongest and most vertical field; penumbra inclined
    t_u = _at(atm, "temperature", family, "umbra", 0.0)
    assert t_u.mean() < t_i.mean() - 800.0
    assert _at(atm, "b_field", family, "umbra", 0.0).mean() > 2000.0
    assert np.rad2deg(_at(atm, "inclination", family, "umbra", 0.0)).mean() < 35.0
    assert np.rad2deg(_at(atm, "inclination", family, "penumbra", -0.5)).mean() > 60.0
    # field weak in granules away from the spot
    assert np.median(_at(atm, "b_field", family, "granule", 0.0)) < 200.0


def test_stratifications_are_not_node_shaped(fov):
    atm, _ = fov
    x = photosphere_log_tau()
    nodes = np.array([-2.5, -1.5, -0.5, 0.4])
    inside = (x >= nodes[0]) & (x <= nodes[-1])
    t = atm.temperature.reshape(-1, x.size)
    through_nodes = np.array([np.interp(x, nodes, np.interp(nodes, x, row)) for row in t])
    dev = np.abs(t - through_nodes)[:, inside].max(1)
    # the stratifications carry structure between the inversion's 4 T nodes:
    # in most pixels a node model misses the truth by more than 30 K
    assert np.mean(dev > 30.0) > 0.7


def test_seeded_and_varied():
    a1, f1 = sample_photosphere_fov(10, 10, seed=5)
    a2, f2 = sample_photosphere_fov(10, 10, seed=5)
    a3, _ = sample_photosphere_fov(10, 10, seed=6)
    assert np.array_equal(a1.temperature, a2.temperature) and np.array_equal(f1, f2)
    assert not np.allclose(a1.temperature, a3.temperature)
    quiet, _ = sample_photosphere_fov(10, 10, seed=5, spot=False)
    assert quiet.b_field.max() < 600.0
    with pytest.raises(ValueError, match="at least 2x2"):
        sample_photosphere_fov(1, 10)


def test_psf_conserves_flux_and_has_its_width():
    w = np.linspace(4015.0, 4017.0, 401)
    m = gaussian_psf_matrix(w, 0.05)
    line = 1.0 - 0.6 * np.exp(-(((w - 4016.0) / 0.02) ** 2))
    blurred = m @ line
    dw = w[1] - w[0]
    # equivalent width is conserved (line far from the edges): 1e-6 relative
    assert np.sum(1 - blurred) * dw == pytest.approx(np.sum(1 - line) * dw, rel=1e-6)
    delta = np.zeros_like(w)
    delta[200] = 1.0
    resp = m.T @ delta
    half = resp >= resp.max() / 2
    # measured FWHM on a 5 mÅ grid: within one sample of 50 mÅ
    assert abs(half.sum() * dw - 0.05) <= dw + 1e-9


def test_photon_noise_sigma():
    assert photon_noise_sigma(np.array([1.0, 0.25]), 200.0) == pytest.approx([0.005, 0.0025])
    with pytest.raises(ValueError):
        photon_noise_sigma(np.array(1.0), 0.0)
