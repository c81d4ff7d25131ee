"""The result Dataset shared by the per-pixel inversion methods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr


def result_dataset(data_vars: dict[str, Any], raster: xr.DataArray, spatial: Sequence[str],
                   quality: np.ndarray, log_tau: np.ndarray, flag_masks: Sequence[int],
                   flag_meanings: Sequence[str], attrs: dict[str, Any]) -> xr.Dataset:
    """Add the ``quality`` flags to ``data_vars`` and build the Dataset.

    The coordinates are ``log_tau`` and those of ``raster`` that do not run
    along the wavelength.
    """
    data_vars["quality"] = (spatial, quality, {
        "flag_masks": np.array(flag_masks, dtype=np.uint8),
        "flag_meanings": " ".join(flag_meanings)})
    coords: dict[str, Any] = {"log_tau": ("log_tau", log_tau,
                                          {"long_name": "log10 optical depth at 500 nm"})}
    for name, coord in raster.coords.items():
        if name != "wavelength" and "wavelength" not in coord.dims:
            coords[name] = coord
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)
