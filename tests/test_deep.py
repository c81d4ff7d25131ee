"""Tests of deepIRIS² (iris_lab.methods.deep).

The networks are trained on small databases in the Mg II database schema whose
profiles are a smooth, deterministic function of the stratification, so that a
correctly wired network must learn the inverse map; accuracy thresholds are
stated against a constant (database-mean) predictor.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from iris_lab.methods.deep import FLAG_MEANINGS, DeepIRIS2

WAVELENGTH = 2794.0 + 0.02546 * np.arange(473)
LOG_TAU = np.round(np.linspace(-7.0, 0.6, 39), 2)
UNITS = "erg / (s cm2 sr Angstrom)"


def toy_database(n: int, seed: int) -> xr.Dataset:
    """A database in the Mg II schema with profiles smooth in four latent parameters."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1.0, 1.0, size=(n, 4))
    s = (LOG_TAU + 7.0) / 7.6  # 0 at the top, 1 at the bottom
    top = (1.0 - s) ** 2
    temperature = 4500.0 + top * (4000.0 + 2000.0 * z[:, :1]) + 400.0 * z[:, 1:2] * s
    v_los = 3e5 * z[:, 2:3] * (1.0 - s)
    v_turb = 2e5 + 1e5 * (z[:, 3:4] + 1.0) / 2.0 * (1.0 - s)
    n_e = 10.0 ** (10.0 + 3.0 * s + 0.3 * z[:, :1])
    mid = np.argmin(np.abs(LOG_TAU + 3.0))
    continuum = 1e5 * (temperature[:, -1:] / 4900.0) ** 4
    profile = np.array(continuum * np.ones((1, WAVELENGTH.size)))
    for centre in (2796.35, 2803.53):
        dl = WAVELENGTH[None] - centre
        width = 0.15 * (1.0 + v_turb[:, mid:mid + 1] / 4e5)
        shift = v_los[:, mid:mid + 1] / 3e10 * centre
        emission = (temperature[:, mid:mid + 1] / 6000.0) ** 3
        profile *= 1.0 - 0.9 * np.exp(-(dl / 0.6) ** 2)
        profile += continuum * emission * np.exp(-(((dl - shift) / width) ** 2))
    sigma_t = 50.0 + 0.02 * temperature
    sigma_v = 1e4 * (2.0 - s) + 0.05 * np.abs(v_los)
    sigma_vt = 5e3 * (2.0 - s) * (1.0 + 0.3 * z[:, 3:4])
    sigma_ne = 0.05 + 0.1 * (1.0 - s) * (1.0 + 0.2 * z[:, :1])
    dims2 = ("entry", "log_tau")
    f32 = np.float32
    return xr.Dataset(
        {
            "profile": (("entry", "wavelength"), profile.astype(f32), {"units": UNITS}),
            "temperature": (dims2, temperature.astype(f32), {"units": "K"}),
            "v_los": (dims2, v_los.astype(f32), {"units": "cm / s"}),
            "v_turb": (dims2, v_turb.astype(f32), {"units": "cm / s"}),
            "n_e": (dims2, n_e.astype(f32), {"units": "1 / cm3"}),
            "sigma_temperature": (dims2, sigma_t.astype(f32), {"units": "K"}),
            "sigma_v_los": (dims2, sigma_v.astype(f32), {"units": "cm / s"}),
            "sigma_v_turb": (dims2, sigma_vt.astype(f32), {"units": "cm / s"}),
            "sigma_log_n_e": (dims2, sigma_ne.astype(f32), {"units": "dex"}),
            "converged": ("entry", np.ones(n, dtype=bool)),
        },
        coords={"wavelength": ("wavelength", WAVELENGTH, {"units": "Angstrom",
                                                          "medium": "vacuum"}),
                "log_tau": LOG_TAU},
        attrs={"mu": 1.0, "build_command": "toy_database (tests)"},
    )


def as_raster(db: xr.Dataset, ny: int) -> xr.DataArray:
    prof = db["profile"].values
    nx = prof.shape[0] // ny
    return xr.DataArray(prof[: ny * nx].reshape(ny, nx, -1), dims=("y", "x", "wavelength"),
                        coords={"wavelength": WAVELENGTH}, attrs={"units": UNITS})


def small_model(**kw) -> DeepIRIS2:
    params = dict(hidden_sizes=(48, 48), emulator_hidden=(48,), dropout=0.0, lr=3e-3,
                  max_epochs=50, patience=10, batch_size=64, seed=3, progress=False,
                  n_components=32, noise_exptime=None)
    params.update(kw)
    return DeepIRIS2(**params)


@pytest.fixture(scope="module")
def trained() -> DeepIRIS2:
    return small_model().fit(toy_database(1000, seed=1))


