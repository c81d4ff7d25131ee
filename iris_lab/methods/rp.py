"""Representative profiles (RPs): k-means of a raster's Mg II h&k profiles.

Sainz Dalda et al. (2019) cluster the profiles of a raster into a few
representative profiles (60 by default), invert only those, and map the
results back to the pixels. :class:`RepresentativeProfiles` does the
clustering with scikit-learn's :class:`~sklearn.cluster.KMeans`;
:func:`invert_representative_profiles` is the RP path of the IRIS² look-up.

Example
-------
>>> from iris_lab.methods.rp import RepresentativeProfiles
>>> rp = RepresentativeProfiles(n_profiles=60).fit(raster)   # doctest: +SKIP
>>> rp.labels_.plot()                                        # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

_MASKED_FRACTION = 0.5


def _flat(raster: xr.DataArray) -> tuple[np.ndarray, tuple[str, str], tuple[int, int]]:
    if not isinstance(raster, xr.DataArray) or "wavelength" not in raster.dims \
            or raster.ndim != 3:
        raise ValueError("raster must be an xarray.DataArray with dims (y, x|time, wavelength)")
    raster = raster.transpose(..., "wavelength")
    data = np.asarray(raster.values, dtype=np.float32)
    if "mask" in raster.coords:
        data = np.where(np.asarray(raster["mask"].values, dtype=bool), np.nan, data)
    return data.reshape(-1, data.shape[-1]), raster.dims[:2], data.shape[:2]


class RepresentativeProfiles:
    """k-means representative profiles of a raster (scikit-learn ``KMeans``).

    Parameters
    ----------
    n_profiles
        Number of RPs (60 as in Sainz Dalda et al. 2019).
    random_state
        Seed of the k-means++ initialisation.
    n_init, max_iter, tol
        Passed to :class:`sklearn.cluster.KMeans` (Lloyd iterations).

    Attributes
    ----------
    profiles_ : xarray.DataArray
        (rp, wavelength) cluster centres, in the raster's units.
    spread_ : xarray.DataArray
        (rp, wavelength) standard deviation of the member profiles.
    counts_ : numpy.ndarray
        Members per RP.
    labels_ : xarray.DataArray
        (y, x) RP index of every pixel of the fitted raster (−1: masked).
    inertia_ : float
    n_iter_ : int
        Lloyd iterations run.

    Example
    -------
    >>> rp = RepresentativeProfiles(n_profiles=4).fit(raster)  # doctest: +SKIP
    >>> rp.predict(raster).max() < 4                           # doctest: +SKIP
    """

    def __init__(self, n_profiles: int = 60, random_state: int = 0, n_init: int = 1,
                 max_iter: int = 100, tol: float = 1e-4) -> None:
        self.n_profiles = n_profiles
        self.random_state = random_state
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, raster: xr.DataArray) -> RepresentativeProfiles:
        """Cluster the fully valid profiles of ``raster``; masked pixels get label −1."""
        from sklearn.cluster import KMeans

        flat, dims, shape = _flat(raster)
        good = np.isfinite(flat).all(1)
        if good.sum() < self.n_profiles:
            raise ValueError(f"{int(good.sum())} unmasked profiles cannot make "
                             f"{self.n_profiles} representative profiles")
        km = KMeans(n_clusters=int(self.n_profiles), init="k-means++", n_init=self.n_init,
                    max_iter=self.max_iter, tol=self.tol, random_state=self.random_state,
                    algorithm="lloyd")
        km.fit(flat[good])
        wl = raster["wavelength"].values
        units = raster.attrs.get("units", "")
        centres = km.cluster_centers_.astype(np.float32)
        labels_good = km.labels_
        counts = np.bincount(labels_good, minlength=self.n_profiles)
        sums = np.zeros_like(centres, dtype=np.float64)
        np.add.at(sums, labels_good, (flat[good] - centres[labels_good]).astype(np.float64) ** 2)
        spread = np.sqrt(sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
        coords = {"rp": np.arange(self.n_profiles), "wavelength": wl}
        self.profiles_ = xr.DataArray(centres, dims=("rp", "wavelength"), coords=coords,
                                      attrs={"units": units}, name="representative_profile")
        self.spread_ = xr.DataArray(spread, dims=("rp", "wavelength"), coords=coords,
                                    attrs={"units": units}, name="rp_spread")
        self.counts_ = counts
        self.inertia_ = float(km.inertia_)
        self.n_iter_ = int(km.n_iter_)
        self.labels_ = self.predict(raster)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "profiles_"):
            raise ValueError("RepresentativeProfiles is not fitted: call fit(raster) first")

    def predict(self, raster: xr.DataArray) -> xr.DataArray:
        """RP index of every pixel: nearest centre (Euclidean, float64) over the valid samples.

        Pixels with more than half of their samples masked get −1.
        """
        from iris_lab.methods.search import brute_force_nearest

        self._check_fitted()
        flat, dims, shape = _flat(raster)
        wl = np.asarray(raster["wavelength"].values, dtype=float)
        if wl.shape != self.profiles_["wavelength"].shape or \
                not np.allclose(wl, self.profiles_["wavelength"].values, atol=1e-6):
            raise ValueError("raster wavelengths differ from those the RPs were fitted on")
        valid = np.isfinite(flat)
        labels = np.full(len(flat), -1, dtype=np.int64)
        usable = valid.mean(1) >= 1.0 - _MASKED_FRACTION
        if usable.any():
            centres = self.profiles_.values.astype(np.float64)
            obs = np.where(valid[usable], flat[usable], 0.0).astype(np.float64)
            labels[usable] = brute_force_nearest(obs, centres, valid[usable].astype(float),
                                                 chunk_size=4096)[0]
        coords = {k: v for k, v in raster.coords.items() if "wavelength" not in v.dims}
        return xr.DataArray(labels.reshape(shape), dims=dims, coords=coords, name="rp_index",
                            attrs={"long_name": "representative profile index (-1: masked)"})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the RPs, spreads, counts and parameters to netCDF."""
        self._check_fitted()
        ds = xr.Dataset({"profile": self.profiles_, "spread": self.spread_,
                         "count": ("rp", self.counts_)},
                        attrs={"n_profiles": int(self.n_profiles),
                               "random_state": int(self.random_state),
                               "inertia": self.inertia_})
        path = Path(path)
        ds.to_netcdf(path, engine="h5netcdf")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RepresentativeProfiles:
        """Read a file written by :meth:`save`."""
        try:
            ds = xr.load_dataset(path, engine="h5netcdf")
            centres = ds["profile"]
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"{path} is not a saved RepresentativeProfiles file ({err})") \
                from None
        rp = cls(n_profiles=int(ds.attrs["n_profiles"]),
                 random_state=int(ds.attrs["random_state"]))
        rp.profiles_ = centres.rename("representative_profile")
        rp.spread_ = ds["spread"].rename("rp_spread")
        rp.counts_ = ds["count"].values
        rp.inertia_ = float(ds.attrs["inertia"])
        return rp


