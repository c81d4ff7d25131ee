"""Atmosphere generators: physical bounds, determinism, hydrostatics, beam physics."""

from __future__ import annotations

import numpy as np
import pytest

from iris_lab.atmosphere import Atmosphere
from iris_lab.worlds import chromosphere as ch
from iris_lab.worlds import flare as fl


def _assert_physical(atm: Atmosphere, v_max: float) -> None:
    for name, value in atm.fields().items():
        assert np.all(np.isfinite(value)), name
    assert np.all(atm.temperature >= 3000.0)
    assert np.all(np.diff(atm.height, axis=-1) < 0), "height must decrease with depth"
    assert np.all(np.abs(atm.v_los) <= v_max)
    assert np.all(atm.v_turb >= 0)
    for name in ("n_e", "n_h", "p_gas", "rho"):
        assert np.all(getattr(atm, name) > 0), name


# -- chromospheric families -----------------------------------------------------------
def test_mgii_families_physical_over_many_seeds():
    for seed in range(6):
        atm, family = ch.sample_mgii_atmospheres(240, seed=seed)
        assert atm.batch_shape == (240,) and atm.n_depth == 82
        _assert_physical(atm, ch.V_LOS_MAX)
        assert np.all(np.diff(atm.log_tau, axis=-1) > 0), "log_tau must increase with depth"
        assert np.all(atm.v_turb <= ch.V_TURB_MAX)
        # chromosphere never colder than the stated floor, corona untouched
        assert atm.temperature.max() <= 1.0e5 + 1e-6
        assert np.all(atm.n_e <= 1.3 * atm.n_h), "at most ~1.2 electrons per H nucleus"
        counts = {f: int(np.sum(family == f)) for f in ch.FAMILY_NAMES}
        assert set(counts.values()) == {40}


def test_mgii_hydrostatic_equilibrium():
    atm, _ = ch.sample_mgii_atmospheres(30, seed=11)
    # p_gas + ρ v_t²/2 = g m, and dm = ρ dh: the finite-difference pressure
    # gradient must lie between g ρ at the two ends of each layer (mean value
    # theorem; 2 % for the trapezoid in ln m)
    p_total = atm.p_gas + 0.5 * atm.rho * atm.v_turb**2
    gradient = np.diff(p_total, axis=-1) / -np.diff(atm.height, axis=-1) / ch.GRAVITY
    lo = np.minimum(atm.rho[:, 1:], atm.rho[:, :-1])
    hi = np.maximum(atm.rho[:, 1:], atm.rho[:, :-1])
    assert np.all(gradient >= 0.98 * lo) and np.all(gradient <= 1.02 * hi)
    # ideal gas
    n_tot = atm.n_h * (1.0 + ch.A_HE) + atm.n_e
    np.testing.assert_allclose(atm.p_gas, n_tot * ch.K_B * atm.temperature, rtol=1e-10)


def test_quiet_template_reproduces_falc_stratification():
    falc = Atmosphere.reference("falc")
    quiet = ch.family_template("quiet")
    np.testing.assert_allclose(quiet.temperature, falc.temperature, rtol=1e-12)
    # hydrostatics from T and v_turb alone recovers FAL-C's densities within 25 %
    # (largest at 8-9 kK, where FAL-C's NLTE hydrogen ionisation changes the particle
    # count and its mean mass per H differs) and its heights within 200 km
    np.testing.assert_allclose(quiet.n_h, falc.n_h, rtol=0.25)
    np.testing.assert_allclose(quiet.n_e, falc.n_e, rtol=0.1)
    assert np.max(np.abs(quiet.height - falc.height)) < 2.0e7


