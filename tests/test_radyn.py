"""RADYN reader: a small RADYN-format CDF written here, read back through radynpy."""

from __future__ import annotations

import numpy as np
import pytest

from iris_lab.io.radyn import interpolate_columns, read_radyn

MM = 1e8  # cm

# the scalar (time-constant) variables every RADYN CDF carries; radynpy reads them all
_SCALARS = {"nel": 3, "nk1": 21, "nrad": 41, "nline": 22, "nrfix": 0, "nmu": 5,
            "qnorm": 10.0, "hn3c2": 0.2211235453324285, "hny4p": 1.5807886390924963e-23,
            "grav": 27542.28703338169, "ee": 1.602189e-12, "em": 9.109534e-28,
            "hh": 6.626176e-27, "cc": 29979245800.0, "bk": 1.380662e-16,
            "amu": 1.6605655e-24, "hce": 12398.522210429655, "hc2": 397295518.0361216,
            "hck": 143878631.4232309, "pi": 3.14159265359}


def _log_t(z):
    return 3.7 + 0.3 * z / MM


def _log_ne(z):
    return 13.0 - 0.5 * z / MM


def _vz(z, t):
    return (2e5 + 1e5 * t) * (1.0 - z / (5 * MM))


def _write_radyn(path, n_time=4, n_dep=60):
    """A RADYN-layout CDF whose columns follow analytic laws on adaptive grids."""
    from cdflib.cdfwrite import CDF

    rng = np.random.default_rng(3)
    time = np.arange(n_time, dtype=np.float64) * 2.0
    # adaptive Lagrangian grid: different, strictly decreasing heights per snapshot
    base = np.sort(rng.uniform(-0.05, 9.0, (n_time, n_dep - 2)), axis=1)[:, ::-1] * MM
    z1 = np.concatenate([np.full((n_time, 1), 9.5 * MM), base,
                         np.full((n_time, 1), -0.1 * MM)], axis=1)
    tg1 = 10.0 ** _log_t(z1)
    ne1 = 10.0 ** _log_ne(z1)
    vz1 = _vz(z1, time[:, None])
    tmp = path.with_name("writing.cdf")  # the writer insists on a .cdf suffix
    cdf = CDF(str(tmp), cdf_spec={"Majority": "row_major"}, delete=True)
    scalars = dict(_SCALARS, ndep=n_dep, ndepm=n_dep - 1)
    for name, value in scalars.items():
        is_int = isinstance(value, int)
        cdf.write_var({"Variable": name, "Data_Type": 4 if is_int else 45, "Num_Elements": 1,
                       "Rec_Vary": False, "Dim_Sizes": []},
                      var_data=np.array(value, dtype=np.int32 if is_int else np.float64))
    cdf.write_var({"Variable": "time", "Data_Type": 45, "Num_Elements": 1, "Rec_Vary": True,
                   "Dim_Sizes": []}, var_data=time)
    for name, arr in (("z1", z1), ("tg1", tg1), ("ne1", ne1), ("vz1", vz1)):
        cdf.write_var({"Variable": name, "Data_Type": 45, "Num_Elements": 1, "Rec_Vary": True,
                       "Dim_Sizes": [n_dep]}, var_data=arr)
    cdf.close()
    tmp.replace(path)
    return time


def test_read_radyn_matches_analytic_columns(tmp_path):
    path = tmp_path / "radyn_out.val3c_d3_1.0e11_t20s_10kev_fp"
    time = _write_radyn(path)
    heights = np.array([12.0, 9.0, 5.0, 2.5, 1.0, 0.3, 0.0, -0.2]) * MM
    ds = read_radyn(path, heights=heights)
    assert ds["temperature"].dims == ("time", "height")
    np.testing.assert_allclose(ds["time"].values, time)
    inside = (heights <= 9.5 * MM) & (heights >= -0.1 * MM)
    assert (ds["covered"].values == inside[None, :]).all()
    # log T, log n_e and v are linear in z, so log-linear / linear interpolation
    # is exact up to float64 rounding (1e-9 relative allows for 10** round trips)
    h = heights[inside]
    shape = (time.size, h.size)
    np.testing.assert_allclose(ds["temperature"].values[:, inside],
                               np.broadcast_to(10.0 ** _log_t(h), shape), rtol=1e-9)
    np.testing.assert_allclose(ds["n_e"].values[:, inside],
                               np.broadcast_to(10.0 ** _log_ne(h), shape), rtol=1e-9)
    # RADYN velocities are positive upwards; iris_lab's are positive downwards
    np.testing.assert_allclose(ds["v_los"].values[:, inside],
                               -_vz(h[None, :], time[:, None]), rtol=1e-9, atol=1e-6)
    # outside the column: the end values, flagged
    np.testing.assert_allclose(ds["temperature"].values[:, 0],
                               np.full(4, 10.0 ** _log_t(9.5 * MM)), rtol=1e-9)
    assert ds.attrs["totalBeamEnergy"] == pytest.approx(1.0e11)
    assert ds.attrs["beamSpectralIndex"] == pytest.approx(3.0)
    assert ds["v_los"].attrs["units"] == "cm / s"


def test_default_grid_is_the_flare_grid(tmp_path):
    from iris_lab.worlds.flare import flare_height_grid

    path = tmp_path / "radyn_out.cdf"
    _write_radyn(path, n_time=2, n_dep=30)
    ds = read_radyn(path)
    np.testing.assert_array_equal(ds["height"].values, flare_height_grid())
    assert ds.sizes["time"] == 2 and np.isfinite(ds["temperature"].values).all()


def test_interpolate_columns_either_direction():
    z = np.array([[0.0, 1.0, 3.0], [3.0, 1.0, 0.0]])
    v = np.array([[0.0, 10.0, 30.0], [30.0, 10.0, 0.0]])
    out, ok = interpolate_columns(z, v, np.array([-1.0, 0.5, 2.0, 3.0]))
    np.testing.assert_allclose(out, [[0.0, 5.0, 20.0, 30.0]] * 2)
    assert ok.tolist() == [[False, True, True, True]] * 2
    with pytest.raises(ValueError, match="monotonic"):
        interpolate_columns(np.array([[0.0, 2.0, 1.0]]), v[:1], np.array([0.5]))


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_radyn(tmp_path / "missing.cdf")
    junk = tmp_path / "radyn_out.cdf"
    junk.write_bytes(b"not a cdf file at all")
    with pytest.raises(ValueError, match="RADYN"):
        read_radyn(junk)