@pytest.fixture(scope="module")
def heldout() -> xr.Dataset:
    return toy_database(200, seed=99)


def test_learns_the_inverse_map(trained, heldout):
    result = trained.predict(as_raster(heldout, ny=10))
    truth = heldout.isel(entry=slice(0, 200))
    flat = result.stack(pix=("y", "x")).transpose("pix", "log_tau")
    window = (LOG_TAU > -5) & (LOG_TAU < -1)
    for name in ("temperature", "v_los", "v_turb", "n_e"):
        pred = flat[name].values[:, window]
        true = truth[name].values[:, window]
        if name == "n_e":
            pred, true = np.log10(pred), np.log10(true)
        rms = np.sqrt(np.mean((pred - true) ** 2))
        spread = np.sqrt(np.mean((true - true.mean(0)) ** 2))
        # The toy map is smooth and noise-free: a trained network must beat the
        # database-mean predictor (rms = spread) by a wide margin (measured 0.02-0.08).
        # 0.15 leaves room
        # for the short CPU training; a broken pipeline (wrong normalisation, axes
        # swapped, no training) gives >= 1.
        assert rms < 0.15 * spread, (name, rms, spread)
    # σ networks: the toy σ_T is 50 K + 2% of T; relative error well below the
    # spread of σ_T itself (≈ 20%) shows they learnt it in log space.
    rel = flat["sigma_temperature"].values[:, window] / truth["sigma_temperature"].values[
        :, window] - 1.0
    assert np.sqrt(np.mean(rel**2)) < 0.08
    assert (result["quality"].values & 1).sum() == 0
    assert np.isfinite(result["chi2"]).all()


def test_result_layout(trained, heldout):
    result = trained.predict(as_raster(heldout, ny=4).isel(x=slice(0, 5)))
    assert dict(result.sizes) == {"y": 4, "x": 5, "log_tau": 39}
    assert result.attrs["method"] == "deepiris2"
    np.testing.assert_array_equal(result["log_tau"].values, LOG_TAU)
    expected = {"temperature": "K", "v_los": "cm / s", "v_turb": "cm / s", "n_e": "1 / cm3",
                "sigma_temperature": "K", "sigma_v_los": "cm / s", "sigma_v_turb": "cm / s",
                "sigma_log_n_e": "dex"}
    for name, unit in expected.items():
        assert result[name].dims == ("y", "x", "log_tau")
        assert result[name].attrs["units"] == unit
    for name in ("chi2", "index", "quality"):
        assert result[name].dims == ("y", "x")
    assert (result["index"] == -1).all()
    assert result["quality"].dtype == np.uint8
    assert result["quality"].attrs["flag_meanings"].split() == list(FLAG_MEANINGS)


def test_bad_pixels_are_flagged_not_silent(trained, heldout):
    raster = as_raster(heldout, ny=2).isel(x=slice(0, 6)).copy()
    raster[0, 0] = np.nan  # fully masked
    raster[0, 1, 100:140] = np.nan  # a gap
    raster[0, 2] = raster[0, 2] * 1e-4  # no signal
    rng = np.random.default_rng(0)
    raster[0, 3] = rng.uniform(0.1, 10.0, 473) * float(raster[1, 0].mean())  # not Mg II
    result = trained.predict(raster)
    q = result["quality"].values
    assert q[0, 0] & 1 and np.isnan(result["temperature"].values[0, 0]).all()
    assert q[0, 1] & 8 and not q[0, 1] & 1
    assert np.isfinite(result["temperature"].values[0, 1]).all()
    assert q[0, 2] & 2
    assert q[0, 3] & (4 | 16)  # high χ² or out of range
    assert (q[1] == 0).all()
    # a masked-sample coordinate (True = missing) is honoured like NaN
    mask = np.zeros(raster.shape, dtype=bool)
    mask[1, 0, :300] = True
    q = trained.predict(raster.assign_coords(mask=(raster.dims, mask)))["quality"].values
    assert q[1, 0] == 1 and q[1, 1] == 0
    with pytest.raises(ValueError, match="units"):
        trained.predict(raster.assign_attrs(units="W/m2"))
    with pytest.raises(ValueError, match="Mg II"):
        trained.predict(raster.assign_coords(wavelength=WAVELENGTH + 20.0))
    with pytest.raises(ValueError, match="dims"):
        trained.predict(raster.isel(y=0))


