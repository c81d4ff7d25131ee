"""Tests of the coupled (local + global) inversion and globin's modes.

The forward model is an analytic multi-line spectrum: lines with opacity
η_l = 10^(log gf_l − θ_p E_l) (a Boltzmann-like temperature sensitivity with
per-line excitation energy E_l), Gaussian profiles shifted by the pixel's
velocity v_p and the line's Δλ_l, width w_p, and I = exp(−Σ η_l φ_l). Blends
and saturation are included; the reference line fixes the zero points.
References: dense linear algebra (torch.linalg.solve of the assembled
system) and scipy.optimize.least_squares on the stacked problem.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from iris_lab.inversion.coupled import (
    AtomicInversion,
    AtomicParameters,
    CoupledLevenbergMarquardt,
    NormalBlocks,
    dense_solve,
    schur_solve,
)
from iris_lab.inversion.lm import FLAG_NAN

DT = torch.float64
WAVE = torch.linspace(-1.5, 1.5, 150, dtype=DT)
CENTRES = torch.tensor([-1.0, -0.55, -0.1, 0.05, 0.6, 1.05], dtype=DT)   # 0.05: a blend
ENERGY = torch.tensor([0.5, 2.0, 3.5, 1.0, 4.0, 2.8], dtype=DT)
LOG_GF = torch.tensor([0.3, 0.0, 0.5, -0.4, 0.2, -0.1], dtype=DT)
ATOMIC = AtomicParameters(6, reference_line=0)
LOCAL_LO = [0.0, -0.2, 0.05]
LOCAL_HI = [1.0, 0.2, 0.3]


def spectrum(local: torch.Tensor, gf: torch.Tensor, dl: torch.Tensor) -> torch.Tensor:
    """local = (θ, v, w) per pixel; gf, dl offsets per pixel and line."""
    theta, v, w = local[:, :1], local[:, 1:2], local[:, 2:3]
    eta = 10.0 ** (LOG_GF + gf - theta * ENERGY)                         # (p, L)
    centre = CENTRES + dl + v                                            # (p, L)
    phi = torch.exp(-(((WAVE[None, :, None] - centre[:, None, :]) / w[:, None]) ** 2))
    return torch.exp(-(eta[:, None, :] * phi).sum(-1))


def make_pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    return torch.tensor(np.column_stack([g.uniform(0.2, 0.6, n), g.uniform(-0.08, 0.08, n),
                                         g.uniform(0.08, 0.15, n)]), dtype=DT)


def true_offsets(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = np.random.default_rng(seed)
    gf = g.normal(0, 0.2, 6)
    dl = g.normal(0, 0.02, 6)
    gf[0] = dl[0] = 0.0
    return torch.tensor(gf, dtype=DT), torch.tensor(dl, dtype=DT)


def observe(local, gf, dl, snr=None, seed=3):
    clean = spectrum(local, gf.expand(local.shape[0], 6), dl.expand(local.shape[0], 6))
    if snr is None:
        return clean
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    return clean + noise / snr


def start_local(n: int) -> torch.Tensor:
    return torch.tensor([0.4, 0.0, 0.11], dtype=DT).expand(n, 3).clone()


def random_blocks(n_pix=7, n=4, k=5, seed=0) -> NormalBlocks:
    g = torch.Generator().manual_seed(seed)
    jl = torch.randn(n_pix, 30, n, generator=g, dtype=DT)
    jg = torch.randn(n_pix, 30, k, generator=g, dtype=DT)
    res = torch.randn(n_pix, 30, generator=g, dtype=DT)
    return NormalBlocks.from_jacobians(jl, jg, res)


@pytest.mark.parametrize("lam", [0.0, 1e-3, 10.0])
def test_schur_matches_dense_solve(lam):
    blocks, _, _ = random_blocks().damped(lam)
    dx, dg = schur_solve(blocks)
    dx_ref, dg_ref = dense_solve(blocks)
    # same linear system, two exact methods: agreement to rounding (1e-8 is
    # generous for condition numbers ~1e2 of these random blocks)
    assert torch.allclose(dx, dx_ref, atol=1e-8, rtol=0)
    assert torch.allclose(dg, dg_ref, atol=1e-8, rtol=0)


def test_schur_matches_dense_on_model_jacobian():
    local = make_pixels(5)
    gf, dl = true_offsets()
    obs = observe(local, gf, dl)
    cl = CoupledLevenbergMarquardt()
    k = ATOMIC.n_parameters

    def fwd(x, g):
        a, b = ATOMIC.split(g)
        return spectrum(x, a, b)

    blocks, _ = cl.linearise(fwd, start_local(5), torch.zeros(k, dtype=DT), obs,
                             torch.ones_like(obs))
    scaled, dls, dgs = blocks.damped(1e-2)
    dx, dg = schur_solve(scaled)
    dx_ref, dg_ref = dense_solve(scaled)
    # Marquardt-scaled blocks have unit diagonal; both solutions identical to 1e-8
    assert torch.allclose(dx, dx_ref, atol=1e-8) and torch.allclose(dg, dg_ref, atol=1e-8)
    # the block Jacobian equals finite differences of the model: forward
    # differences with step h = 1e-6 err by h/2 |∂²r| ~ 1e-6/2 / w² ~ 5e-5 per
    # sample (w ~ 0.1), i.e. ~1e-5 of the largest entry of C
    cl_fd = CoupledLevenbergMarquardt(jacobian="finite")
    blocks_fd, _ = cl_fd.linearise(fwd, start_local(5), torch.zeros(k, dtype=DT), obs,
                                   torch.ones_like(obs))
    assert torch.allclose(blocks.C, blocks_fd.C, rtol=1e-4, atol=1e-5 * blocks.C.abs().max())


def test_mode3_noise_free_recovers_atomic_data():
    local = make_pixels(12)
    gf, dl = true_offsets()
    obs = observe(local, gf, dl)
    inv = AtomicInversion(3, ATOMIC, max_iter=60, coupled_options={"ftol": 1e-12})
    inv.fit(spectrum, obs, start_local(12), local_lower=LOCAL_LO, local_upper=LOCAL_HI,
            global_lower=-1.0, global_upper=1.0)
    # exact data, well-posed problem: LM converges to the truth (to 1e-6 dex and
    # 1e-6 wavelength units; χ² falls by >20 orders of magnitude)
    assert torch.allclose(inv.log_gf_offset_, gf, atol=1e-6)
    assert torch.allclose(inv.dlambda_, dl, atol=1e-6)
    assert torch.allclose(inv.local_, local, atol=1e-6)


def test_modes_with_noise_mode3_beats_mode2():
    local = make_pixels(30, seed=4)
    gf, dl = true_offsets(seed=5)
    snr = 200.0
    obs = observe(local, gf, dl, snr=snr, seed=6)
    start_g = torch.tensor(ATOMIC.join(gf.numpy() + np.random.default_rng(7).normal(0, 0.1, 6),
                                       dl.numpy()), dtype=DT)
    err, spread = {}, {}
    for mode in (2, 3):
        inv = AtomicInversion(mode, ATOMIC, max_iter=80)
        inv.fit(spectrum, obs, start_local(30), global0=start_g, sigma=1 / snr,
                local_lower=LOCAL_LO, local_upper=LOCAL_HI, global_lower=-1.0, global_upper=1.0)
        e = (inv.log_gf_offset_ - gf).abs()[1:]
        err[mode] = float(e.mean())
        if mode == 2:   # standard error of the mean of the per-pixel estimates
            per = torch.as_tensor(inv.dataset_["global_per_pixel"].values)
            spread[2] = ATOMIC.split(per)[0][:, 1:].std(0) / np.sqrt(per.shape[0])
        if mode == 3:
            spread[3] = inv.atomic.split(inv.global_sigma_)[0][1:]
            # the global uncertainties from the Schur complement are honest: every
            # log gf error is within 4σ (a 4σ excursion in 5 lines has p < 3e-4)
            sig = inv.atomic.split(inv.global_sigma_)[0][1:]
            assert bool((e < 4 * sig).all()), (e, sig)
            assert inv.coupled_.chi2_total_reduced_ == pytest.approx(1.0, abs=0.1)
    # coupling all pixels is the joint maximum-likelihood estimate: its σ is
    # below the scatter of the mean of the per-pixel estimates, and its errors
    # are as small. (Here every per-pixel fit converges, so averaging them is
    # nearly as good: 0.0030 against 0.0031 dex. The paper's factor comes from
    # per-pixel degeneracies, measured on the LTE field of view in
    # benchmarks/coupled_loggf.py.)
    assert bool((spread[3] < spread[2]).all()), spread
    assert err[3] < 1.25 * err[2], err


def test_mode1_and_averaged_mode():
    local = make_pixels(6)
    gf, dl = true_offsets()
    obs = observe(local, gf, dl)
    g_true = torch.tensor(ATOMIC.join(gf.numpy(), dl.numpy()), dtype=DT)
    m1 = AtomicInversion(1, ATOMIC, max_iter=60).fit(
        spectrum, obs, start_local(6), global0=g_true, local_lower=LOCAL_LO,
        local_upper=LOCAL_HI)
    assert torch.allclose(m1.local_, local, atol=1e-6)       # exact atomic data -> exact fit
    # averaged method on identical pixels: the mean spectrum is each pixel's
    # spectrum, so the truth is recovered exactly
    same = local[:1].expand(6, 3)
    obs_same = observe(same, gf, dl)
    av = AtomicInversion("averaged", ATOMIC, max_iter=100).fit(
        spectrum, obs_same, start_local(6), local_lower=LOCAL_LO, local_upper=LOCAL_HI,
        global_lower=-1.0, global_upper=1.0)
    assert torch.allclose(av.log_gf_offset_, gf, atol=1e-5)
    assert av.dataset_["local"].shape == (6, 3)


def _three_pixel_problem():
    """Three pixels with noise, the coupled forward model and the same
    residual as one stacked vector function (for scipy)."""
    local = make_pixels(3, seed=8)
    gf, dl = true_offsets(seed=9)
    obs = observe(local, gf, dl, snr=300.0, seed=10)
    k = ATOMIC.n_parameters

    def fwd(x, g):
        a, b = ATOMIC.split(g)
        return spectrum(x, a, b)

    def stacked(z):
        zt = torch.tensor(z, dtype=DT)
        x, g = zt[:9].reshape(3, 3), zt[9:]
        return (fwd(x, g.expand(3, k)) - obs).reshape(-1).numpy()

    return local, obs, k, fwd, stacked


def test_coupled_matches_scipy_on_stacked_problem():
    _, obs, k, fwd, stacked = _three_pixel_problem()
    cl = CoupledLevenbergMarquardt(max_iter=100, ftol=1e-13).fit(
        fwd, obs, start_local(3), torch.zeros(k, dtype=DT))

    z0 = np.concatenate([start_local(3).reshape(-1).numpy(), np.zeros(k)])
    ref = least_squares(stacked, z0, method="lm", xtol=1e-15, ftol=1e-15)
    # same minimum of the same χ² (to 1e-8 relative) and same global parameters
    assert float(cl.chi2_.sum()) == pytest.approx(2 * ref.cost, rel=1e-8)
    assert np.allclose(cl.global_.numpy(), ref.x[9:], atol=1e-6)


def multimodal_problem():
    """A per-pixel frequency (strongly multimodal) and a shared amplitude/offset,
    16 pixels, noise 0.01: ``(forward, true frequencies, true globals, data)``."""
    t = torch.linspace(0, 6, 80, dtype=DT)

    def fwd(x, g):
        return g[:, :1] * torch.sin(x[:, :1] * t) + g[:, 1:2]

    freq = torch.linspace(1.0, 3.0, 16, dtype=DT)[:, None]
    g_true = torch.tensor([0.8, 0.1], dtype=DT)
    noise = torch.randn(16, 80, generator=torch.Generator().manual_seed(0), dtype=DT)
    return fwd, freq, g_true, fwd(freq, g_true.expand(16, 2)) + 0.01 * noise


def test_perturbation_restarts_escape_local_minima():
    # a per-pixel frequency (strongly multimodal) and a shared amplitude/offset:
    # from a common start some pixels converge to side lobes (local minima)
    fwd, freq, g_true, obs = multimodal_problem()
    kw = dict(max_iter=120, perturbation_scale=0.15, chi2_target=1.5, seed=0)
    fits = {}
    for n_pert in (0, 4):
        fits[n_pert] = CoupledLevenbergMarquardt(n_perturbations=n_pert, **kw).fit(
            fwd, obs, torch.full((16, 1), 1.6, dtype=DT), torch.tensor([0.5, 0.0], dtype=DT),
            sigma=0.01, local_lower=0.2, local_upper=4.0)
    plain, pert = fits[0], fits[4]
    found = {n: int(((f.local_ - freq).abs() < 1e-2).sum()) for n, f in fits.items()}
    assert pert.perturbations_ == 4
    assert found[4] > found[0] and found[0] < 16            # local minima exist; some escaped
    assert float(pert.chi2_.sum()) < 0.8 * float(plain.chi2_.sum())
    # the returned state is the best visited: no worse than before any perturbation,
    # and its χ² is that of its own model
    assert float(pert.chi2_.sum()) <= min(pert.perturbation_chi2_)
    resid = ((fwd(pert.local_, pert.global_.expand(16, 2)) - obs) / 0.01) ** 2
    assert float(resid.sum()) == pytest.approx(float(pert.chi2_.sum()), rel=1e-10)


@pytest.mark.parametrize("jacobian", ["jvp", "batched"])
def test_reseeding_frees_stuck_pixels_and_the_global_parameters(jacobian):
    # the multimodal problem above: from a common start 5 of 16 pixels settle in
    # side lobes and drag the shared amplitude to ~0.59 (truth 0.8). Reseeding
    # refits those pixels alone from the best of the other pixels' solutions.
    fwd, freq, g_true, obs = multimodal_problem()
    fits = {}
    for n_reseeds in (0, 3):
        fits[n_reseeds] = CoupledLevenbergMarquardt(max_iter=120, n_reseeds=n_reseeds,
                                                    jacobian=jacobian).fit(
            fwd, obs, torch.full((16, 1), 1.6, dtype=DT), torch.tensor([0.5, 0.0], dtype=DT),
            sigma=0.01, local_lower=0.2, local_upper=4.0)
    plain, reseeded = fits[0], fits[3]
    found = {n: int(((f.local_ - freq).abs() < 1e-2).sum()) for n, f in fits.items()}
    assert found[0] <= 12 and abs(float(plain.global_[0]) - 0.8) > 0.1   # stuck without
    assert found[3] == 16 and sum(reseeded.reseeded_pixels_) >= 4
    # global parameters at the truth within the noise; χ² at the noise level (16 × 80)
    assert np.allclose(reseeded.global_.numpy(), g_true.numpy(), atol=3e-3)
    assert float(reseeded.chi2_.sum()) < 1.2 * 16 * 80
    # reseeding never raises χ²: the result's χ² is that of its own model
    resid = ((fwd(reseeded.local_, reseeded.global_.expand(16, 2)) - obs) / 0.01) ** 2
    assert float(resid.sum()) == pytest.approx(float(reseeded.chi2_.sum()), rel=1e-10)


def test_local_warmup_is_a_per_pixel_fit_at_the_starting_global_parameters():
    # no coupled iteration after the warm-up: the result is exactly the per-pixel
    # LM fit of the local parameters with the global ones held at global0
    from iris_lab.inversion.lm import LevenbergMarquardt

    t = torch.linspace(0, 6, 40, dtype=DT)

    def fwd(x, g):
        return g[:, :1] * torch.sin(x[:, :1] * t) + g[:, 1:2] + x[:, 1:2] * t

    truth = torch.stack([torch.linspace(1.0, 1.5, 6, dtype=DT),
                         torch.linspace(-0.1, 0.1, 6, dtype=DT)], -1)
    g0 = torch.tensor([0.7, 0.05], dtype=DT)
    obs = fwd(truth, torch.tensor([[0.8, 0.1]], dtype=DT).expand(6, 2))
    x0 = torch.tensor([[1.2, 0.0]], dtype=DT).expand(6, 2)
    cl = CoupledLevenbergMarquardt(max_iter=0, local_warmup=15, uncertainties=False).fit(
        fwd, obs, x0, g0, sigma=0.01, local_lower=[0.2, -1.0], local_upper=[4.0, 1.0])
    ref = LevenbergMarquardt(max_iter=15, lam0=cl.lam0, uncertainties=False).fit(
        lambda z: fwd(z, g0.expand(z.shape[0], 2)), obs, x0, sigma=0.01,
        lower=[0.2, -1.0], upper=[4.0, 1.0])
    assert torch.allclose(cl.local_, ref.x_, atol=1e-12)
    assert torch.equal(cl.global_, g0)
    assert not torch.allclose(cl.local_, x0)                 # the warm-up did move them


def test_checkpoint_resume_and_flags(tmp_path):
    local = make_pixels(6, seed=12)
    gf, dl = true_offsets()
    obs = observe(local, gf, dl, snr=400.0)
    obs[2] = torch.nan                      # a pixel without data
    k = ATOMIC.n_parameters

    def fwd(x, g):
        a, b = ATOMIC.split(g)
        return spectrum(x, a, b)

    ck = tmp_path / "state.nc"
    part = CoupledLevenbergMarquardt(max_iter=4).fit(
        fwd, obs, start_local(6), torch.zeros(k, dtype=DT), checkpoint=ck, checkpoint_every=2)
    assert ck.exists() and part.n_iter_ == 4
    ck.unlink()
    CoupledLevenbergMarquardt(max_iter=4).fit(fwd, obs, start_local(6),
                                              torch.zeros(k, dtype=DT), checkpoint=ck,
                                              checkpoint_every=4)
    import xarray as xr
    with xr.open_dataset(ck, engine="h5netcdf") as ds:
        assert ds.attrs.get("finished") == 1
    full = CoupledLevenbergMarquardt(max_iter=40).fit(fwd, obs, start_local(6),
                                                      torch.zeros(k, dtype=DT))
    ck2 = tmp_path / "state2.nc"
    CoupledLevenbergMarquardt(max_iter=40).fit(fwd, obs, start_local(6),
                                               torch.zeros(k, dtype=DT), checkpoint=ck2,
                                               checkpoint_every=3)
    resumed = CoupledLevenbergMarquardt(max_iter=40).fit(fwd, obs, start_local(6),
                                                         torch.zeros(k, dtype=DT),
                                                         checkpoint=ck2)
    assert torch.allclose(resumed.global_, full.global_, atol=1e-8)
    assert full.quality_[2] & FLAG_NAN and not full.quality_[0] & FLAG_NAN
    assert torch.isfinite(full.global_).all()


def test_dataset_roundtrip_and_bad_input(tmp_path):
    local = make_pixels(4)
    gf, dl = true_offsets()
    obs = observe(local, gf, dl)
    inv = AtomicInversion(3, ATOMIC, max_iter=5).fit(spectrum, obs, start_local(4))
    path = inv.save(tmp_path / "res.nc")
    ds = AtomicInversion.load(path)
    assert ds["log_gf_offset"].attrs["units"] == "dex" and ds.sizes["line"] == 6
    assert ds.attrs["mode"] == "3"
    with pytest.raises(ValueError, match="mode"):
        AtomicInversion(4, ATOMIC)
    with pytest.raises(ValueError, match="sigma"):
        CoupledLevenbergMarquardt().fit(lambda x, g: x, torch.zeros(2, 3), torch.zeros(2, 3),
                                        torch.zeros(1), sigma=-1.0)


def test_nan_model_pixel_is_flagged_not_fatal():
    t = torch.linspace(0, 1, 20, dtype=DT)

    def fwd(x, g):  # model undefined (NaN) for x > 5
        m = g[:, :1] * torch.exp(-x[:, :1] * t)
        return torch.where(x[:, :1] > 5.0, torch.nan, m)

    x_true = torch.tensor([[1.0], [2.0], [3.0], [1.5]], dtype=DT)
    obs = fwd(x_true, torch.full((4, 1), 2.0, dtype=DT))
    x0 = torch.tensor([[1.2], [9.0], [2.5], [1.0]], dtype=DT)
    fit = CoupledLevenbergMarquardt(max_iter=60).fit(fwd, obs, x0,
                                                     torch.tensor([1.0], dtype=DT))
    assert fit.quality_[1] & FLAG_NAN and not fit.quality_[0] & FLAG_NAN
    # the other three pixels still determine the shared amplitude exactly
    assert float(fit.global_[0]) == pytest.approx(2.0, abs=1e-6)


def test_held_parameters_get_zero_step_and_reduced_solution():
    gen = torch.Generator().manual_seed(3)
    jl = torch.randn(4, 30, 3, generator=gen, dtype=DT)
    jg = torch.randn(4, 30, 2, generator=gen, dtype=DT)
    res = torch.randn(4, 30, generator=gen, dtype=DT)
    blocks = NormalBlocks.from_jacobians(jl, jg, res)
    held_l = torch.zeros(4, 3, dtype=torch.bool)
    held_l[1, 0] = held_l[3, 2] = True
    held_g = torch.tensor([False, True])
    dx, dg = schur_solve(blocks.held(held_l, held_g))
    assert float(dx[held_l].abs().max()) == 0.0 and float(dg[1]) == 0.0
    # the same as solving the problem without the held columns
    free_l = (~held_l).to(DT)
    ref_dx, ref_dg = schur_solve(NormalBlocks.from_jacobians(
        jl * free_l[:, None, :], jg * (~held_g).to(DT), res).held(held_l, held_g))
    assert torch.allclose(dx, ref_dx) and torch.allclose(dg, ref_dg)
    # and as a dense least-squares solve over the free parameters
    n_pix, n = held_l.shape
    cols = []
    for p in range(n_pix):
        block = torch.zeros(30 * n_pix, n, dtype=DT)
        block[30 * p:30 * (p + 1)] = jl[p]
        cols.append(block)
    big = torch.cat(cols + [jg.reshape(-1, 2)], dim=1)
    keep = torch.cat([(~held_l).reshape(-1), ~held_g])
    sol = torch.linalg.lstsq(big[:, keep], -res.reshape(-1, 1)).solution[:, 0]
    full = torch.zeros(n_pix * n + 2, dtype=DT)
    full[keep] = sol
    assert torch.allclose(torch.cat([dx.reshape(-1), dg]), full, atol=1e-10)


def test_coupled_reaches_bounded_optimum_of_scipy():
    local, obs, k, fwd, stacked = _three_pixel_problem()
    # an upper bound on every pixel's first parameter below its truth: active
    upper = local[:, 0].min().item() * 0.8
    lo, hi = [-np.inf, -np.inf, -np.inf], [upper, np.inf, np.inf]
    x0 = start_local(3).clone()
    x0[:, 0] = torch.clamp(x0[:, 0], max=upper)
    cl = CoupledLevenbergMarquardt(max_iter=100, ftol=1e-13).fit(
        fwd, obs, x0, torch.zeros(k, dtype=DT), local_lower=lo, local_upper=hi)
    z0 = np.concatenate([x0.reshape(-1).numpy(), np.zeros(k)])
    z0 = np.minimum(z0, np.r_[np.tile(hi, 3), np.full(k, np.inf)] - 1e-12)
    ref = least_squares(stacked, z0, bounds=(np.r_[np.tile(lo, 3), np.full(k, -np.inf)],
                                              np.r_[np.tile(hi, 3), np.full(k, np.inf)]),
                        xtol=1e-15, ftol=1e-15, gtol=1e-15)
    assert float(cl.chi2_.sum()) == pytest.approx(2 * ref.cost, rel=1e-6)
    assert np.allclose(cl.local_.reshape(-1).numpy(), ref.x[:9], atol=1e-5)
    assert np.allclose(cl.global_.numpy(), ref.x[9:], atol=1e-5)
    # the bound binds in some pixels, not all (a pinned parameter must be able to leave)
    on_bound = np.isclose(cl.local_[:, 0].numpy(), upper)
    assert on_bound.any() and not on_bound.all()


def test_damped_blocks_floor_bounds_the_step_of_a_vanished_local_column():
    from iris_lab.inversion.coupled import NormalBlocks, schur_solve

    jl = torch.tensor([[[1.0, 0.0], [0.0, 1e-9], [0.0, 0.0]]], dtype=DT)
    jg = torch.tensor([[[0.0], [0.0], [1.0]]], dtype=DT)
    res = torch.tensor([[0.5, 0.5, 0.1]], dtype=DT)
    blocks = NormalBlocks.from_jacobians(jl, jg, res)
    steps = {}
    for floor in (None, (torch.ones(1, 2, dtype=DT), torch.ones(1, dtype=DT))):
        scaled, dl, dg = blocks.damped(1e3, floor)
        dx, _ = schur_solve(scaled)
        steps[floor is None] = (dx / dl)[0, 1].abs().item()
    assert steps[True] > 1e5 and steps[False] < 1e-9