def invert_representative_profiles(model: Any, rp: RepresentativeProfiles,
                                   raster: xr.DataArray) -> xr.Dataset:
    """The RP path: look up only the RPs with an IRIS² model, map the results to pixels.

    Parameters
    ----------
    model
        A fitted :class:`iris_lab.methods.iris2.IRIS2`.
    rp
        A fitted :class:`RepresentativeProfiles` (same wavelength grid and units
        as ``raster``).
    raster
        The raster whose pixels receive the RP results.

    Returns
    -------
    xarray.Dataset
        The IRIS² result layout with ``method="rp_lookup"``; ``index`` is the
        database entry of the pixel's RP, ``chi2`` the pixel's own χ² against
        that entry, plus ``rp_index`` (y, x).

    Example
    -------
    >>> res = invert_representative_profiles(IRIS2().fit(db), rp, raster)  # doctest: +SKIP
    """
    from iris_lab.methods.iris2 import _MASKED_FRACTION as masked_fraction
    from iris_lab.methods.iris2 import raster_on_grid

    model._check_fitted()
    labels = rp.predict(raster)
    rps = rp.profiles_.expand_dims(y=1).rename(rp="x")
    rps.attrs = dict(raster.attrs)
    rp_result = model.predict(rps)
    rp_index = np.asarray(rp_result["index"].values[0], dtype=np.int64)
    lab = labels.values.ravel()
    index = np.where(lab >= 0, rp_index[np.clip(lab, 0, None)], -1)
    intensity = raster_on_grid(raster.transpose(..., "wavelength"), model.wavelength_)
    flat = intensity.reshape(-1, intensity.shape[-1])
    valid = np.isfinite(flat)
    wv = model.weights_[None] * valid
    frac = 1.0 - wv.sum(1) / model.weights_.sum()
    index = np.where(frac > masked_fraction, -1, index)
    chi2 = np.full(len(flat), np.nan)
    sel = index >= 0
    obs = np.where(valid[sel], flat[sel], 0.0)
    chi2[sel] = ((obs - model._profiles[index[sel]]) ** 2 * wv[sel]).sum(1) / \
        np.maximum((obs**2 * wv[sel]).sum(1), 1e-300)
    raster = raster.transpose(..., "wavelength")
    res = model._result(raster, flat, index, chi2, tuple(labels.shape), method="rp_lookup")
    res["rp_index"] = labels
    res.attrs["n_profiles"] = int(rp.n_profiles)
    return res
