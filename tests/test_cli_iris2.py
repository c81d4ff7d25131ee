"""``iris-lab iris2``: look-up of level-2 files, bad files reported and skipped."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from iris_lab.cli import main
from iris_lab.io.iris import write_iris_raster
from iris_lab.methods.iris2 import INTENSITY_UNITS, toy_database


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    db = toy_database(200, seed=4)
    db_path = tmp / "db.nc"
    db.to_netcdf(db_path, engine="h5netcdf")
    idx = np.arange(0, 200, 10).reshape(4, 5)
    raster = xr.DataArray(db.profile.values[idx], dims=("y", "x", "wavelength"),
                          coords={"wavelength": db.wavelength.values},
                          attrs={"units": INTENSITY_UNITS})
    good = write_iris_raster(raster, tmp / "good_l2.fits", exptime=8.0)
    truncated = tmp / "truncated_l2.fits"
    truncated.write_bytes(good.read_bytes()[:5000])
    far = raster.assign_coords(wavelength=raster.wavelength + 30.0)  # no Mg II in the window
    wrong = write_iris_raster(far, tmp / "wrong_window_l2.fits", exptime=8.0)
    return tmp, db_path, idx, good, truncated, wrong


def test_cli_inverts_good_file_and_reports_bad_ones(setup, capsys):
    tmp, db_path, idx, good, truncated, wrong = setup
    out = tmp / "res.nc"
    code = main(["iris2", str(good), str(truncated), str(wrong), "--database", str(db_path),
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 1
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 2
    assert "truncated_l2.fits" in errors[0]
    assert "wrong_window_l2.fits" in errors[1] and "Mg II" in errors[1]
    assert "2 of 3 file(s) failed" in captured.err
    res = xr.load_dataset(tmp / "res_good_l2.nc", engine="h5netcdf")
    # intensity -> DN (float32 file) -> DN/s -> intensity: the same entries win
    np.testing.assert_array_equal(res["index"].values, idx)
    assert res.attrs["method"] == "iris2_lookup"
    assert "mu" in res.coords


def test_cli_single_file_and_rp_path(setup, capsys):
    tmp, db_path, idx, good, truncated, wrong = setup
    out = tmp / "single.nc"
    assert main(["iris2", str(good), "--database", str(db_path), "--out", str(out),
                 "--rp", "4"]) == 0
    res = xr.load_dataset(out, engine="h5netcdf")
    assert res.attrs["method"] == "rp_lookup"
    assert res["rp_index"].max() == 3


def test_cli_missing_database_is_one_error(setup, capsys):
    tmp, db_path, idx, good, truncated, wrong = setup
    code = main(["iris2", str(good), "--database", str(tmp / "nope.nc"), "--out",
                 str(tmp / "x.nc")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "does not exist" in err[0]
