"""The torch LTE engine: profiles, formal solver, limits, derivatives, bad input.

References are analytic or independent: ``scipy.special.wofz`` for the
Faddeeva function, the Unno–Rachkovsky (Milne–Eddington) solution for the
polarized formal solver, the weak-field approximation for Stokes V and
central finite differences for the autodiff response functions.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import torch

from iris_lab.atmosphere import Atmosphere
from iris_lab.atomic import zeeman_pattern
from iris_lab.synthesis.formal import delo_bezier
from iris_lab.synthesis.lte import LARMOR_AA, LTESynthesizer
from iris_lab.synthesis.profiles import faddeeva, voigt_faraday


class _Lines:
    """Fe I 6301.5 / 6302.5 Å (Kurucz gfall rows of ../shared/data)."""

    def __init__(self, which=(0, 1), **override):
        data = {
            "element": np.array(["Fe", "Fe"]), "ion": np.array([1, 1]),
            "wavelength_air": np.array([6301.5008, 6302.4932]),
            "wavelength_vacuum": np.array([6303.2407, 6304.2377]),
            "log_gf": np.array([-0.718, -0.968]), "e_low": np.array([3.6537, 3.6864]),
            "j_low": np.array([2.0, 1.0]), "j_up": np.array([2.0, 0.0]),
            "lande_low": np.array([1.833, 2.5]), "lande_up": np.array([1.5, 0.0]),
            "log_gamma_rad": np.array([8.08, 8.08]),
            "log_gamma_stark": np.array([-5.42, -5.40]),
            "log_gamma_vdw": np.array([-7.54, -7.54]),
            "abo_sigma": np.array([0.0, 0.0]), "abo_alpha": np.array([0.0, 0.0]),
            "mass": np.array([55.845, 55.845]),
        }
        for name, value in data.items():
            setattr(self, name, np.asarray(override.get(name, value))[list(which)])

    def __len__(self):
        return len(self.log_gf)


FALC = Atmosphere.reference("falc")
PHOTOSPHERE = FALC.log_tau >= -5.0


def _fields(**extra):
    out = {n: torch.tensor(FALC.fields()[n][PHOTOSPHERE])
           for n in ("height", "temperature", "v_turb", "n_e", "n_h")}
    n = int(PHOTOSPHERE.sum())
    out.update({k: torch.full((n,), float(v), dtype=torch.float64) for k, v in extra.items()})
    return out


# -- profiles -----------------------------------------------------------
@pytest.mark.parametrize("a", [1e-4, 1e-2, 0.3, 3.0])
def test_faddeeva_matches_scipy(a):
    v = np.linspace(-200.0, 200.0, 4001)
    ours = faddeeva(torch.tensor(v + 1j * a)).numpy()
    ref = scipy.special.wofz(v + 1j * a)
    # 24-term Weideman expansion: < 3e-5 of the local value, < 1e-9 of the peak
    assert np.max(np.abs(ours.real - ref.real) / ref.real) < 3e-5
    assert np.max(np.abs(ours - ref)) < 1e-9 * np.abs(ref).max()


@pytest.mark.parametrize("a", [1e-3, 0.1, 1.0])
def test_voigt_faraday_fast_path_matches_scipy(a):
    v = torch.linspace(-150.0, 150.0, 30001, dtype=torch.float64)
    h, f = voigt_faraday(torch.tensor(a, dtype=torch.float64), v)
    ref = scipy.special.wofz(v.numpy() + 1j * a)
    # Humlíček region II beyond |v| + a = 5.5: < 5e-5 relative (1982, Table 1)
    assert np.max(np.abs(h.numpy() - ref.real) / ref.real) < 5e-5
    assert np.max(np.abs(f.numpy() - ref.imag)) < 5e-6 * np.abs(ref.imag).max()


def test_voigt_normalisation_and_symmetry():
    v = torch.linspace(-3000.0, 3000.0, 600001, dtype=torch.float64)
    h, f = voigt_faraday(torch.tensor(0.05, dtype=torch.float64), v)
    area = torch.trapezoid(h, v)
    # the Lorentz wings beyond |v| = 3000 hold a/(π·3000)·2·√π ≈ 1.9e-5 of √π
    assert abs(float(area) / np.sqrt(np.pi) - 1.0) < 3e-5
    assert torch.allclose(f, -f.flip(0), atol=1e-12)


# -- formal solver ---------------------------------------------------------
def test_formal_solver_matches_unno_rachkovsky():
    """Milne–Eddington: constant K̂, S = B0 + B1 τ → I = B0 e0 + B1 K̂⁻¹ e0."""
    ratios = (0.3, -0.2, 0.4, 0.1, 0.25, -0.15)    # η_Q,U,V, ρ_Q,U,V over η_I
    tau = torch.logspace(-5, 2.5, 200, dtype=torch.float64)
    b0, b1 = 1.0, 2.5
    stokes = delo_bezier(tau, b0 + b1 * tau,
                         [torch.full_like(tau, r) for r in ratios])
    eq, eu, ev, rq, ru, rv = ratios
    k = np.array([[1, eq, eu, ev], [eq, 1, rv, -ru], [eu, -rv, 1, rq], [ev, ru, -rq, 1]])
    expected = b0 * np.array([1.0, 0, 0, 0]) + b1 * np.linalg.solve(k, [1.0, 0, 0, 0])
    # quadratic Bézier + linear K'I on 200 points per 7.5 decades: ~1e-5 accuracy
    np.testing.assert_allclose(stokes.numpy(), expected, atol=2e-4 * expected[0])


# -- Zeeman patterns -------------------------------------------------------
def test_zeeman_pattern_anomalous_6301():
    z = zeeman_pattern([2.0], [2.0], [1.833], [1.5])
    # groups normalised; centre of gravity of σ_r is g_eff = 1.6667 (L&L 2004 eq. 3.44)
    for group in ("sigma_b", "pi", "sigma_r"):
        assert z[group]["strength"][0, z[group]["mask"][0]].sum() == pytest.approx(1.0)
    g_eff = (z["sigma_r"]["strength"][0] * z["sigma_r"]["shift"][0]).sum()
    assert g_eff == pytest.approx(0.5 * (1.833 + 1.5), abs=1e-9)
    assert np.allclose((z["pi"]["strength"][0] * z["pi"]["shift"][0]).sum(), 0.0)


# -- physical limits --------------------------------------------------------
def test_no_field_gives_no_polarization():
    synth = LTESynthesizer(_Lines(), torch.linspace(6300.8, 6303.0, 60))
    stokes = synth.stokes(_fields(b_field=0.0, inclination=0.7, azimuth=0.4))
    assert torch.all(torch.abs(stokes[1:]) <= 1e-13 * stokes[0])
    assert float(stokes[0].min()) < 0.8 * float(stokes[0].max())


def test_weak_field_stokes_v():
    """V ≈ -Δλ_B ḡ cos γ dI/dλ for 100 G on Fe I 6302.5 (ḡ = 2.5)."""
    wavelengths = torch.linspace(6302.0, 6303.0, 401, dtype=torch.float64)
    synth = LTESynthesizer(_Lines(which=(1,)), wavelengths)
    gamma = 0.6
    stokes = synth.stokes(_fields(b_field=100.0, inclination=gamma)).numpy()
    intensity = synth.stokes(_fields()).numpy()[0]
    d_i = np.gradient(intensity, wavelengths.numpy())
    lam0 = 6302.4932
    v_weak = -LARMOR_AA * lam0**2 * 100.0 * 2.5 * np.cos(gamma) * d_i
    rms = np.sqrt(np.mean((stokes[3] - v_weak) ** 2)) / np.abs(v_weak).max()
    # the 2 %: higher orders scale as (Δλ_B/Δλ_D)² ≈ 0.03 here
    assert rms <= 0.02, rms
    assert np.abs(stokes[3]).max() > 1e-3 * intensity.max()


def test_mu_and_batch_shapes():
    synth = LTESynthesizer(_Lines(), torch.linspace(6301.0, 6303.0, 30), mu=0.5)
    fields = {k: v.expand(2, 3, -1) for k, v in _fields(b_field=500.0).items()}
    out = synth.stokes(fields)
    assert out.shape == (2, 3, 4, 30)
    single = synth.stokes(_fields(b_field=500.0))
    assert torch.allclose(out[1, 2], single)
    # limb darkening: μ = 0.5 continuum below disk centre
    centre = LTESynthesizer(_Lines(), torch.linspace(6301.0, 6303.0, 30))
    assert float(single[0, 0]) < 0.9 * float(centre.stokes(_fields())[0, 0])


def test_log_tau_scale_with_hydrostatic_equilibrium():
    synth = LTESynthesizer(_Lines(), torch.linspace(6301.0, 6303.0, 40))
    keep = FALC.log_tau >= -4.5
    hydro = synth.stokes({"log_tau": torch.tensor(FALC.log_tau[keep]),
                          "temperature": torch.tensor(FALC.temperature[keep]),
                          "v_turb": torch.tensor(FALC.v_turb[keep])})
    given = synth.stokes(_fields())
    # same T(τ), densities from our EOS vs FAL-C's tabulated ones: within 3 %
    assert torch.allclose(hydro[0] / hydro[0, 0], given[0] / given[0, 0], atol=0.03)


def test_synthesize_returns_dataarray():
    synth = LTESynthesizer(_Lines(), np.linspace(6301.0, 6303.0, 25))
    spectra = synth.synthesize(FALC.broadcast_to((2,)), batch_dims=("x",))
    assert spectra.dims == ("x", "stokes", "wavelength")
    assert spectra.attrs["units"] == "erg / (s cm2 sr Angstrom)"
    assert list(spectra.stokes.values) == ["I", "Q", "U", "V"]


# -- derivatives -------------------------------------------------------------
def test_response_function_matches_finite_differences():
    keep = FALC.log_tau >= -4.0
    n = int(keep.sum())
    wavelengths = torch.linspace(6301.3, 6301.7, 9, dtype=torch.float64)
    synth = LTESynthesizer(_Lines(which=(0,)), wavelengths)
    base = {"log_tau": torch.tensor(FALC.log_tau[keep]),
            "temperature": torch.tensor(FALC.temperature[keep]),
            "n_e": torch.tensor(FALC.n_e[keep]), "n_h": torch.tensor(FALC.n_h[keep]),
            "b_field": torch.full((n,), 800.0, dtype=torch.float64),
            "inclination": torch.full((n,), 0.8, dtype=torch.float64)}
    rf = synth.response_functions(base, ("temperature",))["temperature"]
    assert rf.shape == (4, 9, n)
    step = 0.05       # K: truncation error ~1e-7 relative (measured), rounding ~1e-9
    for k in (10, 20, 25):
        up = dict(base, temperature=base["temperature"].clone())
        down = dict(base, temperature=base["temperature"].clone())
        up["temperature"][k] += step
        down["temperature"][k] -= step
        fd = (synth.stokes(up) - synth.stokes(down)) / (2 * step)
        scale = rf[..., k].abs().amax(dim=-1, keepdim=True)
        # 1e-4 relative to the largest response per Stokes parameter (the issue's)
        assert torch.all((rf[..., k] - fd).abs() <= 1e-4 * scale), k


def test_derivative_through_hydrostatic_equilibrium():
    """Forward-mode derivative including the EOS/HE solve vs finite differences."""
    keep = FALC.log_tau >= -3.0
    n, k, step = int(keep.sum()), 8, 0.05
    synth = LTESynthesizer(_Lines(which=(0,)), torch.linspace(6301.3, 6301.7, 7))
    base = {"log_tau": torch.tensor(FALC.log_tau[keep]),
            "temperature": torch.tensor(FALC.temperature[keep])}
    tangent = torch.zeros(n, dtype=torch.float64)
    tangent[k] = 1.0
    _, jvp = torch.func.jvp(lambda t: synth.stokes(dict(base, temperature=t)),
                            (base["temperature"],), (tangent,))
    up, down = base["temperature"].clone(), base["temperature"].clone()
    up[k] += step
    down[k] -= step
    fd = (synth.stokes(dict(base, temperature=up))
          - synth.stokes(dict(base, temperature=down))) / (2 * step)
    assert torch.all((jvp - fd).abs()[0] <= 1e-4 * jvp[0].abs().max())


def test_atomic_parameter_derivatives_match_finite_differences():
    wavelengths = torch.linspace(6301.2, 6302.8, 41, dtype=torch.float64)
    synth = LTESynthesizer(_Lines(), wavelengths)
    fields = _fields(b_field=300.0, inclination=0.5)
    rfs = synth.response_functions(fields, ("log_gf_offset", "dlambda"))
    for name in ("log_gf_offset", "dlambda"):
        jac = rfs[name]
        assert jac.shape == (4, 41, 2)
        step = 1e-5 if name == "log_gf_offset" else 1e-6
        for line in range(2):
            e = torch.zeros(2, dtype=torch.float64)
            e[line] = step
            fd = (synth.stokes(fields, **{name: e}) - synth.stokes(fields, **{name: -e})) / (
                2 * step)
            scale = jac[..., line].abs().max()
            assert torch.all((jac[..., line] - fd).abs() <= 1e-4 * scale), (name, line)


# -- bad input ---------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    synth = LTESynthesizer(_Lines(), torch.linspace(6301.0, 6303.0, 20))
    fields = _fields()
    bad = dict(fields, temperature=fields["temperature"].clone())
    bad["temperature"][3] = float("nan")
    with pytest.raises(ValueError, match="temperature.*NaN"):
        synth.stokes(bad)
    bad["temperature"][3] = -10.0
    with pytest.raises(ValueError, match="temperature.*> 0"):
        synth.stokes(bad)
    with pytest.raises(ValueError, match="depth scale"):
        synth.stokes({"temperature": fields["temperature"]})
    with pytest.raises(ValueError, match="contains none of"):
        LTESynthesizer(_Lines(), torch.linspace(5000.0, 5001.0, 20))
    with pytest.raises(ValueError, match="log_gf is not finite for line"):
        LTESynthesizer(_Lines(log_gf=[np.nan, -0.9]), torch.linspace(6301.0, 6303.0, 20))
    with pytest.raises(ValueError, match="mu"):
        LTESynthesizer(_Lines(), torch.linspace(6301.0, 6303.0, 20), mu=0.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        LTESynthesizer(_Lines(), torch.tensor([6302.0, 6301.0]))


# -- speed-ups keep the physics ----------------------------------------------
def test_far_wing_is_gauss_hermite_form_of_humlicek():
    """The real-arithmetic far wing equals Humlíček's complex region-II rational."""
    from iris_lab.synthesis.profiles import _far_wing, _far_wing_real

    a = torch.tensor([1e-3, 0.05, 0.8], dtype=torch.float64)[:, None]
    v = torch.linspace(-60.0, 60.0, 2001, dtype=torch.float64)
    h, f = _far_wing_real(a, v, True)
    w = _far_wing(torch.complex(v.expand(3, -1), a.expand(-1, v.numel())))
    assert torch.allclose(h, w.real, rtol=1e-5, atol=0)
    assert torch.allclose(f, w.imag, rtol=1e-5, atol=1e-14)


