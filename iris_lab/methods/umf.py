"""Uncertainty multiplication factor (eq. 3 of Sainz Dalda et al. 2019).

``UMF_p(τ) = |p_method(τ) − p_true(τ)| / σ_p(τ)`` per pixel and log τ, with
``p`` the temperature, v_los, v_turb, or log10 n_e (σ in dex). A UMF near 1
means the σ a method reports describes its real error; ≫ 1, that σ is too
optimistic.

Example
-------
>>> from iris_lab.methods.umf import uncertainty_multiplication_factor, umf_summary
>>> umf = uncertainty_multiplication_factor(result, truth)        # doctest: +SKIP
>>> umf_summary(umf, {"plage": plage_mask}).to_dataframe()        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping

import numpy as np
import xarray as xr

#: Quantity → its σ variable (n_e is differenced in log10, σ in dex).
QUANTITIES: dict[str, str] = {
    "temperature": "sigma_temperature",
    "v_los": "sigma_v_los",
    "v_turb": "sigma_v_turb",
    "n_e": "sigma_log_n_e",
}


def uncertainty_multiplication_factor(result: xr.Dataset, truth: xr.Dataset) -> xr.Dataset:
    """UMF maps ``umf_<quantity>`` (y, x, log_tau) of a result against the true models.

    Parameters
    ----------
    result
        IRIS² result layout (values and ``sigma_*``; ``quality`` bit 1 =
        masked pixels are left NaN).
    truth
        Dataset with the same spatial dims and ``log_tau`` holding the true
        ``temperature``, ``v_los``, ``v_turb``, ``n_e``.

    Returns
    -------
    xarray.Dataset
        ``umf_temperature``, ``umf_v_los``, ``umf_v_turb``, ``umf_n_e``; n_e is
        compared in log10 with σ in dex.

    Example
    -------
    >>> umf = uncertainty_multiplication_factor(result, truth)   # doctest: +SKIP
    """
    missing = [q for q in QUANTITIES if q not in truth] + \
        [v for q, s in QUANTITIES.items() for v in (q, s) if v not in result]
    if missing:
        raise ValueError(f"UMF needs variables {sorted(set(missing))}")
    truth = truth.transpose(*result["temperature"].dims)
    if truth["temperature"].shape != result["temperature"].shape:
        raise ValueError(f"truth {truth['temperature'].shape} and result "
                         f"{result['temperature'].shape} differ in shape")
    out = {}
    masked = (result["quality"] & 1).astype(bool) if "quality" in result else None
    for q, sig in QUANTITIES.items():
        est = result[q].values.astype(np.float64)
        ref = truth[q].values.astype(np.float64)
        if q == "n_e":
            with np.errstate(divide="ignore", invalid="ignore"):
                est, ref = np.log10(est), np.log10(ref)
        sigma = result[sig].values.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            umf = np.abs(est - ref) / np.where(sigma > 0, sigma, np.nan)
        da = xr.DataArray(umf.astype(np.float32), dims=result[q].dims,
                          coords=result[q].coords, attrs={"units": "", "long_name":
                                                          f"|{q} - true| / sigma"})
        if masked is not None:
            da = da.where(~masked)
        out[f"umf_{q}"] = da
    return xr.Dataset(out, attrs={"definition": "eq. 3 of Sainz Dalda et al. (2019)"})


def umf_summary(umf: xr.Dataset, regions: Mapping[str, np.ndarray | xr.DataArray] | None = None,
                statistic: str = "median") -> xr.Dataset:
    """Median (or mean) UMF per region and log τ; the full field of view is always included.

    Parameters
    ----------
    umf
        Output of :func:`uncertainty_multiplication_factor`.
    regions
        Name → boolean (y, x) mask of each region of interest.
    statistic
        ``"median"`` or ``"mean"`` over the region's pixels (NaN ignored).

    Returns
    -------
    xarray.Dataset
        ``umf_*`` with dims (region, log_tau).

    Example
    -------
    >>> umf_summary(umf, {"plage": mask})["umf_temperature"].sel(region="plage")  # doctest: +SKIP
    """
    if statistic not in ("median", "mean"):
        raise ValueError(f"statistic must be 'median' or 'mean', not {statistic!r}")
    first = next(iter(umf.data_vars.values()))
    spatial = [d for d in first.dims if d != "log_tau"]
    shape = tuple(first.sizes[d] for d in spatial)
    masks = {"full_fov": np.ones(shape, dtype=bool)}
    for name, mask in (regions or {}).items():
        m = np.asarray(mask, dtype=bool)
        if m.shape != shape:
            raise ValueError(f"region {name!r} mask has shape {m.shape}, expected {shape}")
        masks[name] = m
    reduce = np.nanmedian if statistic == "median" else np.nanmean
    out = {}
    for var, da in umf.data_vars.items():
        flat = da.transpose(*spatial, "log_tau").values.reshape(-1, da.sizes["log_tau"])
        rows = []
        for m in masks.values():
            sel = flat[m.ravel()]
            with np.errstate(all="ignore"), _quiet():
                rows.append(reduce(sel, axis=0) if len(sel) else
                            np.full(flat.shape[1], np.nan))
        out[var] = (("region", "log_tau"), np.array(rows, dtype=np.float32))
    return xr.Dataset(out, coords={"region": list(masks), "log_tau": umf["log_tau"].values},
                      attrs={"statistic": statistic})


def umf_table(summary: xr.Dataset, log_tau_range: tuple[float, float] = (-5.0, -1.0)):
    """Mean of the per-region UMF profile inside and outside a log τ range, as a DataFrame.

    Example
    -------
    >>> print(umf_table(umf_summary(umf)).round(2))  # doctest: +SKIP
    """
    import pandas as pd

    lt = summary["log_tau"].values
    inside = (lt > log_tau_range[0]) & (lt < log_tau_range[1])
    rows = []
    for region in summary["region"].values:
        for var in summary.data_vars:
            prof = summary[var].sel(region=region).values
            with np.errstate(all="ignore"), _quiet():
                rows.append({"region": str(region), "quantity": var.removeprefix("umf_"),
                             f"UMF {log_tau_range[0]:g}<logtau<{log_tau_range[1]:g}":
                                 float(np.nanmean(prof[inside])),
                             "UMF elsewhere": float(np.nanmean(prof[~inside]))})
    return pd.DataFrame(rows)


@contextlib.contextmanager
def _quiet():
    """Silence numpy's all-NaN slice warnings inside a block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