def test_family_templates_follow_their_sources():
    at = {f: ch.family_template(f) for f in ch.FAMILY_NAMES}

    def t_at(name, log_tau):
        atm = at[name]
        return float(np.interp(log_tau, atm.log_tau, atm.temperature))

    # Maltby et al. 1986 model M: T(τ500 = 1) ≈ 4.2 kK, T_min ≈ 3.4 kK
    assert 3900.0 < t_at("umbra", 0.0) < 4500.0
    assert 3000.0 <= at["umbra"].temperature[40:70].min() < 3700.0
    # penumbra between umbra and quiet Sun in the photosphere
    assert t_at("umbra", 0.0) < t_at("penumbra", 0.0) < t_at("quiet", 0.0)
    # plage and flare chromospheres hotter, coronal hole cooler than FAL-C at log τ = -5
    assert t_at("coronal_hole", -5.0) < t_at("quiet", -5.0) < t_at("plage", -5.0) \
        < t_at("flare", -5.0)
    # TR pressure ordering: coronal hole < quiet < plage < flare
    p_tr = [at[f].p_gas[0] for f in ("coronal_hole", "quiet", "plage", "flare")]
    assert np.all(np.diff(p_tr) > 0)


def test_mgii_sampler_is_seeded_and_ordered():
    a1, f1 = ch.sample_mgii_atmospheres(60, seed=3)
    a2, f2 = ch.sample_mgii_atmospheres(60, seed=3)
    a3, _ = ch.sample_mgii_atmospheres(60, seed=4)
    np.testing.assert_array_equal(f1, f2)
    for name in ("temperature", "v_los", "v_turb", "n_e", "height"):
        np.testing.assert_array_equal(getattr(a1, name), getattr(a2, name))
    assert not np.allclose(a1.temperature, a3.temperature)
    # warm-start order: consecutive members closer than random pairs of a family
    atm, fam = ch.sample_mgii_atmospheres(300, seed=5, families=["quiet"])
    log_t = np.log(atm.temperature)
    chain = np.abs(np.diff(log_t, axis=0)).mean()
    shuffled = np.abs(log_t[np.random.default_rng(0).permutation(300)] - log_t).mean()
    assert chain < 0.6 * shuffled


def test_mgii_sampler_arguments():
    atm, fam = ch.sample_mgii_atmospheres(5, seed=0, families=["umbra", "plage"])
    assert list(fam) == ["plage"] * 3 + ["umbra"] * 2  # chain order of FAMILY_NAMES
    with pytest.raises(ValueError, match="unknown families"):
        ch.sample_mgii_atmospheres(5, seed=0, families=["sunspot"])
    with pytest.raises(ValueError, match="positive integer"):
        ch.sample_mgii_atmospheres(0, seed=0)


def test_lte_electron_density_limits():
    # fully ionised hydrogen at high T: n_e → n_tot/(2 + A_He)·(1 + A_m)
    t, p = np.array([5.0e4]), np.array([1.0])
    n_tot = p / (ch.K_B * t)
    assert ch.lte_electron_density(t, p)[0] == pytest.approx(
        n_tot[0] * (1 + ch.A_METALS) / (2 + ch.A_HE + ch.A_METALS), rel=1e-3)
    # cool photosphere: metals only (hydrogen ionisation negligible at 4000 K)
    t, p = np.array([4000.0]), np.array([1.0e5])
    n_h = p / (ch.K_B * t) / (1 + ch.A_HE)
    assert ch.lte_electron_density(t, p)[0] < 1.01 * ch.A_METALS * n_h[0]


# -- flares ---------------------------------------------------------------------------
def test_flare_height_grid_is_radynversions():
    z = fl.flare_height_grid()
    assert z.shape == (50,) and np.all(np.diff(z) < 0)
    lin = z[::-1][:45]
    np.testing.assert_allclose(np.diff(lin), (3.5e8 + 6.5e6) / 44, rtol=1e-9)
    ratios = z[::-1][44:] / z[::-1][43:-1]
    np.testing.assert_allclose(ratios[1:], ratios[1], rtol=1e-9)  # geometric above 3.5 Mm
    assert z[0] == pytest.approx(1.05e9)


