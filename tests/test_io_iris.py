"""IRIS level-2 reader on the real files shipped with irispy-lmsal, and the writer round trip."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from iris_lab.io.iris import (
    MGII_H_VACUUM,
    MGII_K_VACUUM,
    IRISFileError,
    read_iris_raster,
    write_iris_raster,
)

irispy = pytest.importorskip("irispy")
_TEST = Path(os.path.dirname(irispy.__file__)) / "data" / "test"
RASTER_FILES = sorted(glob.glob(str(_TEST / "raster" / "*_raster" / "*.fits")))
SNS_FILE = next(iter(sorted(glob.glob(str(_TEST / "sns" / "*raster*.fits")))), None)


@pytest.fixture(scope="module")
def raster():
    return read_iris_raster(RASTER_FILES[0])


def test_real_raster_layout_units_and_decimated_axis(raster):
    assert raster.dims == ("y", "x", "wavelength")
    assert raster.shape == (109, 8, 63)
    assert raster.attrs["units"] == "DN/s"
    wl = raster["wavelength"].values
    # decimated 10x (see shared data README): step = 10 * CDELT1 = 0.2546 Å
    assert raster.attrs["spectral_decimation"] == 10
    np.testing.assert_allclose(np.diff(wl), 10 * 0.0254599992186, rtol=1e-9)
    assert wl[0] < MGII_K_VACUUM < MGII_H_VACUUM < wl[-1]


def test_real_raster_matches_fits_values_mask_and_exposure(raster):
    from astropy.io import fits

    with fits.open(RASTER_FILES[0]) as hdul:
        dn = hdul[9].data.astype(np.float64)  # window 9 = "Mg II k 2796", (x, y, λ)
        exptime = hdul[-2].data[:, hdul[-2].header["EXPTIMEN"]]
    dn = np.transpose(dn, (1, 0, 2))
    missing = dn <= -200.0 + 0.1
    assert missing.sum() > 0
    np.testing.assert_array_equal(raster["mask"].values, missing)
    assert np.isnan(raster.values[missing]).all()
    good = ~missing
    np.testing.assert_allclose(raster.values[good], (dn / exptime[None, :, None])[good],
                               rtol=1e-6)


def test_real_raster_pointing_and_mu_against_sunpy(raster):
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astropy.io import fits
    from sunpy.coordinates import frames

    hdr = fits.getheader(RASTER_FILES[0])
    # raster centre within one slit step (2") and one pixel (0.17") of XCEN/YCEN
    assert abs(float(raster.solar_x.mean()) - hdr["XCEN"]) < 2.0
    assert abs(float(raster.solar_y.mean()) - hdr["YCEN"]) < 0.5
    # mu from an independent route: sunpy's transformation to heliographic
    # coordinates of the same (Tx, Ty); agreement to 1e-4 (spherical Sun, same D)
    tx = raster.solar_x.values[::50, ::3].ravel().astype(float)
    ty = raster.solar_y.values[::50, ::3].ravel().astype(float)
    obs = frames.HeliographicStonyhurst(0 * u.deg, 0 * u.deg, hdr["DSUN_OBS"] * u.m)
    c = SkyCoord(tx * u.arcsec, ty * u.arcsec, frame=frames.Helioprojective(
        observer=obs, obstime=hdr["STARTOBS"]))
    hgs = c.transform_to(frames.HeliographicStonyhurst(obstime=hdr["STARTOBS"]))
    # mu = cos of the angle between the surface normal and the direction to the observer
    pos = hgs.cartesian.xyz.to_value(u.m).T
    normal = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    to_obs = np.array([hdr["DSUN_OBS"], 0.0, 0.0]) - pos
    mu = np.sum(normal * to_obs, axis=1) / np.linalg.norm(to_obs, axis=1)
    np.testing.assert_allclose(raster.mu.values[::50, ::3].ravel(), mu, atol=1e-4)


@pytest.mark.skipif(SNS_FILE is None, reason="irispy wheel without sit-and-stare file")
def test_sit_and_stare_cdelt3_zero():
    sns = read_iris_raster(SNS_FILE)
    assert sns.dims == ("y", "time", "wavelength")
    assert sns.attrs["sit_and_stare"] == 1
    assert np.isfinite(sns.solar_x).all() and np.isfinite(sns.solar_y).all()
    # the slit does not move: one solar_x per row for every exposure
    np.testing.assert_allclose(sns.solar_x.std("time"), 0.0, atol=1e-3)
    assert np.all(np.diff(sns["time"].values).astype(float) > 0)
    assert ((sns.mu > 0.8) & (sns.mu < 1.0)).all()


def test_series_of_rasters_stacks():
    both = read_iris_raster(RASTER_FILES[:2])
    assert both.dims == ("raster", "y", "x", "wavelength")
    assert both.sizes["raster"] == 2


def test_truncated_and_wrong_files_raise_one_clear_error(tmp_path):
    data = Path(RASTER_FILES[0]).read_bytes()
    cut = tmp_path / "truncated.fits"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(IRISFileError, match="truncated.fits"):
        read_iris_raster(cut)
    sji = next(iter(glob.glob(str(_TEST / "raster" / "*SJI_1400*.fits"))))
    with pytest.raises(IRISFileError, match="no Mg II h&k window"):
        read_iris_raster(sji)
    junk = tmp_path / "junk.fits"
    junk.write_text("not a fits file at all")
    with pytest.raises(ValueError, match="junk.fits"):
        read_iris_raster(junk)


def _synthetic(ny=5, nx=4, wl0=2794.0, seed=0):
    rng = np.random.default_rng(seed)
    wl = wl0 + 0.02546 * np.arange(473)
    prof = 50 + 400 * np.exp(-0.5 * ((wl - MGII_K_VACUUM) / 0.15) ** 2)
    vals = prof * rng.uniform(0.5, 1.5, (ny, nx, 1))
    return xr.DataArray(vals.astype(np.float32), dims=("y", "x", "wavelength"),
                        coords={"wavelength": wl}, attrs={"units": "DN/s"})


def test_writer_round_trip(tmp_path):
    syn = _synthetic()
    syn[1, 2, 10] = np.nan
    syn[0, 0, 200] = 1.0e5  # saturates at the level-2 integer ceiling
    path = write_iris_raster(syn, tmp_path / "syn_l2.fits", exptime=4.0, xcen=10.0, ycen=-20.0)
    back = read_iris_raster(path)
    assert back.dims == ("y", "x", "wavelength") and back.shape == syn.shape
    assert back.attrs["spectral_decimation"] == 1
    np.testing.assert_allclose(back.wavelength, syn.wavelength, atol=1e-9)
    expected_mask = ~np.isfinite(syn.values) | (syn.values * 4.0 >= 16183.0)
    np.testing.assert_array_equal(back["mask"].values, expected_mask)
    ok = ~expected_mask
    # float32 storage of DN then division by the exposure time: 1e-6 relative
    np.testing.assert_allclose(back.values[ok], syn.values[ok], rtol=1e-6)
    assert abs(float(back.solar_x.mean()) - 10.0) < 1e-3
    assert abs(float(back.solar_y.mean()) + 20.0) < 1e-3
    assert (back.mu > 0.999).all()


def test_writer_output_is_read_by_irispy(tmp_path):
    from irispy.io import read_files

    path = write_iris_raster(_synthetic(), tmp_path / "syn_l2.fits", exptime=2.0)
    coll = read_files(str(path))
    cube = coll["Mg II k 2796"][0]
    np.testing.assert_allclose(np.asarray(cube.data), np.transpose(
        _synthetic().values * 2.0, (1, 0, 2)), rtol=1e-6)


def test_writer_rejects_wrong_dims():
    with pytest.raises(ValueError, match="dims"):
        write_iris_raster(_synthetic().transpose("x", "y", "wavelength"), "unused.fits")
