"""The coupled log(gf) experiment driver, the batched finite-difference
Jacobian and the panels built on the experiment's Dataset."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from iris_lab.inversion.coupled import (  # noqa: E402
    AtomicInversion,
    AtomicParameters,
    CoupledLevenbergMarquardt,
    batched_finite_jacobian,
)
from iris_lab.inversion.experiment import (  # noqa: E402
    MODES,
    blend_separation,
    depth_weighted_error,
    line_depths,
    perturb_atomic_data,
    run_coupled_experiment,
    stratification_rmsd,
    summary_table,
)

DT = torch.float64


# ----------------------------------------------------------------------------- Jacobian
def test_batched_finite_jacobian_matches_analytic_and_groups_rows():
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.3, -0.7]], dtype=DT)
    calls = []

    def fn(z):
        calls.append(z.shape[0])
        return torch.stack([z[:, 0] * z[:, 1], torch.sin(z[:, 2]), z[:, 0] ** 2], -1)

    model, jac = batched_finite_jacobian(fn, x, max_rows=5)
    exact = torch.zeros(2, 3, 3, dtype=DT)
    exact[:, 0, 0], exact[:, 0, 1] = x[:, 1], x[:, 0]
    exact[:, 1, 2] = torch.cos(x[:, 2])
    exact[:, 2, 0] = 2 * x[:, 0]
    assert torch.allclose(model, fn(x))
    assert torch.allclose(jac, exact, atol=1e-5)
    assert calls[:2] == [5, 3]          # (n + 1) p = 8 rows in groups of at most 5


def _toy():
    t = torch.linspace(-1, 1, 30, dtype=DT)

    def forward(x, g):  # per-pixel amplitude x, shared width g
        return x[:, :1] * torch.exp(-(t / g[:, :1]) ** 2)

    x_true = torch.linspace(0.5, 1.5, 8, dtype=DT)[:, None]
    obs = forward(x_true, torch.full((8, 1), 0.4, dtype=DT))
    return forward, obs


def test_coupled_lm_batched_jacobian_solves_the_toy_problem():
    forward, obs = _toy()
    fits = {}
    for method in ("finite", "batched"):
        fits[method] = CoupledLevenbergMarquardt(max_iter=50, jacobian=method).fit(
            forward, obs, torch.ones(8, 1, dtype=DT), torch.tensor([0.3], dtype=DT))
    assert float(fits["batched"].global_[0]) == pytest.approx(0.4, abs=1e-6)
    assert torch.allclose(fits["batched"].local_, fits["finite"].local_, atol=1e-6)


@pytest.mark.parametrize("mode", [1, 2, "averaged"])
def test_atomic_inversion_accepts_batched_lm_jacobian(mode):
    t = torch.linspace(-1, 1, 40, dtype=DT)
    centres = torch.tensor([-0.3, 0.4], dtype=DT)
    atomic = AtomicParameters(2, reference_line=0)

    def forward(local, gf, dl):   # two Gaussian lines, depth scaled by 10**gf
        depth = local[:, :1, None] * 10.0 ** gf[:, None, :]
        prof = torch.exp(-((t[None, :, None] - centres - dl[:, None, :]) / 0.1) ** 2)
        return 1.0 - (depth * prof).sum(-1)

    local_true = torch.tensor([[0.3], [0.5], [0.4]], dtype=DT)
    zeros = torch.zeros(3, 2, dtype=DT)
    obs = forward(local_true, zeros, zeros)
    inv = AtomicInversion(mode, atomic, max_iter=60, lm_options={"jacobian": "batched"})
    start = None if mode == 1 else atomic.join([0, 0.1], [0, 0.02])  # mode 1: exact data
    inv.fit(forward, obs, torch.full((3, 1), 0.35, dtype=DT), global0=start)
    if mode == 1:
        assert torch.allclose(inv.local_, local_true, atol=1e-6)
    else:
        assert abs(float(inv.log_gf_offset_[1])) < 1e-5
        assert abs(float(inv.dlambda_[1])) < 1e-6


# ----------------------------------------------------------------------------- helpers
def test_perturbation_keeps_reference_exact_and_has_paper_spread():
    gf, dl = perturb_atomic_data(4000, 7, seed=1)
    assert gf[7] == 0.0 and dl[7] == 0.0
    assert np.std(gf) == pytest.approx(0.2, rel=0.05)
    assert np.std(dl) == pytest.approx(0.005, rel=0.05)
    gf2, _ = perturb_atomic_data(4000, 7, seed=1)
    assert np.array_equal(gf, gf2)


def test_line_depth_and_blend_measure():
    w = np.linspace(0.0, 1.0, 101)
    spectrum = 1 - 0.6 * np.exp(-((w - 0.3) / 0.02) ** 2) - 0.2 * np.exp(-((w - 0.8) / 0.02) ** 2)
    assert line_depths(w, spectrum, np.array([0.3, 0.8])) == pytest.approx([0.6, 0.2], abs=1e-6)
    assert blend_separation(np.array([1.0, 1.02, 1.5])) == pytest.approx([20.0, 20.0, 480.0])
    assert np.isinf(blend_separation(np.array([1.0]))).all()


# ----------------------------------------------------------------------------- driver
@pytest.fixture(scope="module")
def experiment():
    return run_coupled_experiment(2, 2, lines=[12, 13], max_iter=2, snr=1000.0, seed=3)


def test_experiment_dataset_layout(experiment):
    ds = experiment
    assert list(ds["mode"].values) == list(MODES)
    assert ds.sizes["line"] == 2 and ds.sizes["y"] == 2 and ds.sizes["x"] == 2
    assert ds["observed"].dims == ("y", "x", "stokes", "wavelength")
    assert ds["fit"].dims == ("mode", "y", "x", "stokes", "wavelength")
    assert ds["temperature"].dims == ("mode", "y", "x", "log_tau")
    assert ds["wavelength"].attrs["units"] == "Angstrom"
    ref = ds.attrs["reference_line"]
    assert ds["line_depth"].values[ref] == ds["line_depth"].values.max()
    # mode 1 fits no atomic data; the others report finite errors on the free line
    assert np.isnan(ds["log_gf_error"].sel(mode="1").values).all()
    for mode in ("2", "3", "averaged"):
        err = ds["log_gf_error"].sel(mode=mode).values
        assert err[ref] == 0.0 and np.isfinite(err).all()
    assert np.isfinite(ds["log_gf_error_pixel"].values).all()
    assert np.isfinite(ds["fit"].values).all()
    assert (ds["wall_time"].values > 0).all()
    # the fits improve on the start: mode 1 has the exact atomic data
    assert float(ds["chi2_reduced"].sel(mode="1").median()) < 1e5


def test_summary_table(experiment):
    table = summary_table(experiment)
    assert list(table.index) == ["start", "mode 1", "mode 2", "mode 3", "averaged"]
    assert table.loc["mode 3", "paper [dex]"] == 0.004
    assert table.loc["mode 2", "paper [dex]"] == 0.025
    assert np.isnan(table.loc["mode 1", "mean |Δlog gf| [dex]"])
    assert np.isfinite(table.loc["mode 3", "mean |Δlog gf| [dex]"])
    assert table.loc["mode 3", "± s.e. [dex]"] >= 0.0
    # stratification errors: finite, and the truth scores zero against itself
    assert np.isfinite(table.loc["mode 1", "T RMSD [K]"])
    perfect = experiment.copy()
    for name in ("temperature", "v_los", "b_field"):
        truth = perfect[f"{name}_true"].expand_dims(mode=perfect["mode"].values)
        perfect[name] = truth.transpose(*perfect[name].dims)
    rmsd = stratification_rmsd(perfect)
    assert all(v == 0.0 for mode in rmsd.values() for v in mode.values())


def test_depth_weighted_error_weights_deep_lines():
    mean, se = depth_weighted_error(np.array([0.0, 0.1]), np.array([3.0, 1.0]))
    assert mean == pytest.approx(0.025)
    assert se > 0.0
    assert depth_weighted_error(np.array([0.02, -0.02]), np.array([1.0, 5.0]))[1] == 0.0


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown modes"):
        run_coupled_experiment(2, 2, modes=(4,))


# ----------------------------------------------------------------------------- panels
def test_log_gf_error_plot(experiment):
    from iris_lab.widgets.coupled import plot_log_gf_errors, png_bytes

    fig = plot_log_gf_errors(experiment)
    assert len(fig.axes) == 3                       # depth, blend, colour bar
    assert png_bytes(fig)[:4] == b"\x89PNG"
    assert len(plot_log_gf_errors(experiment, against="depth").axes) == 2
    with pytest.raises(ValueError):
        plot_log_gf_errors(experiment, against="nope")


def test_explorer_select_updates_readout_and_image(experiment):
    from iris_lab.widgets.coupled import CoupledExplorer

    explorer = CoupledExplorer(experiment)
    assert explorer.readout.value.startswith("pixel y=1 x=1")
    before = explorer.detail.value
    explorer.select(0, 0)
    assert explorer.selected == (0, 0)
    assert explorer.readout.value.startswith("pixel y=0 x=0 · ")
    assert explorer.detail.value != before
    explorer.select(9, -3)                          # clipped into the map
    assert explorer.selected == (1, 0)


# ----------------------------------------------------------------------------- azimuth start
def test_azimuth_from_stokes_recovers_the_field_azimuth_of_lte_spectra():
    """Spectra of the LTE engine with known azimuths (several beyond ±45°,
    where the 90° ambiguity bites) against the Q of a different start model
    (weaker, less inclined field) at azimuth 0: the recovered azimuth is the
    true one (mod π), because Q and U of a depth-constant azimuth are one
    profile times cos 2φ and sin 2φ (up to magneto-optical rotation)."""
    from iris_lab.atomic import LineList
    from iris_lab.inversion.experiment import window_wavelengths
    from iris_lab.inversion.lte import LTEForward, azimuth_from_stokes, quiet_sun_start
    from iris_lab.nodes import NodeModel
    from iris_lab.synthesis.lte import LTESynthesizer

    lines = LineList.shipped("4015_4017").select([12, 13])
    wave = window_wavelengths(np.asarray(lines.wavelength_air, dtype=float))
    model = NodeModel({"temperature": [-2.0, -0.5, 0.5], "b_field": [-1.0],
                       "inclination": [-1.0], "azimuth": [-1.0]},
                      log_tau=np.round(np.arange(-3.6, 1.01, 0.2), 2))
    fwd = LTEForward(model, LTESynthesizer(lines, wave), continuum=1.0)
    truth = np.array([0.3, -1.2, 1.4, -0.6, 2.9 - np.pi])       # rad, in (−π/2, π/2]
    pixel = quiet_sun_start(model, b_field=1500.0, inclination=1.2, azimuth=0.0)
    params = np.repeat(pixel[None], truth.size, 0)
    params[:, -1] = truth
    with torch.no_grad():
        stokes = fwd(torch.as_tensor(params, dtype=DT)).reshape(truth.size, 4, -1).numpy()
        ref = fwd(torch.as_tensor(quiet_sun_start(model, b_field=300.0, inclination=0.8,
                                                  azimuth=0.0)[None], dtype=DT))
    ref_q = ref.reshape(4, -1)[1].numpy()
    assert np.abs(stokes[:, 2]).max() > 1e-4                     # U is there to be read
    found = azimuth_from_stokes(stokes[:, 1], stokes[:, 2], ref_q)
    # within the rotation of the polarisation plane by magneto-optical effects
    # (Faraday rotation, 0.06 rad at 1500 G here), far from the 90° ambiguity
    assert found == pytest.approx(truth, abs=0.1)
    assert np.ptp(found - truth) < 1e-6                          # one rotation for all
    # a pixel without linear polarisation gets azimuth 0, not NaN
    assert azimuth_from_stokes(np.zeros(4), np.zeros(4), np.ones(4)) == 0.0
