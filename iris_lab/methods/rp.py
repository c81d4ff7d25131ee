"""Representative profiles (RPs): k-means of a raster's Mg II h&k profiles.

Sainz Dalda et al. (2019) cluster the profiles of a raster into a few
representative profiles (60 by default), invert only those, and map the
results back to the pixels. :class:`RepresentativeProfiles` does the
clustering (scikit-learn's :class:`~sklearn.cluster.KMeans` in a PCA-reduced
space, then full-space Lloyd iterations);
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
import torch
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


def _pca_basis(data: np.ndarray, variance: float, max_rows: int, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and the leading principal directions keeping ``variance`` of a random row subset."""
    from iris_lab.methods.search import principal_directions

    rows = data
    if len(data) > max_rows:
        rows = data[np.sort(np.random.default_rng(seed).choice(len(data), max_rows,
                                                                replace=False))]
    sub = torch.as_tensor(rows, dtype=torch.float64)
    mean = sub.mean(0)
    evals, evecs, _ = principal_directions((sub - mean).numpy())
    kept = np.cumsum(evals) / max(evals.sum(), 1e-300)
    n_dims = int(min(len(evals), np.searchsorted(kept, variance) + 1))
    return mean.numpy(), np.ascontiguousarray(evecs[:, :n_dims])


