"""IRIS² look-up: exact pruned search against brute force, result layout, flags, dask, I/O."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from iris_lab.methods.iris2 import (
    INTENSITY_UNITS,
    IRIS2,
    brute_force_lookup,
    load_database,
    synthetic_raster,
    toy_database,
)
from iris_lab.methods.search import NearestProfileSearch, brute_force_nearest


@pytest.fixture(scope="module")
def db():
    return toy_database(1500, seed=0)


@pytest.fixture(scope="module")
def model(db):
    return IRIS2(weights_windows=[(2795.9, 2796.8, 3.0), (2803.1, 2804.0, 2.0)]).fit(db)


def _raster(values, wl, units=INTENSITY_UNITS):
    ny = 10
    return xr.DataArray(values.reshape(ny, -1, values.shape[-1]), dims=("y", "x", "wavelength"),
                        coords={"wavelength": wl}, attrs={"units": units})


@pytest.fixture(scope="module")
def noisy(db):
    """Held-out toy entries (other seed) with 3% multiplicative noise, 300 pixels."""
    truth = toy_database(300, seed=7)
    rng = np.random.default_rng(3)
    return truth.profile.values * (1.0 + rng.normal(0.0, 0.03, truth.profile.shape))


def test_pruned_search_equals_brute_force(db, noisy):
    w = np.ones(db.sizes["wavelength"])
    w[100:160] = 4.0
    search = NearestProfileSearch(db.profile.values, w, block_size=128)
    idx, dist = search.query(noisy)
    ref_idx, ref_dist = brute_force_nearest(noisy, db.profile.values, w)
    np.testing.assert_array_equal(idx, ref_idx)
    # both are float64 sums of the same squared differences: 1e-12 relative
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12)
    # the bound prunes: far fewer exact evaluations than the 1500 entries per pixel
    assert search.stats_["candidates"] < 20 * len(noisy)


def test_search_float32_input_zero_weights_and_radius_fallback(db, noisy):
    w = np.ones(db.sizes["wavelength"])
    w[200:230] = 0.0   # samples outside the chi2 (outside the projection space)
    w[100:160] = 3.0
    ref_idx, ref_dist = brute_force_nearest(noisy, db.profile.values, w)
    # float32 profiles: the distances are float64 of the float32 values
    ref32 = brute_force_nearest(noisy.astype(np.float32), db.profile.values, w)
    search = NearestProfileSearch(db.profile.values, w, block_size=64)
    idx32, dist32 = search.query(noisy.astype(np.float32))
    np.testing.assert_array_equal(idx32, ref32[0])
    np.testing.assert_allclose(dist32, ref32[1], rtol=1e-12)
    # one tree candidate: every pixel takes the radius-query path
    one = NearestProfileSearch(db.profile.values, w, n_candidates=1, n_components=6)
    idx, dist = one.query(noisy)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dist, ref_dist, rtol=1e-12)
    assert one.stats_["fallback"] == len(noisy)


def test_search_ties_beyond_the_tree_candidates(db):
    prof = db.profile.values[:40].astype(np.float64)
    # entry 7 repeated 9 times (more copies than tree candidates) among the others
    dup = np.concatenate([prof[:20], np.repeat(prof[7:8], 9, axis=0), prof[20:]])
    obs = np.concatenate([prof[7:8], prof[7:8] * 1.001, prof[30:35]])
    w = np.ones(prof.shape[1])
    search = NearestProfileSearch(dup, w, n_candidates=4)
    idx, dist = search.query(obs)
    ref_idx, ref_dist = brute_force_nearest(obs, dup, w)
    np.testing.assert_array_equal(idx, ref_idx)
    assert idx[0] == 7 and idx[1] == 7 and dist[0] == 0.0
    assert search.stats_["fallback"] >= 2


def test_predict_leaves_the_raster_untouched(model, db, noisy):
    raster = _raster(noisy.copy(), db.wavelength.values)
    before = raster.values.copy()
    model.predict(raster)
    np.testing.assert_array_equal(raster.values, before)


def test_search_ties_resolve_to_smallest_index_like_argmin(db):
    prof = db.profile.values[:50]
    dup = np.concatenate([prof, prof[::-1]])
    w = np.ones(prof.shape[1])
    idx, dist = NearestProfileSearch(dup, w).query(prof[:20])
    np.testing.assert_array_equal(idx, np.arange(20))
    np.testing.assert_array_equal(dist, 0.0)
    np.testing.assert_array_equal(idx, brute_force_nearest(prof[:20], dup, w)[0])


def test_search_rejects_bad_input(db):
    with pytest.raises(ValueError, match="weights"):
        NearestProfileSearch(db.profile.values, -np.ones(473))
    with pytest.raises(ValueError, match="profiles must be"):
        NearestProfileSearch(db.profile.values, np.ones(473)).query(np.ones((2, 10)))


def test_predict_recovers_database_entries_exactly(model, db):
    idx = np.random.default_rng(0).permutation(db.sizes["entry"])[:40]
    raster = model.profiles(idx.reshape(4, 10))
    res = model.predict(raster)
    np.testing.assert_array_equal(res["index"].values, idx.reshape(4, 10))
    np.testing.assert_array_equal(res["chi2"].values, 0.0)
    np.testing.assert_array_equal(res["temperature"].values,
                                  db.temperature.values[idx].reshape(4, 10, -1))
    np.testing.assert_array_equal(res["sigma_log_n_e"].values,
                                  db.sigma_log_n_e.values[idx].reshape(4, 10, -1))
    assert res.attrs["method"] == "iris2_lookup"
    assert res["temperature"].attrs["units"] == "K"
    assert res["quality"].attrs["flag_meanings"].split()[:3] == ["masked", "low_signal",
                                                                "high_chi2"]


def test_predict_matches_brute_force_with_masks_and_flags(model, db, noisy, monkeypatch):
    import iris_lab.methods.iris2 as iris2_module

    # a shared mask pattern of 80 pixels takes the pruned path with weights w·m
    monkeypatch.setattr(iris2_module, "_MIN_GROUP", 64)
    obs = noisy.copy()
    obs[:80, 40:60] = np.nan        # one shared partial mask (pruned path, w·m weights)
    for i in range(80, 85):          # unique partial masks (brute-force path)
        obs[i, 10 * i % 400: 10 * i % 400 + 7] = np.nan
    obs[85:90] = np.nan              # fully masked
    obs[90:95, :300] = np.nan        # more than half masked
    obs[95] *= 1e-3                  # dark pixel
    res = model.predict(_raster(obs, db.wavelength.values))
    idx = res["index"].values.ravel()
    chi2 = res["chi2"].values.ravel()
    q = res["quality"].values.ravel()
    ref_idx, ref_chi2 = brute_force_lookup(model, obs)
    usable = np.ones(len(obs), bool)
    usable[85:95] = False
    np.testing.assert_array_equal(idx[usable], ref_idx[usable])
    # float32 storage of chi2: 1e-6 relative
    np.testing.assert_allclose(chi2[usable], ref_chi2[usable], rtol=1e-6)
    assert (idx[~usable] == -1).all() and np.isnan(chi2[~usable]).all()
    assert np.isnan(res["temperature"].values.reshape(len(obs), -1)[~usable]).all()
    assert (q[85:95] & 1).all() and not (q[usable] & 1).any()
    assert (q[:85] & 8).all() and not (q[96:] & 8).any()
    assert q[95] & 2 and not (q[96:] & 2).any()
    assert ((q & 4) > 0).tolist() == (np.nan_to_num(chi2, nan=0) > 0.05).tolist()


def test_predict_on_dask_cluster_is_identical(model, db, noisy):
    pytest.importorskip("dask.distributed")
    raster = _raster(noisy, db.wavelength.values)
    local = model.predict(raster, n_chunks=3)
    distributed = model.predict(raster, client="local", n_chunks=3)
    xr.testing.assert_identical(local, distributed)


def test_predict_interpolates_other_grids(model, db):
    wl = db.wavelength.values
    coarse = wl[::3]
    prof = db.profile.values[:20][:, ::3]
    res = model.predict(_raster(prof, coarse))
    # linear interpolation of a smooth profile: the right entry still wins for most
    assert (res["index"].values.ravel() == np.arange(20)).mean() >= 0.8
    with pytest.raises(ValueError, match="less than half"):
        model.predict(_raster(prof, coarse + 20.0))
    with pytest.raises(ValueError, match="units"):
        model.predict(_raster(prof, coarse, units="counts"))


def test_save_load_round_trip(model, db, tmp_path, noisy):
    path = model.save(tmp_path / "iris2.nc")
    back = IRIS2.load(path)
    assert back.weights_windows == [(2795.9, 2796.8, 3.0), (2803.1, 2804.0, 2.0)]
    np.testing.assert_array_equal(back.weights_, model.weights_)
    raster = _raster(noisy[:50], db.wavelength.values)
    xr.testing.assert_identical(back.predict(raster), model.predict(raster))
    with pytest.raises(ValueError, match="not a saved IRIS2 model"):
        db.to_netcdf(tmp_path / "db.nc", engine="h5netcdf")
        IRIS2.load(tmp_path / "db.nc")


def test_database_schema_errors(db, tmp_path):
    with pytest.raises(ValueError, match="lacks variables"):
        load_database(db.drop_vars("sigma_v_los"))
    with pytest.raises(ValueError, match="does not exist"):
        load_database(tmp_path / "missing.nc")
    bad = tmp_path / "bad.nc"
    bad.write_text("garbage")
    with pytest.raises(ValueError, match="not readable"):
        load_database(bad)
    with pytest.raises(ValueError, match="not fitted"):
        IRIS2().predict(xr.DataArray(np.ones((1, 1, 3)), dims=("y", "x", "wavelength")))


def test_umf_analytic_offsets():
    from iris_lab.methods.umf import umf_summary, umf_table, uncertainty_multiplication_factor

    rng = np.random.default_rng(0)
    shape = (4, 5, 39)
    lt = np.round(np.linspace(-7.0, 0.6, 39), 2)
    sig = {"temperature": rng.uniform(100, 500, shape), "v_los": rng.uniform(1e4, 1e5, shape),
           "v_turb": rng.uniform(1e4, 1e5, shape), "n_e": rng.uniform(0.1, 0.5, shape)}
    truth_vals = {"temperature": rng.uniform(4e3, 9e3, shape), "v_los": rng.normal(0, 1e5, shape),
                  "v_turb": rng.uniform(1e5, 5e5, shape), "n_e": 10 ** rng.uniform(10, 13, shape)}
    dims = ("y", "x", "log_tau")
    truth = xr.Dataset({k: (dims, v) for k, v in truth_vals.items()}, coords={"log_tau": lt})
    factor = np.where(np.arange(20).reshape(4, 5) < 10, 2.0, 0.5)[..., None]
    est = {
        "temperature": truth_vals["temperature"] + factor * sig["temperature"],
        "v_los": truth_vals["v_los"] - factor * sig["v_los"],
        "v_turb": truth_vals["v_turb"] + factor * sig["v_turb"],
        "n_e": truth_vals["n_e"] * 10 ** (factor * sig["n_e"]),
    }
    names = {"temperature": "sigma_temperature", "v_los": "sigma_v_los",
             "v_turb": "sigma_v_turb", "n_e": "sigma_log_n_e"}
    result = xr.Dataset({**{k: (dims, v) for k, v in est.items()},
                         **{names[k]: (dims, v) for k, v in sig.items()},
                         "quality": (("y", "x"), np.zeros((4, 5), np.uint8))},
                        coords={"log_tau": lt})
    result["quality"][3, 4] = 1
    umf = uncertainty_multiplication_factor(result, truth)
    expect = np.broadcast_to(factor, shape).copy()
    expect[3, 4] = np.nan
    for q in ("temperature", "v_los", "v_turb", "n_e"):
        # float32 output: 1e-5 relative
        np.testing.assert_allclose(umf[f"umf_{q}"].values, expect, rtol=1e-5)
    top = np.zeros((4, 5), bool)
    top[:2] = True
    summary = umf_summary(umf, {"top": top, "bottom": ~top})
    np.testing.assert_allclose(summary["umf_temperature"].sel(region="top"), 2.0, rtol=1e-5)
    np.testing.assert_allclose(summary["umf_n_e"].sel(region="bottom"), 0.5, rtol=1e-5)
    table = umf_table(summary)
    assert set(table["region"]) == {"full_fov", "top", "bottom"}
    with pytest.raises(ValueError, match="needs variables"):
        uncertainty_multiplication_factor(result.drop_vars("sigma_v_los"), truth)


def test_real_level2_raster_through_the_lookup(model):
    """The real (decimated) irispy-lmsal raster: DN/s -> intensity, interpolated, flagged."""
    import glob
    import os

    irispy = pytest.importorskip("irispy")
    from iris_lab.io.iris import read_iris_raster

    path = sorted(glob.glob(os.path.join(os.path.dirname(irispy.__file__), "data", "test",
                                         "raster", "*_raster", "*r00000.fits")))[0]
    raster = read_iris_raster(path)
    res = model.predict(raster)
    assert res["index"].shape == raster.shape[:2]
    q = res["quality"].values
    # pixels whose samples are all missing are flagged masked and get no model
    all_missing = raster["mask"].values.all(-1)
    assert all_missing.any() and (q[all_missing] & 1).all()
    assert (res["index"].values[all_missing] == -1).all()
    usable = res["index"].values >= 0
    assert usable.any() and np.isfinite(res["temperature"].values[usable]).all()
    assert "mu" in res.coords


def test_shipped_database_schema_works_with_the_lookup():
    from iris_lab.methods.iris2 import SHIPPED_DATABASE

    if not SHIPPED_DATABASE.exists():
        pytest.skip("shipped Mg II database not built yet")
    shipped = IRIS2().fit()
    n = shipped.database_.sizes["entry"]
    idx = np.arange(min(n, 12)).reshape(1, -1)
    res = shipped.predict(shipped.profiles(idx))
    np.testing.assert_array_equal(res["index"].values, idx)


def test_explorer_select_and_slider_update_panels(model, db):
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    from iris_lab.methods.rp import RepresentativeProfiles
    from iris_lab.methods.umf import uncertainty_multiplication_factor
    from iris_lab.widgets.iris2 import IRIS2Explorer

    raster, truth, _ = synthetic_raster(toy_database(200, seed=9), (8, 10), seed=0)
    res = model.predict(raster)
    rp = RepresentativeProfiles(n_profiles=5).fit(raster)
    ex = IRIS2Explorer(raster, res, model, rp=rp,
                       umf=uncertainty_multiplication_factor(res, truth))
    before, png = ex.readout.value, ex.detail.value
    ex.select(5, 7)
    assert ex.readout.value.startswith("pixel y=5 x=7") and ex.readout.value != before
    assert f"entry {int(res['index'].values[5, 7])}" in ex.readout.value
    assert ex.detail.value != png
    ex.slider.value = 5
    assert ex.readout.value.endswith(f"log τ {res.log_tau.values[5]:.1f}")
