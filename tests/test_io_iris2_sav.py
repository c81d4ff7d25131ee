"""IRIS² IDL SAVE files: the test writer against scipy's reader, then the readers.

The files are genuine IDL SAVE files (written by ``tests/idl_save.py``) in the
layout of ``iris2.pro``: a structure ``iris2model`` with ``MODEL`` and
``UNCERTAINTY`` IDL [X, Y, ltau, 4] (numpy (4, ltau, Y, X)), ``CHI2`` [X, Y],
``LTAU``, ``PHYSICAL_VARIABLE``, ``MU`` …; failed pixels have T = 0.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.io import readsav

sys.path.insert(0, str(Path(__file__).resolve().parent))

from idl_save import write_sav  # noqa: E402

from iris_lab.io.iris2_sav import IRIS2SaveError, read_iris2_database, read_iris2_model  # noqa: E402
from iris_lab.methods.iris2 import INTENSITY_UNITS, IRIS2, toy_database  # noqa: E402

LTAU = (np.arange(39) * 0.2 - 7.6).astype(np.float32)   # IRIS² v2.0 grid, float32 as saved
NY, NX = 6, 4
UNIQUE = (4, 1)        # (y, x) of the pixel with a unique temperature
FAILED = [(0, 3), (5, 0)]


# ---------------------------------------------------------------- the writer
def test_writer_round_trip_arrays_scalars_strings(tmp_path):
    values = {
        "f4": np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5.5,
        "f8": np.linspace(-1.0, 1.0, 7),
        "i2": np.array([-3, 0, 32767], dtype=np.int16),
        "i4": np.array([[1, -2], [3, 2_000_000_000]], dtype=np.int32),
        "i8": np.array([2**40, -7], dtype=np.int64),
        "u1": np.arange(5, dtype=np.uint8) * 50,
        "words": np.array(["T [k]", "", "n_e [cm^-3]"]),
    }
    scalars = {"x": 3.25, "n": -7, "h": np.int16(-2), "b": np.uint8(200), "s": "k2v", "e": ""}
    for compress in (False, True):
        path = write_sav(tmp_path / f"a{compress}.sav", {**values, **scalars}, compress=compress)
        back = readsav(str(path), python_dict=True)
        for name in ("f4", "f8", "i2", "i4", "i8", "u1"):
            assert back[name].shape == values[name].shape, name
            assert back[name].dtype.newbyteorder("=") == values[name].dtype, name
            np.testing.assert_array_equal(back[name], values[name])
        assert [w.decode() if w else "" for w in back["words"]] == ["T [k]", "", "n_e [cm^-3]"]
        assert back["x"] == 3.25 and back["n"] == -7 and back["h"] == -2 and back["b"] == 200
        assert back["s"] == b"k2v" and back["e"] == ""


def test_writer_round_trip_structures(tmp_path):
    model = np.random.default_rng(0).normal(size=(4, 39, 3, 2)).astype(np.float32)
    struct = {"ltau": LTAU, "model": model, "label": "iris2", "mu": 0.87, "flag": np.int16(1),
              "names": np.array(["T [k]", "v_los [cm/s]"]),
              "header": {"naxis": np.int32(3), "cdelt1": 0.02546, "obsid": "3820258168"}}
    rows = [{"x": 1.0, "y": np.arange(3, dtype=np.int32)},
            {"x": 2.0, "y": np.array([7, 8, 9], dtype=np.int32)}]
    path = write_sav(tmp_path / "s.sav", {"iris2model": struct, "rows": rows}, compress=True)
    back = readsav(str(path), python_dict=True)
    rec = back["iris2model"][0]
    assert rec.dtype.names[:3] == ("LTAU", "MODEL", "LABEL")
    np.testing.assert_array_equal(rec["MODEL"], model)
    np.testing.assert_array_equal(rec["LTAU"], LTAU)
    assert rec["LABEL"] == b"iris2" and rec["MU"] == 0.87 and rec["FLAG"] == 1
    assert list(rec["NAMES"]) == [b"T [k]", b"v_los [cm/s]"]
    head = rec["HEADER"][0]
    assert head["NAXIS"] == 3 and head["CDELT1"] == 0.02546 and head["OBSID"] == b"3820258168"
    assert back["rows"].shape == (2,)
    np.testing.assert_array_equal(back["rows"]["x"], [1.0, 2.0])
    np.testing.assert_array_equal(back["rows"][1]["y"], [7, 8, 9])


def test_writer_matches_idl_bytes_of_a_scalar_variable(tmp_path):
    # the VARIABLE record IDL 8.5 wrote for ``iris2model = -1`` (a raster IRIS² did not invert)
    idl = bytes.fromhex("0000000a" + "49524953324d4f44454c0000"   # name length 10, IRIS2MODEL
                        + "00000002" + "00000000"                  # INT, scalar
                        + "00000007" + "ffffffff")                 # VARSTART, -1 in a 4-byte word
    raw = write_sav(tmp_path / "m.sav", {"iris2model": np.int16(-1)}, timestamp=False).read_bytes()
    assert raw[:4] == b"SR\x00\x04"
    assert raw[4:8] == bytes.fromhex("00000002")                  # a VARIABLE record first
    assert raw[20:20 + len(idl)] == idl


# ------------------------------------------------------- IRIS² result files
def _truth() -> dict[str, np.ndarray]:
    """Models (4, ltau, Y, X) with values that encode (y, x, depth) and a failed pixel."""
    k = np.arange(39)[:, None, None]
    y = np.arange(NY)[None, :, None]
    x = np.arange(NX)[None, None, :]
    temp = 4000.0 + 100.0 * y + 10.0 * x + k + 0 * (y + x + k)
    vlos = (1e4 * (y - x) + 100.0 * k).astype(float)
    vturb = 2e5 + 1e3 * k + 0 * (y + x)
    n_e = 1e11 * 10 ** (0.1 * k) * (1 + y + x)
    model = np.stack([temp, vlos, vturb, n_e]).astype(np.float32)
    model[0, :, UNIQUE[0], UNIQUE[1]] = 9999.0
    sigma = np.stack([0.05 * temp, 3e4 + 0 * vlos, 1e4 + 0 * vturb, 0.5 * n_e]).astype(np.float32)
    chi2 = (1.0 + 10.0 * np.arange(NY)[:, None] + np.arange(NX)[None]).astype(np.float32)
    for yy, xx in FAILED:                    # what IRIS² writes for a pixel it did not invert
        model[:, :, yy, xx] = 0.0
        sigma[:, :, yy, xx] = np.nan
        chi2[yy, xx] = 0.0
    sigma[0, 3, 2, 2] = np.inf               # IRIS² files hold some infinite sigmas
    return {"model": model, "uncertainty": sigma, "chi2": chi2}


def _iris2model(truth: dict[str, np.ndarray], **extra) -> dict:
    out = {
        "input_filename": "iris_l2_20140521_114758_3820258168_raster_t000_r00000.fits",
        "output_filename": "iris2model_20140521_114758_3820258168_raster_t000_r00000.sav",
        "inv_db_fits": "inv_mu_iris2.v2.0.fits", "model_db_fits": "mod_iris2.v2.0.fits",
        "rf_db_fits": np.array(["rf_temp_n07_iris2.v2.0.fits", "rf_vlos_n04_iris2.v2.0.fits"]),
        "ltau": LTAU, "model": truth["model"],
        "model_dimension_info": np.array(["[X [px], Y [px], log(\\tau), physical_variable]"]),
        "physical_variable": np.array(["T [k]", "v_los [cm/s]", "v_turb [cm/s]", "n_e [cm^-3]"]),
        "uncertainty": truth["uncertainty"],
        "uncertainty_variable": np.array(["unc_T [k]", "unc_v_los [cm/s]", "unc_v_turb [cm/s]",
                                          "unc_n_e [cm^-3]"]),
        "chi2": truth["chi2"], "weighting_windows_01": np.ones(433),
        "weights_in_windows": np.ones(433), "pca_components": np.int16(-1),
        "header": {"naxis": np.int32(3), "obsid": "3820258168", "cdelt3": 0.333},
        "mu": 0.8754425411371568, "delta_mu_db": np.float32(1.0), "level_info": np.int16(0),
        "qc_flag": np.int16(1),
    }
    out.update(extra)
    return out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    truth = _truth()
    path = tmp_path_factory.mktemp("iris2") / "iris2model_raster_t000_r00000.sav"
    write_sav(path, {"iris2model": _iris2model(truth)}, compress=True)
    return path, truth


def test_model_file_values_layout_and_transposition(model_file):
    path, truth = model_file
    res = read_iris2_model(path)
    assert res["temperature"].dims == ("y", "x", "log_tau")
    assert res["temperature"].shape == (NY, NX, 39)
    np.testing.assert_allclose(res["log_tau"].values, np.arange(39) * 0.2 - 7.6, atol=1e-6)
    # a pixel with a unique value lands at its (y, x)
    t = res["temperature"].values
    hits = np.argwhere((t == 9999.0).all(-1))
    assert hits.tolist() == [list(UNIQUE)]
    # known pixels and depths: T = 4000 + 100 y + 10 x + k
    for yy, xx, k in [(1, 2, 0), (3, 0, 20), (5, 3, 38), (2, 1, 7)]:
        assert t[yy, xx, k] == pytest.approx(4000 + 100 * yy + 10 * xx + k)
        assert res["v_los"].values[yy, xx, k] == pytest.approx(1e4 * (yy - xx) + 100 * k)
        assert res["n_e"].values[yy, xx, k] == pytest.approx(
            1e11 * 10 ** (0.1 * k) * (1 + yy + xx), rel=1e-6)
        assert res["sigma_temperature"].values[yy, xx, k] == pytest.approx(0.05 * t[yy, xx, k])
        # σ(n_e) = 0.5 n_e → log10(1.5) dex
        assert res["sigma_log_n_e"].values[yy, xx, k] == pytest.approx(np.log10(1.5), rel=1e-5)
        assert res["chi2"].values[yy, xx] == pytest.approx(1 + 10 * yy + xx)
    assert res["sigma_log_n_e"].attrs["units"] == "dex"
    assert res["v_turb"].attrs["units"] == "cm / s"
    assert np.isnan(res["sigma_temperature"].values[2, 2, 3])        # the infinite σ
    assert res.attrs["sigma_nonfinite_values"] == 1
    assert res.attrs["mu"] == pytest.approx(0.8754425411371568)
    assert res.attrs["qc_flag"] == 1.0
    assert res.attrs["input_filename"].startswith("iris_l2_20140521")
    assert (res["index"].values == -1).all()


def test_model_file_failed_pixels_are_nan_and_flagged(model_file):
    path, _ = model_file
    res = read_iris2_model(path)
    q = res["quality"].values
    assert res["quality"].attrs["flag_meanings"].split()[0] == "masked"
    assert sorted(map(tuple, np.argwhere(q & 1).tolist())) == sorted(FAILED)
    for yy, xx in FAILED:
        for var in ("temperature", "v_los", "v_turb", "n_e", "sigma_temperature",
                    "sigma_log_n_e"):
            assert np.isnan(res[var].values[yy, xx]).all(), var
        assert np.isnan(res["chi2"].values[yy, xx])
    ok = (q & 1) == 0
    assert np.isfinite(res["temperature"].values[ok]).all()
    assert (res["temperature"].values[ok] > 0).all()
    assert res.attrs["failed_pixels"] == len(FAILED)


def test_model_file_chi2_threshold_v_los_sign_and_umf(model_file):
    from iris_lab.methods.umf import uncertainty_multiplication_factor

    path, _ = model_file
    res = read_iris2_model(path, chi2_threshold=40.0, v_los_sign=-1)
    high = (res["quality"].values & 4) > 0
    np.testing.assert_array_equal(high, np.nan_to_num(res["chi2"].values) > 40.0)
    assert high.sum() == 7                 # y = 4 (4 px) and y = 5 (3 px; one failed)
    assert res["v_los"].values[3, 0, 5] == pytest.approx(-(3e4 + 500))
    # the result works with the UMF: a truth one σ away in T gives UMF 1
    truth = res[["temperature", "v_los", "v_turb", "n_e"]].copy(deep=True)
    truth["temperature"] = res["temperature"] + res["sigma_temperature"]
    umf = uncertainty_multiplication_factor(res, truth)
    ok = (res["quality"].values & 1) == 0
    vals = umf["umf_temperature"].values[ok]
    np.testing.assert_allclose(vals[np.isfinite(vals)], 1.0, rtol=1e-5)
    assert np.isnan(umf["umf_temperature"].values[~ok]).all()


def test_model_file_variable_order_from_physical_variable(tmp_path):
    truth = _truth()
    perm = [3, 0, 2, 1]                      # n_e, T, v_turb, v_los
    names = np.array(["n_e [cm^-3]", "T [k]", "v_turb [cm/s]", "v_los [cm/s]"])
    fields = _iris2model({"model": truth["model"][perm], "uncertainty": truth["uncertainty"][perm],
                          "chi2": truth["chi2"]}, physical_variable=names)
    path = write_sav(tmp_path / "perm.sav", {"iris2model": fields})
    res = read_iris2_model(path)
    assert res["temperature"].values[1, 2, 0] == pytest.approx(4000 + 100 + 20)
    assert res["n_e"].values[1, 2, 0] == pytest.approx(1e11 * 4, rel=1e-6)
    assert res["v_los"].values[1, 2, 0] == pytest.approx(1e4 * (1 - 2))


def test_model_file_array_of_results_needs_record(tmp_path):
    t1, t2 = _truth(), _truth()
    t2["model"][0] += 1000.0
    path = write_sav(tmp_path / "multi.sav",
                     {"iris2model": [_iris2model(t1), _iris2model(t2)]})
    with pytest.raises(IRIS2SaveError, match="2 structures.*record="):
        read_iris2_model(path)
    second = read_iris2_model(path, record=1)
    assert second["temperature"].values[1, 2, 0] == pytest.approx(4000 + 120 + 1000)
    with pytest.raises(IRIS2SaveError, match="out of range"):
        read_iris2_model(path, record=5)


def test_model_file_not_inverted_raster(tmp_path):
    path = write_sav(tmp_path / "iris2model_r00659.sav", {"iris2model": np.int16(-1)})
    with pytest.raises(IRIS2SaveError, match=r"iris2model_r00659\.sav.*did not invert"):
        read_iris2_model(path)


# ------------------------------------------------------------------ errors
def test_truncated_file_names_the_path(model_file, tmp_path):
    path, _ = model_file
    raw = path.read_bytes()
    for cut in (3, 40, len(raw) // 3, len(raw) // 2, len(raw) - 30, len(raw) - 8):
        bad = tmp_path / f"cut_{cut}.sav"
        bad.write_bytes(raw[:cut])
        with pytest.raises(IRIS2SaveError) as err:
            read_iris2_model(bad)
        assert str(bad) in str(err.value)
        assert "truncated" in str(err.value) or "not an IDL SAVE" in str(err.value)
    # uncompressed too: cut inside the MODEL array
    plain = write_sav(tmp_path / "plain.sav", {"iris2model": _iris2model(_truth())})
    raw = plain.read_bytes()
    bad = tmp_path / "plain_cut.sav"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IRIS2SaveError, match=r"plain_cut\.sav: truncated or corrupt"):
        read_iris2_model(bad)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(IRIS2SaveError, match=r"nope\.sav: no such file"):
        read_iris2_model(tmp_path / "nope.sav")
    text = tmp_path / "notes.sav"
    text.write_text("not a save file")
    with pytest.raises(IRIS2SaveError, match=r"notes\.sav: not an IDL SAVE file"):
        read_iris2_database(text)


def test_missing_field_lists_the_fields_present(tmp_path):
    fields = _iris2model(_truth())
    del fields["uncertainty"]
    path = write_sav(tmp_path / "nounc.sav", {"iris2model": fields})
    with pytest.raises(IRIS2SaveError) as err:
        read_iris2_model(path)
    msg = str(err.value)
    assert "nounc.sav" in msg and "missing field(s) uncertainty" in msg
    for present in ("ltau f4[39]", f"model f4[4, 39, {NY}, {NX}]", "chi2", "mu", "qc_flag"):
        assert present in msg, present


def test_wrong_shapes_are_reported(tmp_path):
    truth = _truth()
    bad_chi2 = write_sav(tmp_path / "chi2.sav", {"iris2model": _iris2model(
        truth, chi2=truth["chi2"].T.copy())})
    with pytest.raises(IRIS2SaveError, match=r"chi2 has numpy shape \(4, 6\); expected \(6, 4\)"):
        read_iris2_model(bad_chi2)
    bad_tau = write_sav(tmp_path / "tau.sav", {"iris2model": _iris2model(truth, ltau=LTAU[:30])})
    with pytest.raises(IRIS2SaveError, match=r"model has numpy shape \(4, 39, 6, 4\)"):
        read_iris2_model(bad_tau)
    bad_unc = write_sav(tmp_path / "unc.sav", {"iris2model": _iris2model(
        truth, uncertainty=truth["uncertainty"][:, :, :3])})
    with pytest.raises(IRIS2SaveError, match="uncertainty has numpy shape"):
        read_iris2_model(bad_unc)


# ---------------------------------------------------------------- databases
def _database_fields(db, *, failed_entry: int | None = None, mu=None) -> dict:
    """A database in the SolarSoft layout: inv_mu [474, n], mod/unc [4, 39, n], wl, ltau."""
    n = db.sizes["entry"]
    mu_col = np.full((n, 1), 0.87) if mu is None else np.asarray(mu, float)[:, None]
    inv_mu = np.concatenate([db["profile"].values.astype(np.float64), mu_col], axis=1)
    mod = np.stack([db[v].values for v in ("temperature", "v_los", "v_turb", "n_e")], -1)
    n_e = db["n_e"].values.astype(np.float64)
    unc = np.stack([db["sigma_temperature"].values, db["sigma_v_los"].values,
                    db["sigma_v_turb"].values,
                    n_e * (10.0 ** db["sigma_log_n_e"].values.astype(np.float64) - 1.0)], -1)
    mod, unc = mod.astype(np.float32), unc.astype(np.float32)
    if failed_entry is not None:
        mod[failed_entry] = 0.0
    return {"inv_mu": inv_mu.astype(np.float32), "mod": mod, "unc": unc,
            "wl": db["wavelength"].values, "ltau": db["log_tau"].values.astype(np.float32)}


@pytest.fixture(scope="module")
def toy():
    return toy_database(40, seed=3)


def test_database_file_is_usable_by_iris2(toy, tmp_path):
    path = write_sav(tmp_path / "iris2_db.sav",
                     {"iris2_db": _database_fields(toy, failed_entry=0)})
    with pytest.warns(UserWarning, match="dropped 1 database entries"):
        db = read_iris2_database(path)
    assert db.sizes["entry"] == 39 and db["entry"].values[0] == 1
    assert db["profile"].dims == ("entry", "wavelength")
    assert db["temperature"].dims == ("entry", "log_tau")
    assert db.attrs["mu"] == pytest.approx(0.87)
    np.testing.assert_allclose(db["sigma_log_n_e"].values, toy["sigma_log_n_e"].values[1:],
                               rtol=2e-5, atol=1e-6)
    model = IRIS2().fit(db)
    wanted = np.array([[10, 17, 33], [5, 39, 1]])          # entries of the file
    raster = model.profiles(wanted - 1)                      # entry 0 was dropped
    raster.attrs["units"] = INTENSITY_UNITS
    res = model.predict(raster)
    np.testing.assert_array_equal(db["entry"].values[res["index"].values], wanted)
    np.testing.assert_allclose(res["temperature"].values,
                               toy["temperature"].values[wanted], rtol=1e-6)
    np.testing.assert_allclose(res["n_e"].values, toy["n_e"].values[wanted], rtol=1e-6)
    assert (res["quality"].values & 1 == 0).all()
    # the thin constructor gives the same look-up
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        again = IRIS2.from_sav(path, chi2_threshold=0.2).predict(raster)
    np.testing.assert_array_equal(again["index"].values, res["index"].values)


def test_database_numpy_order_mu_selection_and_air(toy, tmp_path):
    fields = _database_fields(toy, mu=np.where(np.arange(40) % 2 == 0, 1.0, 0.5))
    py = {"profiles": fields["inv_mu"][:, :-1].T.copy(),          # saved from Python: (n_λ, n)
          "model": np.ascontiguousarray(np.transpose(fields["mod"], (2, 1, 0))),
          "uncertainty": np.ascontiguousarray(np.transpose(fields["unc"], (2, 1, 0))),
          "wavelength": fields["wl"] - 0.8, "ltau": fields["ltau"],
          "mu": np.where(np.arange(40) % 2 == 0, 1.0, 0.5)}
    path = write_sav(tmp_path / "py_db.sav", py)
    db = read_iris2_database(path, mu=0.5, delta_mu=0.05, medium="air")
    assert db["entry"].values.tolist() == list(range(1, 40, 2))
    np.testing.assert_allclose(db["temperature"].values, toy["temperature"].values[1::2])
    np.testing.assert_allclose(db["profile"].values, toy["profile"].values[1::2], rtol=1e-6)
    from iris_lab.atomic import air_to_vacuum

    np.testing.assert_allclose(db["wavelength"].values, air_to_vacuum(fields["wl"] - 0.8))
    assert db.attrs["mu"] == 0.5
    with pytest.raises(IRIS2SaveError, match=r"no entry with \|mu - 0.2\|"):
        read_iris2_database(path, mu=0.2)


def test_database_missing_field_and_shape(toy, tmp_path):
    fields = _database_fields(toy)
    del fields["wl"]
    path = write_sav(tmp_path / "nowl.sav", fields)
    with pytest.raises(IRIS2SaveError) as err:
        read_iris2_database(path)
    msg = str(err.value)
    assert "nowl.sav" in msg and "missing field(s) wavelength" in msg
    assert "inv_mu f4[40, 474]" in msg and "mod f4[40, 39, 4]" in msg
    fields = _database_fields(toy)
    fields["mod"] = fields["mod"][:, :20]
    path = write_sav(tmp_path / "badmod.sav", fields)
    with pytest.raises(IRIS2SaveError, match=r"badmod\.sav: model has numpy shape \(40, 20, 4\)"):
        read_iris2_database(path)
