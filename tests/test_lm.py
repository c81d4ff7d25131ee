"""Tests of the batched Levenberg–Marquardt fit (iris_lab.inversion.lm).

References: scipy.optimize.least_squares (MINPACK) for the nonlinear optimum,
the closed-form normal equations for linear models, Monte-Carlo scatter for
the Hessian uncertainties.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from iris_lab.inversion.lm import (
    FLAG_AT_BOUND,
    FLAG_DIVERGED,
    FLAG_MAX_ITER,
    FLAG_NAN,
    Cycle,
    LevenbergMarquardt,
    jacobian,
    solve_damped,
)

DT = torch.float64
WAVE = torch.linspace(-1.0, 1.0, 61, dtype=DT)


def gauss_line(x: torch.Tensor) -> torch.Tensor:
    """Absorption line: depth, shift, width, continuum slope -> (p, 61)."""
    depth, shift, width, slope = x.unbind(-1)
    prof = torch.exp(-(((WAVE - shift[:, None]) / width[:, None]) ** 2))
    return 1.0 + slope[:, None] * WAVE - depth[:, None] * prof


def gauss_line_jac(x: torch.Tensor, index=None):
    depth, shift, width, slope = x.unbind(-1)
    u = (WAVE - shift[:, None]) / width[:, None]
    prof = torch.exp(-u ** 2)
    j = torch.stack([-prof,
                     -depth[:, None] * prof * 2 * u / width[:, None],
                     -depth[:, None] * prof * 2 * u ** 2 / width[:, None],
                     WAVE.expand_as(prof)], dim=-1)
    return gauss_line(x), j


def truth_batch(n: int, seed: int = 1) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.tensor(np.column_stack([g.uniform(0.3, 0.8, n), g.uniform(-0.3, 0.3, n),
                                         g.uniform(0.15, 0.4, n), g.uniform(-0.05, 0.05, n)]),
                        dtype=DT)


def start_of(truth: torch.Tensor) -> torch.Tensor:
    return torch.tensor([0.5, 0.0, 0.25, 0.0], dtype=DT).expand_as(truth).clone()


@pytest.mark.parametrize("method", ["jvp", "vmap", "finite"])
def test_jacobian_matches_analytic(method):
    x = truth_batch(5)
    _, j_ref = gauss_line_jac(x)
    _, j = jacobian(gauss_line, x, method)
    # forward-mode AD is exact to rounding; forward differences with a 1e-6
    # relative step carry O(h) truncation error ~ 1e-6 of the curvature scale
    tol = 1e-5 if method == "finite" else 1e-12
    assert torch.allclose(j, j_ref, atol=tol, rtol=0)


@pytest.mark.parametrize("jac", ["jvp", "finite", "analytic"])
def test_noise_free_recovery(jac):
    truth = truth_batch(40)
    lm = LevenbergMarquardt(max_iter=100, jacobian=gauss_line_jac if jac == "analytic" else jac)
    lm.fit(gauss_line, gauss_line(truth), start_of(truth),
           lower=[0.0, -0.6, 0.05, -1.0], upper=[1.0, 0.6, 1.0, 1.0])
    # noise-free data: LM reaches the truth to the precision of the χ² tests
    # (ftol 1e-6 on χ² -> parameters to ~1e-6 relative or better)
    assert torch.allclose(lm.x_, truth, atol=1e-5)
    assert int((lm.quality_ & (FLAG_NAN | FLAG_DIVERGED | FLAG_MAX_ITER)).sum()) == 0


def test_matches_scipy_minpack_with_weights_and_noise():
    truth = truth_batch(6, seed=3)
    rng = np.random.default_rng(5)
    sigma = np.where(np.arange(61) % 2, 0.01, 0.03)     # per-wavelength noise
    weights = np.where(np.abs(WAVE.numpy()) > 0.9, 0.0, 1.0)  # masked edges
    obs = gauss_line(truth).numpy() + rng.normal(size=(6, 61)) * sigma
    lm = LevenbergMarquardt(max_iter=200, ftol=1e-12, uncertainties=False)
    lm.fit(gauss_line, obs, start_of(truth), sigma=sigma, weights=weights)
    sw = np.sqrt(weights) / sigma
    for p in range(6):
        ref = least_squares(
            lambda z, p=p: (gauss_line(torch.tensor(z[None]))[0].numpy() - obs[p]) * sw,
            start_of(truth)[p].numpy(), method="lm", xtol=1e-14, ftol=1e-14)
        # both find the same minimum: χ² equal to 1e-8 relative, parameters to
        # well below their noise uncertainty (~1e-3)
        assert float(lm.chi2_[p]) == pytest.approx(2 * ref.cost, rel=1e-8)
        assert np.allclose(lm.x_[p].numpy(), ref.x, atol=1e-6)


def test_pixels_independent_of_batch():
    truth = truth_batch(8, seed=7)
    obs = gauss_line(truth) + 0.01 * torch.randn(8, 61, generator=torch.Generator()
                                                  .manual_seed(0), dtype=DT)
    both = LevenbergMarquardt(max_iter=60).fit(gauss_line, obs, start_of(truth))
    alone = LevenbergMarquardt(max_iter=60).fit(gauss_line, obs[3:4], start_of(truth)[3:4])
    # per-pixel Marquardt parameters: a pixel follows the same path alone or in a batch
    assert torch.allclose(both.x_[3], alone.x_[0], atol=1e-12)


def test_linear_uncertainties_closed_form_and_monte_carlo():
    a = torch.stack([torch.ones_like(WAVE), WAVE, WAVE ** 2], -1)    # (61, 3)
    n_pix, s = 2000, 0.05
    coef = torch.tensor([1.0, 0.2, -0.3], dtype=DT)
    noise = s * torch.randn(n_pix, 61, generator=torch.Generator().manual_seed(2), dtype=DT)
    obs = coef @ a.T + noise
    lm = LevenbergMarquardt(max_iter=10).fit(lambda x: x @ a.T, obs, torch.zeros(n_pix, 3,
                                                                                  dtype=DT),
                                             sigma=s)
    cov = torch.linalg.inv(a.T @ a / s ** 2)
    # closed form: σ_j = sqrt(χ²_ν (AᵀWA)⁻¹_jj) exactly for a linear model
    expect = torch.sqrt(torch.diagonal(cov)[None] * lm.result_.chi2_reduced[:, None])
    assert torch.allclose(lm.sigma_, expect, rtol=1e-8)
    # Monte Carlo: the scatter of the fitted values over 2000 noise draws equals
    # the mean predicted σ; the std of a std estimate is 1/sqrt(2N) = 1.6 %, so
    # 6 % is a ~4-sigma tolerance
    scatter = lm.x_.std(0)
    assert torch.allclose(scatter, lm.sigma_.mean(0), rtol=0.06)


def test_flags_nan_bounds_max_iter_diverged():
    truth = truth_batch(4, seed=9)
    obs = gauss_line(truth)
    obs[1] = torch.nan                         # no usable data
    upper = [1.0, 0.6, 1.0, 1.0]
    upper_low = list(upper)
    upper_low[0] = float(truth[2, 0]) - 0.1    # truth of pixel 2 outside the box
    lm = LevenbergMarquardt(max_iter=100).fit(gauss_line, obs, start_of(truth),
                                              lower=[0.0, -0.6, 0.05, -1.0], upper=upper_low)
    q = lm.quality_
    assert q[1] & FLAG_NAN
    assert q[2] & FLAG_AT_BOUND and float(lm.x_[2, 0]) == pytest.approx(upper_low[0])
    assert torch.isfinite(lm.x_[0]).all() and not q[0] & (FLAG_NAN | FLAG_DIVERGED)

    short = LevenbergMarquardt(max_iter=1).fit(gauss_line, gauss_line(truth), start_of(truth))
    assert bool((short.quality_ & FLAG_MAX_ITER).all())

    def wrong_jac(x, index=None):  # sign-flipped Jacobian: no step can lower χ²
        m, j = gauss_line_jac(x)
        return m, -j

    bad = LevenbergMarquardt(max_iter=200, jacobian=wrong_jac, lam_max=1e6).fit(
        gauss_line, gauss_line(truth), start_of(truth))
    assert bool((bad.quality_ & FLAG_DIVERGED).all())

    def nan_model(x):
        m = gauss_line(x)
        return torch.where(x[:, :1] > 0.9, torch.nan, m)

    start = start_of(truth)
    start[0, 0] = 0.95
    flagged = LevenbergMarquardt(max_iter=5).fit(nan_model, gauss_line(truth), start)
    assert flagged.quality_[0] & FLAG_NAN and not flagged.quality_[3] & FLAG_NAN


def test_restarts_keep_best_chi2():
    t = torch.linspace(0, 6, 80, dtype=DT)

    def wave(x):  # strongly multimodal in the frequency
        return torch.sin(x[:, :1] * t)

    freq = torch.linspace(1.0, 3.0, 12, dtype=DT)[:, None]
    obs = wave(freq)
    x0 = torch.full((12, 1), 0.5, dtype=DT)
    one = LevenbergMarquardt(max_iter=60).fit(wave, obs, x0, lower=0.2, upper=4.0)
    many = LevenbergMarquardt(max_iter=60, n_restarts=8, restart_scale=0.4, seed=1).fit(
        wave, obs, x0, lower=0.2, upper=4.0)
    assert bool((many.chi2_ <= one.chi2_ + 1e-12).all())
    found_one = (one.x_ - freq).abs() < 1e-6
    found_many = (many.x_ - freq).abs() < 1e-6
    assert int(found_many.sum()) > int(found_one.sum())


def _poly_cycles():
    t = WAVE

    def lin(x):
        return x[:, :1] + x[:, 1:2] * t

    def cubic(x):
        return x[:, :1] + x[:, 1:2] * t + x[:, 2:3] * t ** 2 + x[:, 3:4] * t ** 3

    def pad(x):
        return torch.cat([x, torch.zeros(x.shape[0], 2, dtype=x.dtype)], -1)

    return [Cycle(lin, None, None, ["c0", "c1"]),
            Cycle(cubic, None, None, ["c0", "c1", "c2", "c3"], transfer=pad)]


def test_cycles_checkpoint_and_resume(tmp_path):
    truth = torch.tensor([[0.5, -1.0, 0.3, 2.0], [1.0, 0.0, -0.5, 0.1]], dtype=DT)
    obs = _poly_cycles()[1].forward(truth)
    x0 = torch.zeros(2, 2, dtype=DT)
    ck = tmp_path / "run.nc"
    full = LevenbergMarquardt(max_iter=20).fit_cycles(_poly_cycles(), obs, x0, checkpoint=ck)
    assert torch.allclose(full.x_, truth, atol=1e-9)
    assert ck.exists()
    # resume after the first cycle only: write a checkpoint from a one-cycle run
    ck1 = tmp_path / "first.nc"
    LevenbergMarquardt(max_iter=20).fit_cycles(_poly_cycles()[:1], obs, x0, checkpoint=ck1)
    resumed = LevenbergMarquardt(max_iter=20).fit_cycles(_poly_cycles(), obs, x0, checkpoint=ck1)
    assert torch.allclose(resumed.x_, full.x_, atol=1e-9)
    # a finished checkpoint is not re-run
    again = LevenbergMarquardt(max_iter=20).fit_cycles(_poly_cycles(), obs, x0, checkpoint=ck)
    assert int(again.result_.n_iter.sum()) == 0 and torch.allclose(again.x_, full.x_)


def test_dataset_save_load_roundtrip(tmp_path):
    truth = truth_batch(6)
    lm = LevenbergMarquardt(max_iter=40).fit(gauss_line, gauss_line(truth) + 0.01,
                                             start_of(truth),
                                             parameter_names=["depth", "shift", "width", "slope"])
    ds = lm.to_dataset(batch_shape=(2, 3), batch_dims=("y", "x"))
    assert ds["best_fit"].dims == ("y", "x", "parameter") and ds["quality"].attrs["flag_meanings"]
    assert ds["x"].dims == ("x",)                 # the pixel dimension keeps its name
    path = lm.save(tmp_path / "fit.nc", batch_shape=(2, 3), batch_dims=("y", "x"))
    back = LevenbergMarquardt.load(path)
    assert torch.allclose(back.x_, lm.x_) and back.result_.parameter_names[0] == "depth"
    assert back.max_iter == 40
    # files of the older layout named the parameters "x"
    import xarray as xr

    with xr.open_dataset(path, engine="h5netcdf") as old:
        old.load().rename_vars(best_fit="x").to_netcdf(tmp_path / "old.nc", engine="h5netcdf")
    assert torch.allclose(LevenbergMarquardt.load(tmp_path / "old.nc").x_, lm.x_)


def test_bad_input_raises():
    truth = truth_batch(2)
    obs = gauss_line(truth)
    lm = LevenbergMarquardt()
    with pytest.raises(ValueError, match="sigma"):
        lm.fit(gauss_line, obs, start_of(truth), sigma=0.0)
    with pytest.raises(ValueError, match="lower bound"):
        lm.fit(gauss_line, obs, start_of(truth), lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="x0"):
        lm.fit(gauss_line, obs, torch.zeros(3, 4, dtype=DT))
    with pytest.raises(ValueError, match="forward model returned"):
        lm.fit(gauss_line, obs[:, :10], start_of(truth))
    with pytest.raises(ValueError, match="Jacobian method"):
        jacobian(gauss_line, truth, "magic")


def test_finite_jacobian_step_follows_the_parameter_scale():
    """A velocity at 0 cm/s in a model with float32 internals (like an
    instrument matrix): a step of 1e-4 of a unit is lost in rounding and gives
    a zero column; a step scaled to the parameter (1e-4 × 1e5 cm/s) is right."""
    from iris_lab.inversion.lm import jacobian

    def fn(x):
        shifted = torch.cos(x[:, 0] / 1e5) + torch.sin(x[:, 0] / 1e5)
        return torch.stack([shifted.float().double(), x[:, 1] ** 2], dim=-1)

    x = torch.tensor([[0.0, 3.0]], dtype=torch.float64)
    _, exact = jacobian(fn, x, "jvp")
    _, scaled = jacobian(fn, x, "finite", step=1e-4,
                         scale=torch.tensor([1e5, 1.0], dtype=torch.float64))
    assert torch.allclose(scaled, exact, rtol=1e-2, atol=1e-9)
    _, unit = jacobian(fn, x, "finite", step=1e-4)
    assert float(unit[0, 0, 0]) == 0.0


def _bounded_linear_problem():
    """Correlated linear least squares whose unconstrained optimum has
    x0 < 0 while the box says x0 ≥ 0 (the bound is active at the solution)."""
    jac = torch.tensor([[1.0, 1.0], [1.0, 1.2], [1.0, 0.8], [0.3, 1.0]], dtype=DT)
    truth = torch.tensor([-0.6, 1.5], dtype=DT)
    obs = (jac @ truth)[None]
    return jac, obs


def test_active_bound_is_held_and_constrained_optimum_found():
    from scipy.optimize import lsq_linear

    jac, obs = _bounded_linear_problem()
    lm = LevenbergMarquardt(max_iter=6, lam0=1e-3, ftol=1e-14, uncertainties=False)
    lm.fit(lambda x: x @ jac.T, obs, torch.tensor([[1.0, 0.0]], dtype=DT),
           lower=[0.0, -10.0], upper=[10.0, 10.0])
    ref = lsq_linear(jac.numpy(), obs[0].numpy(), bounds=([0.0, -10.0], [10.0, 10.0]),
                     tol=1e-14)
    # a clamped Gauss–Newton step keeps x1's part meant for a negative x0 and
    # stalls; holding x0 on its bound reaches the constrained optimum at once
    assert np.allclose(lm.result_.x[0].numpy(), ref.x, atol=1e-8)
    assert int(lm.result_.quality[0]) & FLAG_AT_BOUND


def test_screen_starts_picks_each_pixels_best_candidate_and_skips_nan_models():
    from iris_lab.inversion.lm import screen_starts

    grid = torch.linspace(-1.0, 1.0, 21, dtype=torch.float64)

    def line(z):   # a Gaussian line at z[:, 0]; NaN model for z[:, 0] > 1.5
        out = torch.exp(-((grid - z[:, :1]) / 0.2) ** 2)
        return torch.where(z[:, :1] > 1.5, torch.nan, out)

    obs = line(torch.tensor([[0.55], [-0.45], [0.05]], dtype=torch.float64))
    shared = torch.tensor([[-0.5], [0.0], [0.5], [2.0]], dtype=torch.float64)
    start, choice = screen_starts(line, shared, obs, sigma=0.01)
    assert choice.tolist() == [2, 0, 1]
    assert torch.equal(start, shared[choice])
    # per-pixel candidates; the NaN candidate (2.0) never wins, even against a poor one
    own = torch.tensor([[[2.0], [-0.9]], [[-0.4], [2.0]], [[2.0], [0.1]]], dtype=torch.float64)
    start, choice = screen_starts(line, own, obs)
    assert choice.tolist() == [1, 0, 1]
    assert start[:, 0].tolist() == [-0.9, -0.4, 0.1]
    with pytest.raises(ValueError, match="candidates"):
        screen_starts(line, own[:2], obs)


def test_more_scale_floor_keeps_a_vanished_column_from_taking_a_huge_step():
    """A column that has nearly vanished (an inclination at 0 or π, where the
    spectra are symmetric in it) gets a unit-norm scaled column without a
    floor, so its step is ~1/‖column‖ at any λ; the floor (the column's
    earlier norm) bounds it."""
    jac = torch.tensor([[[1.0, 0.0], [0.0, 1e-9], [0.0, 0.0]]], dtype=torch.float64)
    res = torch.tensor([[0.5, 0.5, 0.1]], dtype=torch.float64)
    lam = torch.tensor([1e3], dtype=torch.float64)
    bare, _ = solve_damped(jac, res, lam)
    floored, _ = solve_damped(jac, res, lam, scale_floor=torch.tensor([[1.0, 1.0]],
                                                                      dtype=torch.float64))
    assert abs(float(bare[0, 1])) > 1e5                 # the pathology
    assert abs(float(floored[0, 1])) < 1e-9             # bounded by the floor
    assert float(floored[0, 0]) == pytest.approx(float(bare[0, 0]))   # others unchanged