def _nearest(data: np.ndarray, centres: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Exact nearest centre (Euclidean, float64; ties → lowest index) of complete rows.

    A float64 product ``‖c‖² − 2 x·c`` ranks the centres; its rounding error is
    below ``10⁻¹² ‖x‖ ‖c‖`` (n_λ-term float64 dot products: ≈ n_λ 2⁻⁵³, with a
    20× margin), so only rows where another centre comes that close to the best
    are re-ranked by explicit float64 differences. (A float32 ranking needs a
    margin of ≈ 10⁻⁴ ‖x‖ ‖c‖, which flags most rows of high-contrast rasters.)
    """
    c64 = torch.as_tensor(centres, dtype=torch.float64)
    cn = (c64**2).sum(1)
    cnorm = torch.linalg.vector_norm(c64, dim=1)
    out = np.empty(len(data), dtype=np.int64)
    for s in range(0, len(data), chunk):
        x = torch.as_tensor(data[s:s + chunk], dtype=torch.float64)
        d = cn[None] - 2.0 * (x @ c64.T)
        err = 1e-12 * torch.linalg.vector_norm(x, dim=1)[:, None] * cnorm[None]
        near = (d - err) <= (d + err).amin(1, keepdim=True)
        lab = torch.argmin(d, dim=1)
        ties = torch.nonzero(near.sum(1) > 1).ravel()
        if len(ties):
            pix, ent = torch.nonzero(near[ties], as_tuple=True)
            exact = ((x[ties][pix] - c64[ent]) ** 2).sum(1)
            best = torch.full((len(ties),), float("inf"), dtype=torch.float64).scatter_reduce(
                0, pix, exact, reduce="amin")
            win = exact == best[pix]
            lab[ties] = torch.full((len(ties),), len(c64), dtype=torch.int64).scatter_reduce(
                0, pix[win], ent[win], reduce="amin")
        out[s:s + chunk] = lab.numpy()
    return out


def _moments(data: np.ndarray, labels: np.ndarray, k: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts, float64 means and Σ (x − mean)² per feature of the rows of each cluster."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=k)
    starts = np.concatenate([[0], np.cumsum(counts)])
    means = np.zeros((k, data.shape[1]))
    sq = np.zeros((k, data.shape[1]))
    for j in range(k):
        if counts[j]:
            block = data[order[starts[j]:starts[j + 1]]].astype(np.float64)
            means[j] = block.mean(0)
            block -= means[j]
            sq[j] = np.einsum("ij,ij->j", block, block)
    return counts, means, sq


class RepresentativeProfiles:
    """k-means representative profiles of a raster.

    Lloyd's k-means (scikit-learn :class:`~sklearn.cluster.KMeans`) runs on the
    profiles projected onto the principal directions that keep ``variance`` of
    the raster's variance (e.g. 39 of 473 dimensions at 99.9 %): k-means++ and
    Lloyd to convergence on ``init_rows`` random profiles, then at most
    ``max_iter`` Lloyd iterations on all of them. ``refine_iter`` full-space
    Lloyd iterations follow (exact nearest centre in float64, float64 means):
    the returned centres are the means of their members in the full space and
    every profile's label is its nearest such centre after the last assignment.
    ``variance=None`` and ``init_rows=None`` give plain full-space k-means.

    Parameters
    ----------
    n_profiles
        Number of RPs (60 as in Sainz Dalda et al. 2019).
    random_state
        Seed of the k-means++ initialisation and of the row subsets.
    n_init, max_iter, tol
        Passed to :class:`sklearn.cluster.KMeans` (``max_iter``: Lloyd
        iterations on all profiles in the reduced space).
    variance
        Fraction of the variance kept by the projection (``None``: no projection).
    init_rows
        Profiles (a random subset) clustered first, to start the full Lloyd
        iterations from (``None``: k-means++ on all profiles).
    refine_iter
        Full-space Lloyd iterations after the reduced-space k-means (stops
        early when no label changes).
    max_pca_rows
        Profiles (a random subset) used to estimate the principal directions.

    Attributes
    ----------
    profiles_ : xarray.DataArray
        (rp, wavelength) cluster centres, in the raster's units.
    spread_ : xarray.DataArray
        (rp, wavelength) standard deviation of the member profiles.
    counts_ : numpy.ndarray
        Members per RP (fully valid profiles).
    labels_ : xarray.DataArray
        (y, x) RP index of every pixel of the fitted raster (−1: masked).
    inertia_ : float
        Σ ‖x − centre‖² over the fully valid profiles (full space, float64).
    n_iter_ : int
        Lloyd iterations run on all profiles in the reduced space.
    n_refine_ : int
        Full-space Lloyd iterations run.
    n_dims_ : int
        Dimensions of the reduced space (n_λ without projection).

    Example
    -------
    >>> rp = RepresentativeProfiles(n_profiles=4).fit(raster)  # doctest: +SKIP
    >>> rp.predict(raster).max() < 4                           # doctest: +SKIP
    """

    def __init__(self, n_profiles: int = 60, random_state: int = 0, n_init: int = 1,
                 max_iter: int = 30, tol: float = 1e-4, variance: float | None = 0.999,
                 init_rows: int | None = 40000, refine_iter: int = 0,
                 max_pca_rows: int = 20000) -> None:
        self.n_profiles = n_profiles
        self.random_state = random_state
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.variance = variance
        self.init_rows = init_rows
        self.refine_iter = refine_iter
        self.max_pca_rows = max_pca_rows

    def fit(self, raster: xr.DataArray) -> RepresentativeProfiles:
        """Cluster the fully valid profiles of ``raster``; masked pixels get label −1."""
        from sklearn.cluster import KMeans

        flat, dims, shape = _flat(raster)
        good = np.isfinite(flat).all(1)
        k = int(self.n_profiles)
        if good.sum() < k:
            raise ValueError(f"{int(good.sum())} unmasked profiles cannot make "
                             f"{k} representative profiles")
        data = flat if good.all() else flat[good]
        seed = int(self.random_state)
        if self.variance is None or self.variance >= 1.0:
            reduced = data
        else:
            mean, basis = _pca_basis(data, float(self.variance), int(self.max_pca_rows), seed)
            reduced = ((torch.as_tensor(data) - torch.as_tensor(mean, dtype=torch.float32))
                       @ torch.as_tensor(basis, dtype=torch.float32)).numpy()
        init: Any = "k-means++"
        n_init = self.n_init
        if self.init_rows is not None and len(reduced) > 2 * int(self.init_rows):
            rows = np.random.default_rng(seed).choice(len(reduced), int(self.init_rows),
                                                      replace=False)
            init = KMeans(n_clusters=k, init="k-means++", n_init=self.n_init, max_iter=100,
                          tol=self.tol, random_state=seed, algorithm="lloyd"
                          ).fit(reduced[np.sort(rows)]).cluster_centers_
            n_init = 1
        km = KMeans(n_clusters=k, init=init, n_init=n_init, max_iter=self.max_iter,
                    tol=self.tol, random_state=seed, algorithm="lloyd").fit(reduced)
        labels = km.labels_.astype(np.int64)
        self.n_dims_ = int(reduced.shape[1])
        self.n_iter_ = int(km.n_iter_)
        del reduced
        counts, centres, sq = _moments(data, labels, k)
        self.n_refine_ = 0
        for _ in range(int(self.refine_iter)):
            new = _nearest(data, centres)
            self.n_refine_ += 1
            if np.array_equal(new, labels):
                break
            labels = new
            counts, moved, sq = _moments(data, labels, k)
            # an emptied cluster keeps its previous centre
            centres = np.where(counts[:, None] > 0, moved, centres)
        self.inertia_ = float(sq.sum())
        wl = raster["wavelength"].values
        units = raster.attrs.get("units", "")
        coords = {"rp": np.arange(k), "wavelength": wl}
        self.profiles_ = xr.DataArray(centres.astype(np.float32), dims=("rp", "wavelength"),
                                      coords=coords, attrs={"units": units},
                                      name="representative_profile")
        spread = np.sqrt(sq / np.maximum(counts, 1)[:, None])
        self.spread_ = xr.DataArray(spread.astype(np.float32), dims=("rp", "wavelength"),
                                    coords=coords, attrs={"units": units}, name="rp_spread")
        self.counts_ = counts
        # the fully valid pixels keep the partition the centres are the means of;
        # the partly masked ones get their nearest centre
        labels_all = self._labels(flat, skip=good)
        labels_all[good] = labels
        self.labels_ = xr.DataArray(labels_all.reshape(shape), dims=dims,
                                    coords={k: v for k, v in raster.coords.items()
                                            if "wavelength" not in v.dims},
                                    name="rp_index", attrs={
                                        "long_name": "representative profile index (-1: masked)"})
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "profiles_"):
            raise ValueError("RepresentativeProfiles is not fitted: call fit(raster) first")

    def predict(self, raster: xr.DataArray) -> xr.DataArray:
        """RP index of every pixel: nearest centre (Euclidean, float64) over the valid samples.

        Pixels with more than half of their samples masked get −1; ties go to the
        lowest index.
        """
        self._check_fitted()
        flat, dims, shape = _flat(raster)
        wl = np.asarray(raster["wavelength"].values, dtype=float)
        if wl.shape != self.profiles_["wavelength"].shape or \
                not np.allclose(wl, self.profiles_["wavelength"].values, atol=1e-6):
            raise ValueError("raster wavelengths differ from those the RPs were fitted on")
        labels = self._labels(flat)
        coords = {k: v for k, v in raster.coords.items() if "wavelength" not in v.dims}
        return xr.DataArray(labels.reshape(shape), dims=dims, coords=coords, name="rp_index",
                            attrs={"long_name": "representative profile index (-1: masked)"})

    def _labels(self, flat: np.ndarray, skip: np.ndarray | None = None) -> np.ndarray:
        """Nearest-centre labels of (n, n_λ) rows (−1: masked; ``skip`` rows left at −1)."""
        from iris_lab.methods.search import brute_force_nearest

        valid = np.isfinite(flat)
        labels = np.full(len(flat), -1, dtype=np.int64)
        complete = valid.all(1)
        partial = ~complete & (valid.mean(1) >= 1.0 - _MASKED_FRACTION)
        if skip is not None:
            complete &= ~skip
            partial &= ~skip
        centres = self.profiles_.values.astype(np.float64)
        if complete.any():
            labels[complete] = _nearest(flat if complete.all() else flat[complete], centres)
        if partial.any():
            obs = np.where(valid[partial], flat[partial], 0.0).astype(np.float64)
            labels[partial] = brute_force_nearest(obs, centres, valid[partial].astype(float),
                                                  chunk_size=4096)[0]
        return labels

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