def test_interpolated_continuum_matches_exact_opacity():
    """ln κ_c linear between nodes ≤ 2 Å apart: < 1e-6 relative on a 2 Å and a 12 Å grid."""
    from iris_lab import eos, opacity

    fields = _fields()
    t, n_e, n_h = fields["temperature"], fields["n_e"], fields["n_h"]
    neutral = n_h * eos.ionisation_fractions("H", t, n_e)[..., 0]
    for grid in (torch.linspace(4015.0, 4017.0, 501), torch.linspace(2794.0, 2806.0, 600)):
        synth = LTESynthesizer(_Lines(), torch.linspace(6301.0, 6303.0, 5))
        synth.wavelengths = grid.double()
        from iris_lab.synthesis.lte import _continuum_nodes

        synth._continuum_nodes = _continuum_nodes(grid.double().numpy(), synth.device)
        assert synth._continuum_nodes is not None
        state = {"n_e": n_e, "n_h_neutral": neutral, "n_protons": None}
        ours = synth._continuum_kappa({"temperature": t}, state)
        exact = opacity.continuum_opacity(grid.double(), t, n_e, neutral).transpose(-1, -2)
        assert float(((ours - exact).abs() / exact).max()) < 1e-6


def test_line_cutoff_changes_spectrum_below_its_tolerance():
    """Profiles evaluated only where κ_line > 1e-4 κ_c: Stokes I and V change by
    < 1e-4 of the continuum intensity, yet fewer points are evaluated."""
    from iris_lab.atomic import LineList

    lines = LineList.shipped("4015_4017")
    grid = torch.linspace(4015.0, 4017.0, 301, dtype=torch.float64)
    f = _fields(b_field=1500.0, inclination=0.5, v_los=2e5)
    for polarized in (False, True):
        full = LTESynthesizer(lines, grid, polarized=polarized).stokes(f)
        cheap = LTESynthesizer(lines, grid, polarized=polarized, line_cutoff=1e-4)
        cut = cheap.stokes(f)
        diff = float((cut - full).abs().max() / full[0].max())
        assert 0.0 < diff < 1e-4, (polarized, diff)
    fields = cheap._prepare(f)
    state = cheap._state(fields)
    p = cheap.propagation(f)
    assert p["eta_i"].shape[-2] == grid.numel()
    with pytest.raises(ValueError, match="line_cutoff"):
        LTESynthesizer(lines, grid, line_cutoff=0.0)
    assert state["n_e"].shape == fields["temperature"].shape


