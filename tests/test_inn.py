"""FlareINN mechanics on a small flare set built here (smooth deterministic x → y map).

The toy set follows the flare-set schema: temperature / n_e / v_los on 50
heights, Hα (29) and Ca 8542 (25) profiles whose shift, width and emission
depend smoothly on the atmosphere, a held-out 20 % by whole sequence.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from iris_lab.methods.inn import (
    FLAG_BITS,
    FlareINN,
    atmosphere_to_x,
    normalise_profiles,
    x_to_atmosphere,
)

DL_HA = np.round(np.linspace(-1.4, 1.4, 29), 3)
DL_CA = np.round(np.linspace(-1.2, 1.2, 25), 3)


def toy_flare_set(n: int = 400, seed: int = 0, n_sequences: int = 20,
                  n_height: int = 50) -> xr.Dataset:
    """A deterministic smooth map from 4 latent causes to atmospheres and profiles."""
    rng = np.random.default_rng(seed)
    h = np.linspace(10.5e8, -0.065e8, n_height)
    hm = np.clip(h / 1e8, 0.0, None)
    a = rng.uniform(0.0, 1.0, (n, 4))
    h_tr = 1.5 + 2.0 * a[:, :1]
    temp = (5000.0 + 4000.0 * a[:, 1:2] * hm / 3.0
            + 1e6 / (1.0 + np.exp(-(hm - h_tr) / 0.3)))
    n_e = np.maximum(10.0 ** (17.0 - 1.5 * hm + 0.6 * a[:, 2:3]), 1e9)
    v = 30e5 * (a[:, 3:4] - 0.4) * np.exp(-((hm - h_tr + 0.5) / 0.6) ** 2)
    shift = 2.0 * 6563.0 * v[:, n_height // 2:n_height // 2 + 1] / 3e10
    width = 0.3 + 0.3 * a[:, 1:2]
    ha = (1.0 - 0.7 * np.exp(-((DL_HA - shift) / 0.5) ** 2)
          + (0.5 + 2.0 * a[:, 2:3]) * np.exp(-((DL_HA - shift) / width) ** 2))
    ca = (1.0 - 0.5 * np.exp(-((DL_CA - 0.6 * shift) / 0.3) ** 2)
          + (1.0 - a[:, :1]) * np.exp(-((DL_CA - shift) / (0.5 * width)) ** 2))
    seq = np.repeat(np.arange(n_sequences), -(-n // n_sequences))[:n]
    held = np.isin(seq, rng.choice(n_sequences, n_sequences // 5, replace=False))
    return xr.Dataset(
        {"temperature": (("sample", "height"), temp), "n_e": (("sample", "height"), n_e),
         "v_los": (("sample", "height"), v),
         "halpha": (("sample", "dl_halpha"), 3e6 * ha),
         "ca8542": (("sample", "dl_ca8542"), 1e6 * ca),
         "held_out": ("sample", held), "sequence": ("sample", seq),
         "converged": ("sample", np.ones(n, bool))},
        coords={"height": h, "dl_halpha": DL_HA, "dl_ca8542": DL_CA})


# a small network on a 10-height version of the set keeps the test within seconds
SMALL = dict(width=96, hidden=64, n_latent=40, n_blocks=4, batch_size=64,
             batches_per_epoch=8, alpha_every=5, patience=1000, lr=1e-2, fade_in=0.3,
             progress=False)
N_HEIGHT = 10


@pytest.fixture(scope="module")
def toy() -> xr.Dataset:
    return toy_flare_set(n_height=N_HEIGHT)


@pytest.fixture(scope="module")
def trained(toy) -> FlareINN:
    return FlareINN(max_epochs=12, **SMALL).fit(toy)


def test_representation_round_trip():
    rng = np.random.default_rng(1)
    n_e = 10.0 ** rng.uniform(9, 15, (3, 50))
    temp = 10.0 ** rng.uniform(3.5, 7, (3, 50))
    v = rng.normal(0, 2e6, (3, 50))
    x = atmosphere_to_x(n_e, temp, v)
    assert x.shape == (3, 150)
    back = x_to_atmosphere(x, 50)
    # float32 storage of the logs: 1e-7 relative in log → ~1e-6 relative in value
    np.testing.assert_allclose(back["n_e"], n_e, rtol=1e-5)
    np.testing.assert_allclose(back["temperature"], temp, rtol=1e-5)
    np.testing.assert_allclose(back["v_los"], v, rtol=1e-4, atol=1.0)
    with pytest.raises(ValueError, match="positive"):
        atmosphere_to_x(-n_e, temp, v)
    y = normalise_profiles(np.array([[1.0, 4.0]]), np.array([[2.0, 1.0]]))
    np.testing.assert_array_equal(y, [[0.25, 1.0, 1.0, 0.5]])


def test_paper_architecture_is_invertible():
    assert FlareINN().width == 384 and FlareINN().n_blocks == 5 and FlareINN().hidden is None
    # the paper's layout (width 384, 5 blocks, 4-layer subnets); a narrow hidden
    # width keeps the build cheap, the default hidden width equals ``width``
    inn = FlareINN(hidden=32)
    inn.n_parameters()
    blocks = [m for m in inn.net_.module_list if type(m).__name__ == "GLOWCouplingBlock"]
    perms = [m for m in inn.net_.module_list if type(m).__name__ == "PermuteRandom"]
    assert len(blocks) == 5 and len(perms) == 4
    linears = [m for m in blocks[0].subnet1 if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (192, 32), (32, 32), (32, 32), (32, 384)]
    acts = [m for m in blocks[0].subnet1 if isinstance(m, torch.nn.LeakyReLU)]
    assert len(acts) == 3
    # FLOPs: 5 blocks × 2 subnets × 2·(192·h + 2·h·h + h·384)
    assert inn.flops_per_draw() == 5 * 2 * 2 * (192 * 32 + 2 * 32 * 32 + 32 * 384)
    # invertibility of the same architecture at a smaller width, in float64 so
    # that the check is about the algebra, not float32 rounding
    small = FlareINN(width=160, hidden=64, n_latent=100)
    small.n_parameters()
    net = small.net_.double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make the couplings far from the identity
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(64, 160, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y, _ = net(x, jac=False)
        back, _ = net(y, rev=True, jac=False)
    assert (y - x).abs().max() > 0.5
    # float64 through 5 affine couplings with |s| ≤ 2: rounding ~1e-15 relative
    torch.testing.assert_close(back, x, atol=1e-10, rtol=1e-10)


def test_build_leaves_global_rngs_alone():
    np.random.seed(123)  # noqa: NPY002 - the legacy global state is what FrEIA touches
    torch.manual_seed(7)
    state_np = np.random.get_state()[1].copy()  # noqa: NPY002
    state_torch = torch.get_rng_state().clone()
    FlareINN(width=160, hidden=8, n_latent=100, n_blocks=3).n_parameters()
    assert np.array_equal(np.random.get_state()[1], state_np)  # noqa: NPY002
    assert torch.equal(torch.get_rng_state(), state_torch)


def test_training_learns_the_forward_map(trained, toy):
    held = toy.isel(sample=np.flatnonzero(toy["held_out"].values))
    y = normalise_profiles(held["halpha"].values, held["ca8542"].values)
    pred = trained.predict_profiles(held["n_e"].values, held["temperature"].values,
                                    held["v_los"].values)
    mse = float(((pred - y) ** 2).mean())
    # predicting the mean profile would give the variance; a network that has
    # learnt the smooth map must do far better on unseen sequences
    assert mse < 0.2 * float(((y - y.mean(0)) ** 2).mean())
    h = trained.history_
    assert h["val_fit"][-1] < 0.2 * h["val_fit"][0]
    assert len(h["epoch"]) == 12 and trained.best_epoch_ >= 3  # best after fade-in


def test_posterior_draws_are_bounded_and_spread(trained, toy):
    held = toy.isel(sample=np.flatnonzero(toy["held_out"].values))
    draws = trained.sample((held["halpha"].values, held["ca8542"].values), 64, seed=3)
    assert draws["temperature"].shape == (held.sizes["sample"], 64, N_HEIGHT)
    logt = np.log10(draws["temperature"])
    train_t = np.log10(toy["temperature"].values[~toy["held_out"].values])
    lo, hi = train_t.min(0), train_t.max(0)
    # a backward pass that had not learnt the prior's support would scatter
    # draws far outside it; allow half the training range as slack
    inside = (logt >= lo - 0.5 * (hi - lo) - 0.05) & (logt <= hi + 0.5 * (hi - lo) + 0.05)
    assert inside.mean() > 0.95
    # and the draws of one pixel differ (the latent is used, not collapsed)
    assert np.median(logt.std(axis=1)) > 1e-3


def test_sample_is_seeded_and_batched(trained, toy):
    prof = (toy["halpha"].values[:6].reshape(2, 3, 29), toy["ca8542"].values[:6].reshape(2, 3, 25))
    a = trained.sample(prof, 5, seed=11)
    b = trained.sample(prof, 5, seed=11)
    c = trained.sample(prof, 5, seed=12)
    assert a["n_e"].shape == (2, 3, 5, N_HEIGHT)
    np.testing.assert_array_equal(a["v_los"], b["v_los"])
    assert not np.array_equal(a["v_los"], c["v_los"])
    # pixels are independent: the same pixel alone gives the same draws
    # when chunked differently (max_rows) only if the latent stream matches,
    # so compare distributions instead: all draws finite and positive
    assert np.isfinite(a["temperature"]).all() and (a["n_e"] > 0).all()
    with pytest.raises(ValueError, match="54 samples"):
        trained.sample(np.ones((2, 40)), 3)
    with pytest.raises(ValueError, match="non-finite"):
        trained.sample((np.zeros(29), np.ones(25)), 3)


def test_save_load_round_trip_and_bad_files(trained, toy, tmp_path):
    path = trained.save(tmp_path / "inn.safetensors", provenance={"data": "toy"})
    back = FlareINN.load(path)
    prof = (toy["halpha"].values[:4], toy["ca8542"].values[:4])
    a, b = trained.sample(prof, 8, seed=5), back.sample(prof, 8, seed=5)
    np.testing.assert_array_equal(a["temperature"], b["temperature"])
    assert back.provenance_ == {"data": "toy"} and back.get_params() == trained.get_params()
    np.testing.assert_array_equal(back.heights_, toy["height"].values)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt"):
        FlareINN.load(corrupt)
    from safetensors.torch import save_file
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "something"})
    with pytest.raises(ValueError, match="not a FlareINN"):
        FlareINN.load(other)
    # right format, wrong shapes: a tensor of another configuration
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith("net.") and k.endswith("weight"))
    tensors[key] = torch.zeros(3, 3)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    mismatched = tmp_path / "mismatch.safetensors"
    save_file(tensors, str(mismatched), metadata=meta)
    with pytest.raises(ValueError, match="do not match"):
        FlareINN.load(mismatched)
    with pytest.raises(FileNotFoundError):
        FlareINN.load(tmp_path / "missing.safetensors")


def test_resume_from_checkpoint_matches_uninterrupted(toy, tmp_path):
    cfg = dict(SMALL, max_epochs=6, batches_per_epoch=2, alpha_every=2, hidden=16, fade_in=0.3)
    full = FlareINN(**cfg).fit(toy)
    ckpt = tmp_path / "ckpt.pt"
    FlareINN(checkpoint=ckpt, **cfg).fit(toy, epochs=3)
    assert ckpt.exists()
    resumed = FlareINN(checkpoint=ckpt, **cfg).fit(toy)
    assert resumed.history_["epoch"] == full.history_["epoch"]
    for (k, a), b in zip(full.net_.state_dict().items(), resumed.net_.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        FlareINN(checkpoint=ckpt, **cfg).fit(toy)


def test_posterior_summary_map_flags_and_crisp_grid(trained, toy):
    # a 3×4 map observed at CRISP-like positions: Hα every 200 mÅ (15), Ca every 100 mÅ
    n = 12
    ha = toy["halpha"].values[:n][:, ::2].reshape(3, 4, 15).copy()
    ca = toy["ca8542"].values[:n].reshape(3, 4, 25).copy()
    ha[0, 1, 3] = np.nan
    ca[2, 3, 10] = 5e7  # saturated
    cube = xr.Dataset({"halpha": (("y", "x", "wl_ha"), ha), "ca8542": (("y", "x", "wl_ca"), ca)},
                      coords={"wl_ha": DL_HA[::2], "wl_ca": DL_CA, "y": np.arange(3),
                              "x": np.arange(4)})
    res = trained.posterior_summary(cube, n_draws=40, saturation=4e7, seed=2)
    assert res["temperature"].dims == ("y", "x", "height")
    assert res["temperature"].attrs["units"] == "K"
    q = res["quality"].values
    assert q[0, 1] & FLAG_BITS["non_finite"] and q[2, 3] & FLAG_BITS["saturated"]
    assert np.isnan(res["temperature"].values[0, 1]).all()
    good = (q & (FLAG_BITS["non_finite"] | FLAG_BITS["saturated"])) == 0
    assert good.sum() == 10
    t16, t50, t84 = (res[v].values[good] for v in ("temperature_p16", "temperature",
                                                   "temperature_p84"))
    assert np.all(t16 <= t50) and np.all(t50 <= t84)
    rms = res["round_trip_rms"].values[good]
    assert np.isfinite(rms).all() and (rms > 0).all()
    # the residual flag follows its threshold
    for threshold, flagged in ((0.0, True), (10.0, False)):
        r = trained.posterior_summary(cube, n_draws=8, saturation=4e7, seed=2,
                                      residual_threshold=threshold)
        assert (r["quality"].values[good] & FLAG_BITS["high_residual"] > 0).all() == flagged
    # Hα interpolated from 200 mÅ steps to the 100 mÅ grid is linear interpolation
    grid_ha, _ = trained.profiles_to_grid(cube)
    np.testing.assert_allclose(grid_ha[1, 1, ::2], ha[1, 1])
    np.testing.assert_allclose(grid_ha[1, 1, 1], 0.5 * (ha[1, 1, 0] + ha[1, 1, 1]))
    narrow = cube.isel(wl_ca=slice(3, 22))
    with pytest.raises(ValueError, match="do not cover"):
        trained.posterior_summary(narrow, n_draws=4)


def test_latent_scale_widens_posteriors_and_is_saved(trained, toy, tmp_path):
    """Coverage of the 68 % interval grows with the latent scale; calibration
    picks the scale nearest 0.68, keeps the table, and survives save/load."""
    import copy

    held = toy.isel(sample=np.flatnonzero(toy["held_out"].values))
    inn = copy.deepcopy(trained)
    narrow = inn.coverage(held, n_draws=64)
    inn.latent_scale_ = 3.0
    wide = inn.coverage(held, n_draws=64)
    assert wide > narrow
    table = inn.calibrate_latent_scale(held, scales=(1.0, 2.0, 3.0), n_draws=64)
    assert set(table) == {1.0, 2.0, 3.0}
    peak = max(table, key=lambda k: (table[k], -k))
    best = min(abs(c - 0.68) for k, c in table.items() if k <= peak)
    assert inn.latent_scale_ <= peak
    assert abs(table[inn.latent_scale_] - 0.68) <= best + 0.01
    back = FlareINN.load(inn.save(tmp_path / "calibrated.safetensors"))
    assert back.latent_scale_ == inn.latent_scale_
    assert back.latent_calibration_["coverage"] == {str(k): v for k, v in table.items()}
    with pytest.raises(ValueError, match="positive"):
        inn.calibrate_latent_scale(held, scales=(0.0,))


def test_latent_scale_ignores_the_falling_branch_of_the_coverage(trained, toy, monkeypatch):
    """Coverage rising to a peak and falling past it (draws leaving the training
    distribution): the falling branch's value nearest 0.68 is not chosen."""
    import copy

    inn = copy.deepcopy(trained)
    curve = {1.0: 0.78, 1.5: 0.83, 2.0: 0.80, 3.0: 0.70}
    monkeypatch.setattr(inn, "coverage", lambda data, **kw: curve[inn.latent_scale_])
    table = inn.calibrate_latent_scale(toy, scales=tuple(curve))
    assert table == curve
    assert inn.latent_scale_ == 1.0  # 3.0 is nearer 0.68, but past the peak at 1.5
    curve = {1.0: 0.55, 1.5: 0.66, 2.0: 0.75, 3.0: 0.72}  # rising branch reaches 0.68
    assert inn.calibrate_latent_scale(toy, scales=tuple(curve)) == curve
    assert inn.latent_scale_ == 1.5
