"""IRIS level-2 spectrograph rasters: read the Mg II h&k window, write synthetic ones.

The reader returns an :class:`xarray.DataArray` with dims ``(y, x, wavelength)``
(``(y, time, wavelength)`` for a sit-and-stare) in DN/s, vacuum wavelengths in Å,
helioprojective coordinates ``solar_x``/``solar_y`` [arcsec] and the heliocentric
``mu`` of every pixel. Samples at the instrument's missing value (−200 DN) or at
saturation are set to NaN and flagged in the boolean ``mask`` coordinate.

Header problems handled here:

* sit-and-stare files state ``CDELT3 = 0``, which makes the celestial WCS matrix
  singular; the slit does not move, so the scan axis is given a nominal step and
  every exposure is evaluated at the reference slit position;
* files whose spectral axis was decimated (``n`` samples spanning
  ``TWMIN..TWMAX`` with a step that is an integer multiple of ``CDELT1``) get the
  wavelengths ``TWMIN + i * factor * CDELT1``.

Example
-------
>>> from iris_lab.io.iris import read_iris_raster  # doctest: +SKIP
>>> raster = read_iris_raster("iris_l2_..._raster_t000_r00000.fits")  # doctest: +SKIP
>>> raster.dims  # doctest: +SKIP
('y', 'x', 'wavelength')
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import xarray as xr

#: Level-2 value of a sample without data.
MISSING_VALUE = -200.0
#: Vacuum line centres of Mg II k and h [Å].
MGII_K_VACUUM = 2796.352
MGII_H_VACUUM = 2803.531
#: Level-2 integer storage (BSCALE 0.25, BZERO 7992): its ceiling marks saturated samples.
_L2_BSCALE, _L2_BZERO = 0.25, 7992.0
#: Columns of the auxiliary (second-to-last) extension used here.
_AUX_COLUMNS = ("TIME", "PZTX", "PZTY", "EXPTIMEF", "EXPTIMEN", "XCENIX", "YCENIX")
_AUX_WIDTH = 47
_R_SUN_M = 6.957e8

PathType = str | PathLike


class IRISFileError(ValueError):
    """An unreadable, truncated or unsuitable IRIS level-2 file."""


def _mgii_window(header, path: Path, window: str | None) -> int:
    """Index (1-based HDU) of the window holding both Mg II k and h."""
    try:
        nwin = int(header["NWIN"])
        names = [str(header[f"TDESC{i}"]).strip() for i in range(1, nwin + 1)]
        ranges = [(float(header[f"TWMIN{i}"]), float(header[f"TWMAX{i}"]))
                  for i in range(1, nwin + 1)]
    except KeyError as err:
        raise IRISFileError(f"{path}: not an IRIS level-2 spectrograph file "
                            f"(missing header keyword {err})") from None
    for i, (name, (lo, hi)) in enumerate(zip(names, ranges, strict=True), start=1):
        if window is not None:
            if name == window:
                return i
            continue
        if lo <= MGII_K_VACUUM and hi >= MGII_H_VACUUM:
            return i
    wanted = f"window {window!r}" if window else "Mg II h&k window (2796.35 and 2803.53 Å)"
    raise IRISFileError(f"{path}: no {wanted}; windows are {names}")


def _wavelengths(whdr, n: int, twmin: float, twmax: float) -> tuple[np.ndarray, int]:
    cdelt = float(whdr["CDELT1"])
    factor = 1
    if n > 1:
        factor = max(1, int(round((twmax - twmin) / cdelt / (n - 1))))
    if factor > 1:
        return twmin + np.arange(n) * factor * cdelt, factor
    crpix = float(whdr.get("CRPIX1", 1.0))
    crval = float(whdr.get("CRVAL1", twmin))
    return crval + (np.arange(n) + 1.0 - crpix) * cdelt, 1


def _solar_coordinates(whdr, ny: int, nscan: int, sit_and_stare: bool):
    """Helioprojective (Tx, Ty) [arcsec] of every (y, scan) pixel from the window WCS."""
    from astropy.wcs import WCS, FITSFixedWarning

    hdr = whdr.copy()
    if sit_and_stare or float(hdr.get("CDELT3", 0.0)) == 0.0:
        hdr["CDELT3"] = float(hdr["CDELT2"]) if float(hdr["CDELT2"]) else 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(hdr, naxis=3).sub([2, 3])
    yy, ss = np.meshgrid(np.arange(ny, dtype=float), np.arange(nscan, dtype=float),
                         indexing="ij")
    if sit_and_stare:
        ss = np.full_like(ss, float(hdr.get("CRPIX3", 1.0)) - 1.0)
    lat, lon = wcs.pixel_to_world_values(yy, ss)
    tx = np.asarray(lon, dtype=float) * 3600.0
    ty = np.asarray(lat, dtype=float) * 3600.0
    tx = np.where(tx > 648000.0, tx - 1296000.0, tx)
    return tx, ty


def heliocentric_mu(solar_x, solar_y, dsun_m: float) -> np.ndarray:
    """μ = cos θ of the surface normal for helioprojective (Tx, Ty) [arcsec].

    ``sin θ = (D / R_sun) sin ρ`` with ρ the angular distance from disk centre;
    0 off the limb.

    Example
    -------
    >>> float(heliocentric_mu(0.0, 0.0, 1.496e11))
    1.0
    """
    rho = np.deg2rad(np.hypot(solar_x, solar_y) / 3600.0)
    s = dsun_m / _R_SUN_M * np.sin(rho)
    return np.sqrt(np.clip(1.0 - s**2, 0.0, 1.0))


def _read_one(path: Path, window: str | None, saturation: float | None) -> xr.DataArray:
    from astropy.io import fits
    from astropy.time import Time, TimeDelta

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False) as hdul:
                hdul.verify("silentfix")
                phdr = hdul[0].header
                iwin = _mgii_window(phdr, path, window)
                whdr = hdul[iwin].header.copy()
                data = np.asarray(hdul[iwin].data, dtype=np.float32)
                aux_hdu = hdul[-2]
                aux = np.asarray(aux_hdu.data, dtype=float)
                aux_cols = {k: int(aux_hdu.header[k]) for k in _AUX_COLUMNS}
                bscale = float(whdr.get("BSCALE", phdr.get("BSCALE", _L2_BSCALE)))
                bzero = float(whdr.get("BZERO", phdr.get("BZERO", _L2_BZERO)))
                twmin, twmax = float(phdr[f"TWMIN{iwin}"]), float(phdr[f"TWMAX{iwin}"])
                desc = str(phdr[f"TDESC{iwin}"]).strip()
                startobs = str(phdr.get("STARTOBS", phdr.get("DATE_OBS")))
                dsun = float(phdr.get("DSUN_OBS", 1.496e11))
                steps_av = float(phdr.get("STEPS_AV", 1.0))
                nrasterp = int(phdr.get("NRASTERP", 1))
                obsid = str(phdr.get("OBSID", ""))
    except IRISFileError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise IRISFileError(f"{path}: not a readable IRIS level-2 raster ({err})") from None
    if data.ndim != 3 or data.size == 0:
        raise IRISFileError(f"{path}: window {desc!r} has shape {data.shape}, "
                            "expected (scan, y, wavelength)")
    nscan, ny, nw = data.shape
    if aux.ndim != 2 or aux.shape[0] != nscan:
        raise IRISFileError(f"{path}: auxiliary table has {aux.shape[0] if aux.ndim else 0} "
                            f"rows for {nscan} exposures (truncated file?)")
    sit_and_stare = nrasterp == 1 and abs(steps_av) < 1e-6 and \
        float(whdr.get("CDELT3", 0.0)) == 0.0
    wavelength, factor = _wavelengths(whdr, nw, twmin, twmax)
    if saturation is None:
        saturation = bzero + 32767.0 * bscale - 0.5 * bscale
    mask = (data <= MISSING_VALUE + 0.1) | (data >= saturation)
    exptime = aux[:, aux_cols["EXPTIMEN"]]
    if not np.all(exptime > 0):
        raise IRISFileError(f"{path}: non-positive NUV exposure times in the auxiliary table")
    rate = np.where(mask, np.nan, data / exptime[:, None, None].astype(np.float32))
    tx, ty = _solar_coordinates(whdr, ny, nscan, sit_and_stare)
    times = (Time(startobs) + TimeDelta(aux[:, aux_cols["TIME"]], format="sec")).datetime64
    scan = "time" if sit_and_stare else "x"
    coords = {
        "wavelength": ("wavelength", wavelength,
                       {"units": "Angstrom", "medium": "vacuum"}),
        "y": ("y", np.arange(ny)),
        scan: (scan, times if sit_and_stare else np.arange(nscan)),
        "solar_x": (("y", scan), tx.astype(np.float32), {"units": "arcsec"}),
        "solar_y": (("y", scan), ty.astype(np.float32), {"units": "arcsec"}),
        "mu": (("y", scan), heliocentric_mu(tx, ty, dsun).astype(np.float32),
               {"long_name": "cosine of the heliocentric angle (0 off the limb)"}),
        "exptime": (scan, exptime, {"units": "s"}),
        "mask": (("y", scan, "wavelength"), np.transpose(mask, (1, 0, 2)),
                 {"long_name": "missing (-200) or saturated sample"}),
    }
    if not sit_and_stare:
        coords["obs_time"] = ("x", times)
    return xr.DataArray(
        np.transpose(rate, (1, 0, 2)).astype(np.float32), dims=("y", scan, "wavelength"),
        coords=coords, name="intensity",
        attrs={"units": "DN/s", "window": desc, "obsid": obsid, "source": str(path),
               "spectral_decimation": factor, "saturation_dn": float(saturation),
               "sit_and_stare": int(sit_and_stare)})


def read_iris_raster(paths: PathType | Sequence[PathType], *, window: str | None = None,
                     saturation: float | None = None) -> xr.DataArray:
    """Read the Mg II h&k window of one or several IRIS level-2 raster files.

    Parameters
    ----------
    paths
        One file, or several files of the same observation: raster repeats are
        stacked along a new ``raster`` dimension; sit-and-stare files are
        concatenated along ``time``.
    window
        Exact ``TDESC`` name of the window to read (default: the window that
        covers both Mg II k and h).
    saturation
        Level-2 DN at and above which a sample counts as saturated (default: the
        ceiling of the level-2 integer storage, BZERO + 32767 BSCALE).

    Returns
    -------
    xarray.DataArray
        ``(y, x, wavelength)`` or ``(y, time, wavelength)`` in DN/s, masked
        samples NaN and flagged in ``mask``.

    Raises
    ------
    IRISFileError
        (a ``ValueError``) naming the file and the problem: unreadable or
        truncated file, no Mg II window, inconsistent tables.

    Example
    -------
    >>> raster = read_iris_raster(path)  # doctest: +SKIP
    >>> raster.sel(wavelength=2796.35, method="nearest").plot()  # doctest: +SKIP
    """
    if isinstance(paths, str | PathLike):
        return _read_one(Path(paths), window, saturation)
    arrays = [_read_one(Path(p), window, saturation) for p in paths]
    if not arrays:
        raise ValueError("no files given")
    if len(arrays) == 1:
        return arrays[0]
    shapes = {a.shape for a in arrays}
    if "time" in arrays[0].dims:
        if len({a.sizes["y"] for a in arrays}) != 1:
            raise ValueError("sit-and-stare files differ in slit length")
        return xr.concat(arrays, dim="time", coords="different", compat="equals", join="outer",
                         combine_attrs="drop_conflicts")
    if len(shapes) != 1:
        raise ValueError(f"raster files differ in shape: {sorted(shapes)}")
    return xr.concat(arrays, dim="raster", coords="different", compat="equals", join="exact",
                     combine_attrs="drop_conflicts")


def write_iris_raster(raster: xr.DataArray, path: PathType, *, exptime: float = 8.0,
                      date_obs: str = "2020-01-01T00:00:00.000", xcen: float = 0.0,
                      ycen: float = 0.0, step_arcsec: float = 0.35,
                      pixel_arcsec: float = 0.1664, dsun_m: float = 1.496e11,
                      obsid: str = "0000000000") -> Path:
    """Write a synthetic raster in the IRIS level-2 layout (one Mg II k 2796 window).

    Parameters
    ----------
    raster
        ``(y, x, wavelength)`` in DN/s (vacuum Å), or in
        ``erg / (s cm2 sr Angstrom)`` (converted with
        :func:`iris_lab.instrument.iris_intensity_to_dn`). NaN samples are written
        as the missing value −200.
    exptime
        Exposure time [s] of every step; the file stores DN = DN/s × exptime.
    date_obs, xcen, ycen, step_arcsec, pixel_arcsec, dsun_m, obsid
        Pointing and header values (raster centre [arcsec], slit step and pixel
        size [arcsec], observer distance [m]).

    Returns
    -------
    pathlib.Path
        The written file; :func:`read_iris_raster` reads it back.

    Example
    -------
    >>> write_iris_raster(raster, "synthetic_l2.fits", exptime=4.0)  # doctest: +SKIP
    """
    from astropy.io import fits

    if tuple(raster.dims) != ("y", "x", "wavelength"):
        raise ValueError(f"raster dims must be ('y', 'x', 'wavelength'), got {raster.dims}")
    units = str(raster.attrs.get("units", "DN/s"))
    values = np.asarray(raster.values, dtype=np.float64)
    if units != "DN/s":
        from iris_lab.instrument import iris_intensity_to_dn

        wl = np.asarray(raster["wavelength"].values, dtype=float)
        values = np.asarray(iris_intensity_to_dn(values, 1.0, wavelength=wl), dtype=np.float64)
    wl = np.asarray(raster["wavelength"].values, dtype=float)
    if wl.size < 2 or not np.allclose(np.diff(wl), wl[1] - wl[0], rtol=1e-4):
        raise ValueError("wavelength grid must be uniform to be written as level 2")
    ny, nx, nw = values.shape
    dn = values * exptime
    dn = np.where(np.isfinite(dn), dn, MISSING_VALUE)
    dn = np.clip(dn, MISSING_VALUE, _L2_BZERO + 32767.0 * _L2_BSCALE)
    cube = np.ascontiguousarray(np.transpose(dn, (1, 0, 2)), dtype=np.float32)  # (x, y, λ)
    dl = float(wl[1] - wl[0])
    primary = fits.Header()
    for key, val in [
        ("TELESCOP", "IRIS"), ("INSTRUME", "SPEC"), ("DATA_LEV", 2.0),
        ("OBSID", obsid), ("DATE_OBS", date_obs), ("STARTOBS", date_obs),
        ("BTYPE", "Intensity"), ("BUNIT", "Corrected DN"), ("BSCALE", _L2_BSCALE),
        ("BZERO", _L2_BZERO), ("DSUN_OBS", dsun_m), ("EXPTIME", exptime),
        ("XCEN", xcen), ("YCEN", ycen), ("FOVX", nx * step_arcsec),
        ("FOVY", ny * pixel_arcsec), ("NRASTERP", nx), ("STEPS_AV", step_arcsec),
        ("NWIN", 1), ("TDET1", "NUV"), ("TDESC1", "Mg II k 2796"),
        ("TWAVE1", MGII_K_VACUUM), ("TWMIN1", float(wl[0])), ("TWMAX1", float(wl[-1])),
        ("TSR1", 1), ("TER1", nw), ("TSC1", 1), ("TEC1", ny),
    ]:
        primary[key] = val
    whdr = fits.Header()
    for key, val in [
        ("CDELT1", dl), ("CDELT2", pixel_arcsec), ("CDELT3", step_arcsec),
        ("CRPIX1", 1.0), ("CRPIX2", (ny + 1) / 2.0), ("CRPIX3", (nx + 1) / 2.0),
        ("CRVAL1", float(wl[0])), ("CRVAL2", ycen), ("CRVAL3", xcen),
        ("CTYPE1", "WAVE"), ("CTYPE2", "HPLT-TAN"), ("CTYPE3", "HPLN-TAN"),
        ("CUNIT1", "Angstrom"), ("CUNIT2", "arcsec"), ("CUNIT3", "arcsec"),
        ("PC1_1", 1.0), ("PC1_2", 0.0), ("PC2_1", 0.0), ("PC2_2", 1.0),
        ("PC3_1", 0.0), ("PC3_2", 0.0), ("PC3_3", 1.0), ("PC2_3", 0.0),
    ]:
        whdr[key] = val
    aux = np.zeros((nx, _AUX_WIDTH))
    aux[:, 0] = np.arange(nx) * exptime
    aux[:, 3] = exptime
    aux[:, 4] = exptime
    aux[:, 13] = xcen
    aux[:, 14] = ycen
    ahdr = fits.Header()
    for i, key in enumerate(("TIME", "PZTX", "PZTY", "EXPTIMEF", "EXPTIMEN")):
        ahdr[key] = i
    ahdr["XCENIX"], ahdr["YCENIX"] = 13, 14
    ahdr["OBS_VRIX"], ahdr["OPHASEIX"] = 15, 16
    table = fits.TableHDU.from_columns([
        fits.Column(name="FRMID", format="A10", array=np.array(["0"] * nx)),
        fits.Column(name="NUVfilename", format="A66", array=np.array(["synthetic"] * nx)),
    ])
    hdul = fits.HDUList([fits.PrimaryHDU(header=primary),
                         fits.ImageHDU(cube, header=whdr),
                         fits.ImageHDU(aux, header=ahdr), table])
    path = Path(path)
    hdul.writeto(path, overwrite=True)
    return path