def test_lines_without_lande_factors_are_unsplit_not_nan():
    """Nd II / Ce II rows of the 4015-4017 Å list have no Landé factors: the
    polarized synthesis treats them as unsplit (finite Stokes, V from Fe I)."""
    from iris_lab.atomic import LineList

    lines = LineList.shipped("4015_4017")
    assert not bool(np.all(lines.polarizable))
    grid = torch.linspace(4015.0, 4017.0, 201, dtype=torch.float64)
    stokes = LTESynthesizer(lines, grid).stokes(_fields(b_field=800.0, inclination=0.6))
    assert bool(torch.isfinite(stokes).all())
    assert float(stokes[3].abs().max()) > 1e-3 * float(stokes[0].max())


def test_vmap_jacobian_equals_jvp_jacobian():
    """All Jacobian columns at once (torch.func.vmap over tangents) through
    nodes, hydrostatic equilibrium, EOS and synthesis equal one-by-one JVPs."""
    from iris_lab.atomic import LineList
    from iris_lab.inversion.lm import jacobian
    from iris_lab.inversion.lte import LTEForward
    from iris_lab.nodes import NodeModel

    wave = np.linspace(6302.35, 6302.65, 13)
    synth = LTESynthesizer(LineList.shipped("fe6301_6302").select([1]), wave)
    model = NodeModel({"temperature": [-2.0, 0.0], "b_field": [-1.0]},
                      log_tau=np.round(np.arange(-4.0, 1.01, 0.25), 2))
    fwd = LTEForward(model, synth, continuum=float(synth.continuum_intensity()[0]))
    x = torch.tensor([[4800.0, 6400.0, 1200.0], [5000.0, 6500.0, 300.0]], dtype=torch.float64)
    _, by_jvp = jacobian(fwd, x, "jvp")
    _, by_vmap = jacobian(fwd, x, "vmap")
    assert float(by_jvp.abs().max()) > 0
    assert torch.allclose(by_vmap, by_jvp, rtol=1e-10, atol=1e-12 * float(by_jvp.abs().max()))
