"""Read RADYN flare simulations (CDF, through radynpy) onto the flare height grid.

RADYN (Carlsson & Stein 1992; Allred et al. 2015) evolves a 1-D loop on an
adaptive Lagrangian grid: every snapshot has its own interface heights
``z1[t, k]`` (top of the loop first). :func:`read_radyn` interpolates the
temperature, electron density and velocity of every snapshot onto one fixed
height grid — by default the 50-point grid of the flare training set
(:func:`iris_lab.worlds.flare.flare_height_grid`) — so F-CHROMA-style grids
can be turned into training sets for :class:`iris_lab.methods.inn.FlareINN`.
Densities and temperatures are interpolated linearly in their logarithm,
velocities linearly; heights outside a snapshot's column take the end value
and are marked in ``covered``. RADYN's ``vz1`` is positive upwards; here
``v_los`` is positive downwards (redshift), as everywhere in iris_lab.

Example
-------
``ds = read_radyn("radyn_out.val3c_d3_1.0e11_t20s_10kev_fp")``
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: RADYN variables read by :func:`read_radyn`.
RADYN_VARIABLES: tuple[str, ...] = ("z1", "tg1", "ne1", "vz1", "time")


def interpolate_columns(z: np.ndarray, values: np.ndarray,
                        heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation of many columns, each on its own height grid.

    Parameters
    ----------
    z
        ``(n, k)`` heights of every column, strictly monotonic along ``k``
        (either direction).
    values
        ``(n, k)`` values at those heights.
    heights
        ``(m,)`` target heights.

    Returns
    -------
    values_on_grid, covered
        ``(n, m)`` interpolated values (end values outside a column) and a
        boolean mask of targets inside the column.

    Example
    -------
    >>> import numpy as np
    >>> v, ok = interpolate_columns(np.array([[3.0, 2.0, 0.0]]), np.array([[30.0, 20.0, 0.0]]),
    ...                             np.array([4.0, 1.0]))
    >>> v.tolist(), ok.tolist()
    ([[30.0, 10.0]], [[False, True]])
    """
    z = np.asarray(z, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    h = np.asarray(heights, dtype=np.float64)
    if z.shape != values.shape or z.ndim != 2:
        raise ValueError(f"z and values must both be (n, k), got {z.shape} and {values.shape}")
    dz = np.diff(z, axis=1)
    down = np.all(dz < 0, axis=1)
    if not np.all(down | np.all(dz > 0, axis=1)):
        raise ValueError("every column's heights must be strictly monotonic")
    z = np.where(down[:, None], z[:, ::-1], z)  # make every column increasing
    values = np.where(down[:, None], values[:, ::-1], values)
    k = z.shape[1]
    # index of the last column point at or below each target height
    idx = np.sum(z[:, :, None] <= h[None, None, :], axis=1) - 1  # (n, m)
    covered = (idx >= 0) & (idx <= k - 1) & (h[None, :] <= z[:, -1:])
    lo = np.clip(idx, 0, k - 2)
    rows = np.arange(z.shape[0])[:, None]
    z0, z1 = z[rows, lo], z[rows, lo + 1]
    v0, v1 = values[rows, lo], values[rows, lo + 1]
    t = np.clip((h[None, :] - z0) / (z1 - z0), 0.0, 1.0)
    return v0 + t * (v1 - v0), covered


def read_radyn(path: str | Path, heights: np.ndarray | None = None):
    """Read a RADYN CDF output and put every snapshot on a fixed height grid.

    Parameters
    ----------
    path
        RADYN ``radyn_out*`` CDF file (F-CHROMA file names are parsed for the
        beam parameters by radynpy).
    heights
        Target heights [cm], top first; default the 50-point flare grid.

    Returns
    -------
    xarray.Dataset
        dims (``time``, ``height``): ``temperature`` [K], ``n_e`` [cm⁻³],
        ``v_los`` [cm s⁻¹, positive = downflow], ``covered`` (bool); coords
        ``time`` [s], ``height`` [cm]; attrs with the source file and the beam
        parameters when the file name carries them.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    ValueError
        If it is not a RADYN CDF with the needed variables.

    Example
    -------
    ``ds = read_radyn(path); ds.temperature.sel(time=10.0, method="nearest")``
    """
    import xarray as xr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no RADYN file at {path}")
    if heights is None:
        from iris_lab.worlds.flare import flare_height_grid

        heights = flare_height_grid()
    heights = np.asarray(heights, dtype=np.float64)
    try:
        from radynpy.cdf import LazyRadynData

        rad = LazyRadynData(str(path), parseFilenameParams=path.name.startswith("radyn_out."))
        z, tg, ne, vz = (np.atleast_2d(np.asarray(getattr(rad, v), dtype=np.float64))
                         for v in ("z1", "tg1", "ne1", "vz1"))
        time = np.atleast_1d(np.asarray(rad.time, dtype=np.float64))
    except (OSError, KeyError, AttributeError, ValueError) as err:
        raise ValueError(f"{path} is not a readable RADYN CDF with "
                         f"{', '.join(RADYN_VARIABLES)}: {err}") from err
    if not (z.shape == tg.shape == ne.shape == vz.shape and z.shape[0] == time.size):
        raise ValueError(f"{path}: inconsistent RADYN array shapes {z.shape}, {tg.shape}, "
                         f"{ne.shape}, {vz.shape} for {time.size} times")
    if np.any(tg <= 0) or np.any(ne <= 0):
        raise ValueError(f"{path}: non-positive temperature or electron density")
    log_t, cov = interpolate_columns(z, np.log10(tg), heights)
    log_ne, _ = interpolate_columns(z, np.log10(ne), heights)
    v_up, _ = interpolate_columns(z, vz, heights)
    dims = ("time", "height")
    attrs = {"source": str(path.name), "reader": "radynpy",
             "interpolation": "linear in height; log for T and n_e"}
    for key in ("startingModelAtmosphere", "beamSpectralIndex", "totalBeamEnergy",
                "cutoffEnergy", "beamType"):
        if hasattr(rad, key):
            attrs[key] = getattr(rad, key)
    return xr.Dataset(
        {"temperature": (dims, 10.0 ** log_t, {"units": "K"}),
         "n_e": (dims, 10.0 ** log_ne, {"units": "1 / cm3"}),
         "v_los": (dims, -v_up, {"units": "cm / s",
                                 "long_name": "line-of-sight velocity (positive = downflow)"}),
         "covered": (dims, cov, {"long_name": "height inside the RADYN column"})},
        coords={"time": ("time", time, {"units": "s"}),
                "height": ("height", heights, {"units": "cm"})},
        attrs=attrs)