@pytest.mark.parametrize(("e_cut", "delta"), [(10.0, 3.0), (20.0, 5.0), (25.0, 8.0)])
def test_beam_heating_integrates_to_the_flux(e_cut, delta):
    column = np.logspace(14, 25, 6000)
    q = fl.beam_heating_per_column(column, 1.0e10, e_cut, delta)
    # thick target: every electron stops, so ∫ q dN* = F (trapezoid on a
    # log grid of 550 points per decade: 0.5 %)
    assert np.trapezoid(q, column) == pytest.approx(1.0e10, rel=5e-3)
    # small-column limit of the incomplete beta function: q → K F (δ-2)/(δ E_c²)
    k = 2 * np.pi * fl.ELECTRON_CHARGE**4 * fl.LAMBDA_IONISED
    limit = k * 1.0e10 * (delta - 2) / (delta * (e_cut * fl.KEV) ** 2)
    assert q[0] == pytest.approx(limit, rel=1e-3)
    with pytest.raises(ValueError, match="delta"):
        fl.beam_heating_per_column(column, 1.0e10, e_cut, 2.0)


def test_flare_sequences_physical_over_many_seeds():
    for seed in range(4):
        atm, beam = fl.sample_flare_sequences(12, 12, seed=seed, dt=2.0)
        assert atm.batch_shape == (12, 12) and atm.n_depth == 50
        np.testing.assert_array_equal(atm.height[0, 0], fl.flare_height_grid())
        _assert_physical(atm, fl.V_CORONA_MAX)
        assert atm.temperature.max() <= fl.T_CEIL
        chromosphere = atm.temperature < 3.0e4
        assert np.all(np.abs(atm.v_los[chromosphere]) <= fl.V_CHROMOSPHERE_MAX)
        assert np.all((beam.flux >= 3e10) & (beam.flux <= 1e12))
        assert np.all((beam.e_cut >= 10) & (beam.e_cut <= 25))
        assert np.all((beam.delta >= 3) & (beam.delta <= 8))
        np.testing.assert_allclose(beam.time.values, 2.0 * np.arange(1, 13))


def test_flare_sequences_are_seeded_and_smooth_in_time():
    a1, b1 = fl.sample_flare_sequences(6, 10, seed=9)
    a2, b2 = fl.sample_flare_sequences(6, 10, seed=9)
    np.testing.assert_array_equal(a1.temperature, a2.temperature)
    np.testing.assert_array_equal(b1.flux.values, b2.flux.values)
    log_t = np.log(a1.temperature)
    in_time = np.abs(np.diff(log_t, axis=1)).mean()
    across = np.abs(np.diff(log_t, axis=0)).mean()
    assert in_time < 0.5 * across


def test_flare_response_to_the_beam():
    z = fl.flare_height_grid()
    atm = fl.flare_atmospheres([3e10, 1e12], 20.0, 5.0, [2.0, 6.0, 10.0])
    peak = atm[:, 2]
    # the transition region (highest point below 10^5 K, counted from the top)
    tr = np.array([z[np.argmax(t < 1e5)] for t in peak.temperature])
    pre = z[np.argmax(Atmosphere.reference("falc").temperature[::-1][::-1] < 1e5)]
    assert tr[1] < tr[0] <= pre + 1e7, "a stronger beam pushes the TR down"
    for i in range(2):
        above = z > tr[i]
        below = (z < tr[i]) & (z > tr[i] - 5e7)
        assert peak.v_los[i][above].min() < -1e6, "evaporation upflow above the TR"
        assert peak.v_los[i][below].max() > 1e6, "condensation downflow below the TR"
    # a hotter corona and denser chromosphere for the stronger beam
    assert peak.temperature[1].max() > peak.temperature[0].max()
    chromo = (z < 1.0e8) & (z > 5.0e7)
    assert np.all(peak.n_e[1][chromo] >= peak.n_e[0][chromo])
    with pytest.raises(ValueError, match="delta"):
        fl.flare_atmospheres(1e11, 20.0, 1.5, [1.0])
    with pytest.raises(ValueError, match="times"):
        fl.flare_atmospheres(1e11, 20.0, 5.0, [2.0, 1.0])