def test_other_wavelength_grid_is_interpolated(trained, heldout):
    raster = as_raster(heldout, ny=2).isel(x=slice(0, 5))
    fine = np.linspace(WAVELENGTH[0] - 0.1, WAVELENGTH[-1] + 0.1, 900)
    profiles = raster.values.astype(np.float64)
    on_fine = np.stack([[np.interp(fine, WAVELENGTH, p) for p in row] for row in profiles])
    fine_raster = xr.DataArray(on_fine, dims=raster.dims, coords={"wavelength": fine},
                               attrs=raster.attrs)
    a = trained.predict(raster)["temperature"].values
    b = trained.predict(fine_raster)["temperature"].values
    # Linear interpolation twice on a grid twice as fine smooths the 0.15 Å wide
    # emission peaks by < 1%; the predicted temperatures move by far less than
    # the network's own error (> 50 K).
    assert np.max(np.abs(a - b)) < 30.0


def test_deterministic_and_resumable(tmp_path):
    db = toy_database(300, seed=5)
    kw = dict(max_epochs=4, patience=50, dropout=0.1, noise_exptime=8.0)  # all RNG paths
    raster = as_raster(db.isel(entry=slice(0, 20)), ny=2)
    straight = small_model(**kw).fit(db)
    again = small_model(**kw).fit(db)
    np.testing.assert_array_equal(straight.predict(raster)["temperature"].values,
                                  again.predict(raster)["temperature"].values)
    # "killed" after 2 epochs, then resumed to 4 from the checkpoint
    small_model(**{**kw, "max_epochs": 2}, checkpoint_dir=tmp_path).fit(db)
    resumed = small_model(**kw, checkpoint_dir=tmp_path).fit(db)
    assert len(resumed.history_["validation"]) == 4
    np.testing.assert_array_equal(straight.predict(raster)["sigma_v_los"].values,
                                  resumed.predict(raster)["sigma_v_los"].values)
    # a checkpoint of other parameters is refused, not silently mixed in
    with pytest.raises(ValueError, match="checkpoint"):
        small_model(**kw, lr=1e-2, checkpoint_dir=tmp_path).fit(db)
    different = small_model(**{**kw, "seed": 4}).fit(db)
    assert not np.array_equal(different.predict(raster)["temperature"].values,
                              straight.predict(raster)["temperature"].values)


def test_save_load_roundtrip_and_bad_files(trained, heldout, tmp_path):
    path = trained.save(tmp_path / "w.safetensors")
    loaded = DeepIRIS2.load(path)
    raster = as_raster(heldout, ny=5)
    a, b = trained.predict(raster), loaded.predict(raster)
    for name in ("temperature", "v_los", "sigma_log_n_e", "chi2", "quality"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    assert loaded.best_epoch_ == trained.best_epoch_

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        DeepIRIS2.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        DeepIRIS2.load(garbage)
    with pytest.raises(ValueError, match="does not exist"):
        DeepIRIS2.load(tmp_path / "missing.safetensors")

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    wrong_shape = dict(tensors)
    wrong_shape["v_los.layer1.weight"] = torch.zeros(3, 3)
    save_file(wrong_shape, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="does not match"):
        DeepIRIS2.load(tmp_path / "shape.safetensors")
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a deepIRIS"):
        DeepIRIS2.load(tmp_path / "other.safetensors")


def test_entries_without_sigma_train_the_value_networks_only():
    db = toy_database(60, seed=0)
    sig = db["sigma_v_los"].values.copy()
    sig[5:] = np.nan  # σ from response functions for 5 entries only
    model = small_model(max_epochs=3).fit(db.assign(sigma_v_los=(db["sigma_v_los"].dims, sig)))
    assert model.n_entries_ == 60 and model.n_sigma_entries_.tolist() == [60, 5, 60, 60]
    assert np.isfinite(model.predict(as_raster(db, ny=2))["sigma_v_los"].values).all()
    sig[1:] = np.nan
    with pytest.raises(ValueError, match="σ is known"):
        small_model().fit(db.assign(sigma_v_los=(db["sigma_v_los"].dims, sig)))


def test_bad_database_and_unfitted():
    with pytest.raises(ValueError, match="lacks variables"):
        small_model().fit(toy_database(50, seed=0).drop_vars("sigma_v_los"))
    with pytest.raises(ValueError, match="does not exist"):
        small_model().fit("/nonexistent/mgii_database.nc")
    with pytest.raises(ValueError, match="not fitted"):
        small_model().predict(as_raster(toy_database(4, seed=0), ny=2))
    with pytest.raises(ValueError, match="dropout"):
        small_model(dropout=1.5).fit(toy_database(50, seed=0))


def test_shipped_weights_load_and_predict():
    # the shipped file must stay readable and consistent with its metadata
    model = DeepIRIS2.load()
    assert model.wavelength_.size == 473 and model.log_tau_.size == 39
    assert model.training_provenance_.get("command", "").startswith("python scripts/")
    result = model.predict(as_raster(toy_database(6, seed=0), ny=2))
    assert (result["quality"].values & 1).sum() == 0
    assert np.isfinite(result["temperature"].values).all()
    assert (result["temperature"].values > 1000.0).all()
