"""IRIS² look-up inversion of Mg II h&k rasters (Sainz Dalda et al. 2019).

A database holds synthetic IRIS profiles (``profile(entry, wavelength)``), the
model atmospheres that produced them on a 39-point log τ500 grid and their
uncertainties σ (eq. 2 of the paper, from response functions). For every pixel
of a raster :meth:`IRIS2.predict` finds the database profile of smallest
weighted χ² — an exact search, the same entry a brute-force scan finds (see
:mod:`iris_lab.methods.search`) — and returns its model, σ, the χ² map, the
database index and quality flags in the shared result layout.

χ² of a pixel with observed intensity ``o`` and database profile ``d`` on the
database grid, with window weights ``w`` and the pixel's valid samples ``m``::

    chi2 = Σ w m (o - d)² / Σ w m o²

(dimensionless: the fraction of the weighted profile power the match leaves
unexplained). The normalisation is per pixel, so it never changes which entry
wins.

Quality bits (``quality`` variable): 1 ``masked`` (more than half of the
weighted samples missing: no result), 2 ``low_signal`` (peak intensity below
``min_signal``), 4 ``high_chi2`` (χ² above ``chi2_threshold``), 8
``partly_masked`` (some samples missing; matched on the rest).

Example
-------
>>> from iris_lab.methods.iris2 import IRIS2, toy_database
>>> db = toy_database(300, seed=0)
>>> model = IRIS2().fit(db)
>>> raster = model.profiles(np.arange(6).reshape(2, 3))
>>> result = model.predict(raster)
>>> result["index"].values.tolist()
[[0, 1, 2], [3, 4, 5]]
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from iris_lab.methods.result import result_dataset
from iris_lab.methods.search import NearestProfileSearch, brute_force_nearest

#: log10 τ500 grid of the database models.
LOG_TAU = np.round(np.linspace(-7.0, 0.6, 39), 2)
INTENSITY_UNITS = "erg / (s cm2 sr Angstrom)"
SHIPPED_DATABASE = Path(__file__).resolve().parent.parent / "data" / "mgii_database.nc"
#: Model variables returned per pixel, their σ variable and units (value, σ).
MODEL_VARIABLES: dict[str, tuple[str, str, str]] = {
    "temperature": ("sigma_temperature", "K", "K"),
    "v_los": ("sigma_v_los", "cm / s", "cm / s"),
    "v_turb": ("sigma_v_turb", "cm / s", "cm / s"),
    "n_e": ("sigma_log_n_e", "1 / cm3", "dex"),
}
FLAG_MEANINGS: tuple[str, ...] = ("masked", "low_signal", "high_chi2", "partly_masked")
FLAG_MASKS: tuple[int, ...] = (1, 2, 4, 8)
_MASKED_FRACTION = 0.5
#: Mask patterns shared by fewer pixels than this are matched by brute force (cheaper than
#: building a pruned search for a new weight pattern).
_MIN_GROUP = 1024


def mgii_wavelengths() -> np.ndarray:
    """The 473-point IRIS Mg II h&k grid (vacuum Å) of the database.

    Uses :func:`iris_lab.instrument.iris_mgii_wavelengths` when available,
    otherwise the documented grid ``2794.0 + 0.02546 i``.

    Example
    -------
    >>> mgii_wavelengths().shape
    (473,)
    """
    try:
        from iris_lab.instrument import iris_mgii_wavelengths
    except ImportError:
        return 2794.0 + 0.02546 * np.arange(473)
    return np.asarray(iris_mgii_wavelengths(), dtype=np.float64)


def _planck_aa(wavelength_aa: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """B_λ [erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹]."""
    lam = wavelength_aa * 1e-8
    x = 1.4387769 / (lam * temperature)
    return 1.191042972e-5 / lam**5 / np.expm1(np.minimum(x, 700.0)) * 1e-8


def toy_database(n_entries: int, *, seed: int = 0, wavelength: np.ndarray | None = None,
                 mu: float = 1.0) -> xr.Dataset:
    """A small database in the Mg II schema with analytic (not NLTE) profiles.

    For tests, benchmarks and notebooks when the NLTE database is not at hand:
    each entry is a smooth model (a photosphere plus a chromospheric temperature
    rise of random height and amplitude, constant v_los and v_turb above the
    photosphere, n_e following T) and an emission profile whose k2/h2 peak
    intensity is the Planck function at the chromospheric temperature, the peak
    separation grows with v_turb, the whole core is Doppler shifted by v_los
    and the k3/h3 depth follows the upper-chromosphere temperature. σ follows
    the sensitivity of that toy profile: small where −5 < log τ < −1 and large
    outside. Not physics: the profiles are a deterministic function of the
    model so that look-up and UMF machinery can be checked.

    Example
    -------
    >>> db = toy_database(10, seed=1)
    >>> db["profile"].shape
    (10, 473)
    """
    rng = np.random.default_rng(seed)
    wl = mgii_wavelengths() if wavelength is None else np.asarray(wavelength, dtype=float)
    lt = LOG_TAU
    n = int(n_entries)
    t_chrom = rng.uniform(5500.0, 8500.0, n)
    t_top = t_chrom * rng.uniform(0.8, 1.4, n)
    z0 = rng.uniform(-4.5, -3.0, n)
    v_los = rng.normal(0.0, 3e5, n)
    v_turb = rng.uniform(2e5, 9e5, n)
    t_phot = 4400.0 + 2000.0 * 10 ** (0.6 * np.clip(lt, -7, 0.6))[None] * 0.5
    rise = 1.0 / (1.0 + np.exp((lt[None] - z0[:, None]) / 0.35))
    upper = np.clip((-lt[None] - 5.0) / 2.0, 0.0, 1.0)
    temperature = t_phot + rise * (t_chrom[:, None] - 4400.0) + upper * (t_top - t_chrom)[:, None]
    above = 1.0 / (1.0 + np.exp((lt[None] + 2.0) / 0.3))
    vlos = above * v_los[:, None]
    vturb = 1e5 + above * v_turb[:, None]
    n_e = 10 ** (11.0 + 0.3 * lt[None] * 0 + 2.5 * (temperature / 1e4)) * 10 ** (0.35 * lt[None])
    p_gas = 1e5 * 10 ** (0.8 * lt[None]) * np.ones((n, 1))
    rho = p_gas / (1.38e-16 * temperature) * 2.2e-24
    c = 2.99792458e10
    shift = v_los / c
    peak_sep = 0.06 + 0.4 * v_turb / 1e6
    prof = np.tile(_planck_aa(wl, 4600.0)[None] * 0.05, (n, 1))
    for centre, scale in ((2796.352, 1.0), (2803.531, 0.78)):
        c0 = centre * (1.0 + shift)[:, None]
        dl = wl[None] - c0
        k2 = scale * _planck_aa(centre, t_chrom)[:, None] * 0.02
        k3 = 1.0 - 0.8 * np.clip(4400.0 / t_top, 0.3, 1.0)[:, None]
        width = 0.08 + 0.1 * v_turb[:, None] / 1e6
        peaks = np.exp(-0.5 * ((np.abs(dl) - peak_sep[:, None] / 2) / width) ** 2)
        core = np.exp(-0.5 * (dl / (0.6 * width)) ** 2)
        wing = _planck_aa(centre, 4800.0) * 0.04 * (1 - np.exp(-(dl / 1.2) ** 2))
        prof = prof + k2 * peaks * (1 - (1 - k3) * core) + scale * wing
    sens = np.exp(-0.5 * ((lt + 3.0) / 1.6) ** 2)[None]
    sig_t = temperature * (0.03 + 0.3 * (1 - sens))
    sig_v = 0.5e5 + 4e5 * (1 - sens) * np.ones((n, 1))
    sig_ne = 0.05 + 0.6 * (1 - sens) * np.ones((n, 1))
    f32 = np.float32
    model_dims = ("entry", "log_tau")
    return xr.Dataset(
        {
            "profile": (("entry", "wavelength"), prof.astype(f32),
                        {"units": INTENSITY_UNITS, "mu": mu}),
            "temperature": (model_dims, temperature.astype(f32), {"units": "K"}),
            "v_los": (model_dims, vlos.astype(f32), {"units": "cm / s"}),
            "v_turb": (model_dims, vturb.astype(f32), {"units": "cm / s"}),
            "n_e": (model_dims, n_e.astype(f32), {"units": "1 / cm3"}),
            "p_gas": (model_dims, p_gas.astype(f32), {"units": "dyn / cm2"}),
            "rho": (model_dims, rho.astype(f32), {"units": "g / cm3"}),
            "sigma_temperature": (model_dims, sig_t.astype(f32), {"units": "K"}),
            "sigma_v_los": (model_dims, sig_v.astype(f32), {"units": "cm / s"}),
            "sigma_v_turb": (model_dims, sig_v.astype(f32), {"units": "cm / s"}),
            "sigma_log_n_e": (model_dims, sig_ne.astype(f32), {"units": "dex"}),
            "rf_exact": ("entry", np.ones(n, dtype=bool)),
            "family": ("entry", np.array(["toy"] * n)),
            "converged": ("entry", np.ones(n, dtype=bool)),
        },
        coords={"wavelength": ("wavelength", wl, {"units": "Angstrom", "medium": "vacuum"}),
                "log_tau": ("log_tau", lt, {"long_name": "log10 optical depth at 500 nm"})},
        attrs={"mu": mu, "provenance": f"iris_lab.methods.iris2.toy_database(n={n}, seed={seed})"},
    )


def synthetic_raster(truth: xr.Dataset, shape: tuple[int, int] = (30, 40), *, seed: int = 0,
                     exptime: float | None = 8.0) -> tuple[xr.DataArray, xr.Dataset,
                                                          dict[str, np.ndarray]]:
    """A spatially coherent raster from a set of (held-out) database-schema entries.

    Entries are ranked by their peak intensity and laid out along a smooth random
    field, so bright and dark regions form patches; with ``exptime`` the
    profiles get IRIS photon + read noise of that exposure
    (:func:`iris_lab.instrument.iris_add_noise`).

    Returns
    -------
    raster, models, regions
        ``(y, x, wavelength)`` intensity; the true models (y, x, log_tau) with the
        entry index in ``entry``; boolean (y, x) masks ``bright`` (top quartile of
        the field), ``dark`` (bottom quartile) and ``intermediate``.

    Example
    -------
    >>> raster, models, regions = synthetic_raster(toy_database(200, seed=9), (8, 10))
    >>> raster.dims, sorted(regions)
    (('y', 'x', 'wavelength'), ['bright', 'dark', 'intermediate'])
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    ny, nx = shape
    field = gaussian_filter(rng.standard_normal((ny, nx)), sigma=max(1.0, min(ny, nx) / 6.0),
                            mode="wrap")
    rank = np.argsort(np.argsort(field.ravel()))
    n = truth.sizes["entry"]
    order = np.argsort(truth["profile"].values.max(1))
    jitter = rng.integers(-max(1, n // 50), max(1, n // 50) + 1, rank.size)
    pos = np.clip((rank * (n - 1)) // max(1, rank.size - 1) + jitter, 0, n - 1)
    entry = order[pos].reshape(ny, nx)
    prof = truth["profile"].values[entry].astype(np.float64)
    wl = truth["wavelength"].values
    if exptime:
        from iris_lab.instrument import iris_add_noise, iris_dn_to_intensity, iris_intensity_to_dn

        dn = iris_intensity_to_dn(prof, exptime, wavelength=wl)
        prof = iris_dn_to_intensity(iris_add_noise(dn, rng) / exptime, wavelength=wl)
    raster = xr.DataArray(prof.astype(np.float32), dims=("y", "x", "wavelength"),
                          coords={"wavelength": truth["wavelength"]},
                          attrs={"units": INTENSITY_UNITS, "exptime": exptime or 0.0})
    models = truth[[v for v in (*MODEL_VARIABLES, "p_gas", "rho") if v in truth]].isel(
        entry=xr.DataArray(entry, dims=("y", "x")))
    models = models.assign_coords(entry=(("y", "x"), entry))
    q = np.quantile(field, [0.25, 0.75])
    regions = {"bright": field >= q[1], "dark": field <= q[0],
               "intermediate": (field > q[0]) & (field < q[1])}
    return raster, models, regions


def check_schema(db: xr.Dataset, variables: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``db`` has ``variables`` and the database dimensions."""
    missing = [v for v in variables if v not in db]
    if missing:
        raise ValueError(f"database lacks variables {missing} (Mg II database schema)")
    for dim in ("entry", "wavelength", "log_tau"):
        if dim not in db.dims:
            raise ValueError(f"database lacks dimension {dim!r}")


def load_database(database: xr.Dataset | str | os.PathLike | None = None) -> xr.Dataset:
    """Open and check a Mg II database (default: the shipped one).

    Raises
    ------
    ValueError
        missing file, variable or dimension, or non-finite profiles.

    Example
    -------
    >>> load_database(toy_database(5)).sizes["entry"]
    5
    """
    if database is None:
        database = SHIPPED_DATABASE
    if isinstance(database, xr.Dataset):
        db = database
    else:
        path = Path(database)
        if not path.exists():
            raise ValueError(f"database file {path} does not exist")
        try:
            db = xr.load_dataset(path, engine="h5netcdf")
        except (OSError, ValueError) as err:
            raise ValueError(f"database file {path} is not readable netCDF ({err})") from None
    need = ["profile", *MODEL_VARIABLES, *(s for s, _, _ in MODEL_VARIABLES.values())]
    check_schema(db, need)
    if db.sizes["entry"] < 1:
        raise ValueError("database has no entries")
    if not np.isfinite(db["profile"].values).all():
        raise ValueError("database profiles contain non-finite values")
    return db


def window_weights(wavelength: np.ndarray,
                   windows: Sequence[tuple[float, float, float]] | None,
                   base: float = 1.0) -> np.ndarray:
    """Per-sample χ² weights from ``(λ_min, λ_max, weight)`` windows (IRIS²'s ``weights_windows``).

    Samples outside every window get ``base``; later windows override earlier ones.

    Example
    -------
    >>> window_weights(np.array([1.0, 2.0, 3.0]), [(1.5, 2.5, 4.0)]).tolist()
    [1.0, 4.0, 1.0]
    """
    wl = np.asarray(wavelength, dtype=float)
    w = np.full(wl.shape, float(base))
    for lo, hi, weight in windows or ():
        if weight < 0:
            raise ValueError(f"window weight {weight} is negative")
        w[(wl >= lo) & (wl <= hi)] = float(weight)
    return w


def raster_on_grid(raster: xr.DataArray, wavelength: np.ndarray) -> np.ndarray:
    """A raster's intensity [erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹] on ``wavelength``, NaN where masked.

    DN/s rasters are converted with :func:`iris_lab.instrument.iris_dn_to_intensity`;
    other grids are interpolated linearly (a NaN neighbour gives NaN); samples
    outside the raster's range are NaN.

    Example
    -------
    >>> r = xr.DataArray(np.ones((1, 1, 3)), dims=("y", "x", "wavelength"),
    ...                  coords={"wavelength": [1.0, 2.0, 3.0]}, attrs={"units": INTENSITY_UNITS})
    >>> raster_on_grid(r, np.array([1.5, 4.0])).tolist()
    [[[1.0, nan]]]
    """
    units = str(raster.attrs.get("units", "")).strip()
    data = np.asarray(raster.values)
    if data.dtype not in (np.float32, np.float64):
        data = data.astype(np.float64)
    wl = np.asarray(raster["wavelength"].values, dtype=np.float64)
    if units == "DN/s":
        from iris_lab.instrument import iris_dn_to_intensity

        data = iris_dn_to_intensity(data, wavelength=wl)
    elif units.replace(" ", "") != INTENSITY_UNITS.replace(" ", ""):
        raise ValueError(f"raster units {units!r} not understood: expected 'DN/s' or "
                         f"{INTENSITY_UNITS!r} in attrs['units']")
    if "mask" in raster.coords:
        data = np.where(np.asarray(raster["mask"].values, dtype=bool), np.nan, data)
    target = np.asarray(wavelength, dtype=np.float64)
    if wl.shape == target.shape and np.allclose(wl, target, atol=1e-4):
        return data
    if wl.size < 2 or np.any(np.diff(wl) <= 0):
        raise ValueError("raster wavelengths must increase monotonically")
    inside = (target >= wl[0] - 1e-6) & (target <= wl[-1] + 1e-6)
    if inside.mean() < 0.5:
        raise ValueError(f"raster covers {wl[0]:.2f}-{wl[-1]:.2f} Å: less than half of the "
                         f"Mg II h&k grid {target[0]:.2f}-{target[-1]:.2f} Å")
    hi = np.clip(np.searchsorted(wl, target), 1, wl.size - 1)
    lo = hi - 1
    f = (target - wl[lo]) / (wl[hi] - wl[lo])
    out = data[..., lo] * (1 - f) + data[..., hi] * f
    out[..., ~inside] = np.nan
    return out


def _lookup_block(model: IRIS2, profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact best index and χ² for (n, n_λ) profiles with NaN at masked samples."""
    database, weights = model._profiles, model.weights_
    profiles = np.asarray(profiles)
    if profiles.dtype not in (np.float32, np.float64):
        profiles = profiles.astype(np.float64)
    n = len(profiles)
    index = np.full(n, -1, dtype=np.int64)
    chi2 = np.full(n, np.nan, dtype=np.float64)
    valid = np.isfinite(profiles)
    complete = valid.all(1)
    frac = np.zeros(n)
    if not complete.all():
        frac[~complete] = 1.0 - (valid[~complete] @ weights) / weights.sum()
    usable = frac <= _MASKED_FRACTION
    if not usable.any():
        return index, chi2
    # group pixels by mask pattern: each pattern is an exact weighted search
    rows = np.flatnonzero(usable)
    if complete[rows].all():
        n_patterns, inverse = 1, np.zeros(len(rows), dtype=np.int64)
        obs_all = profiles
    else:
        _, inverse = np.unique(np.packbits(valid[rows], axis=1), axis=0, return_inverse=True)
        inverse = inverse.ravel()
        n_patterns = int(inverse.max()) + 1
        obs_all = np.where(valid, profiles, 0.0)
    dist = np.full(n, np.nan, dtype=np.float64)
    small: list[np.ndarray] = []
    for g in range(n_patterns):
        members = rows if n_patterns == 1 else rows[inverse == g]
        if len(members) < _MIN_GROUP and n_patterns > 1:
            small.append(members)
            continue
        obs = obs_all if len(members) == n else obs_all[members]
        index[members], dist[members] = model._search(weights * valid[members[0]]).query(obs)
    if small:
        members = np.concatenate(small)
        index[members], dist[members] = brute_force_nearest(
            obs_all[members], database, weights[None] * valid[members])
    # χ² = the search's weighted distance Σ w m (o - d)² (float64, explicit
    # differences, whatever path found the entry) over the weighted profile power
    # Σ w m o² (masked samples are zero in obs_all)
    import torch

    sel = index >= 0
    power = (torch.as_tensor(obs_all, dtype=torch.float64).square()  # not in place: may share
             @ torch.as_tensor(weights)).numpy()                     # the caller's memory
    chi2[sel] = dist[sel] / np.maximum(power[sel], 1e-300)
    return index, chi2


class IRIS2:
    """Look-up inversion of Mg II h&k profiles against a synthetic database.

    Parameters
    ----------
    weights_windows
        ``(λ_min, λ_max, weight)`` windows of the χ² (vacuum Å); samples outside
        every window weigh ``base_weight``. Default: uniform weights.
    base_weight
        Weight of samples outside the windows.
    chi2_threshold
        χ² above which a pixel is flagged ``high_chi2`` (default 0.05: the match
        leaves 5% of the weighted profile power unexplained).
    min_signal
        Peak intensity [erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹] below which a pixel is flagged
        ``low_signal``; default: a quarter of the dimmest database peak.
    n_components
        Projection basis of the exact search (default: automatic).
    chunk_size
        Pixels per block of the search (blocks run in ``torch.get_num_threads()``
        threads; memory ≈ chunk_size × n_λ × 40 bytes per thread).
    device
        torch device of the exact distances of the search (its tree runs on the CPU).

    Attributes
    ----------
    database_ : xarray.Dataset
    wavelength_, log_tau_ : numpy.ndarray
    weights_ : numpy.ndarray
        Per-sample χ² weights on ``wavelength_``.
    min_signal_ : float

    Example
    -------
    >>> model = IRIS2(weights_windows=[(2796.0, 2796.7, 2.0)]).fit(toy_database(50))
    >>> float(model.weights_.max())
    2.0
    """

    def __init__(self, weights_windows: Sequence[tuple[float, float, float]] | None = None,
                 base_weight: float = 1.0, chi2_threshold: float = 0.05,
                 min_signal: float | None = None, n_components: int | None = None,
                 chunk_size: int = 2048, device: str = "cpu") -> None:
        self.weights_windows = weights_windows
        self.base_weight = base_weight
        self.chi2_threshold = chi2_threshold
        self.min_signal = min_signal
        self.n_components = n_components
        self.chunk_size = chunk_size
        self.device = device

    # ------------------------------------------------------------------ fit
    def fit(self, database: xr.Dataset | str | os.PathLike | None = None) -> IRIS2:
        """Load and check the database (default: the shipped one) and set the weights."""
        db = load_database(database)
        self.database_ = db
        self.wavelength_ = np.asarray(db["wavelength"].values, dtype=np.float64)
        self.log_tau_ = np.asarray(db["log_tau"].values, dtype=np.float64)
        self.weights_ = window_weights(self.wavelength_, self.weights_windows, self.base_weight)
        if not (self.weights_ > 0).any():
            raise ValueError("every χ² weight is zero")
        self._profiles = np.asarray(db["profile"].values, dtype=np.float64)
        peak = self._profiles.max(1)
        self.min_signal_ = (0.25 * float(peak.min()) if self.min_signal is None
                            else float(self.min_signal))
        self.mu_ = float(db["profile"].attrs.get("mu", db.attrs.get("mu", np.nan)))
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "database_"):
            raise ValueError("IRIS2 is not fitted: call fit(database) first")

    # -------------------------------------------------------------- helpers
    def profiles(self, index: np.ndarray) -> xr.DataArray:
        """Database profiles for an array of indices (−1 → NaN), dims ``(*index.dims, wavelength)``.

        Example
        -------
        >>> IRIS2().fit(toy_database(4)).profiles(np.array([0, -1])).shape
        (2, 473)
        """
        self._check_fitted()
        idx = np.asarray(index)
        out = self._profiles[np.clip(idx, 0, None)].astype(np.float32)
        out[idx < 0] = np.nan
        dims = ("y", "x")[: idx.ndim] if idx.ndim <= 2 else tuple(f"d{i}" for i in range(idx.ndim))
        return xr.DataArray(out, dims=(*dims, "wavelength"),
                            coords={"wavelength": self.wavelength_},
                            attrs={"units": INTENSITY_UNITS})

    def lookup(self, intensity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact best index and χ² for (n, n_λ) intensities on the database grid (NaN = masked)."""
        self._check_fitted()
        return _lookup_block(self, np.asarray(intensity, dtype=np.float64))

    def _search(self, weights: np.ndarray) -> NearestProfileSearch:
        """The exact search for one weight vector (cached per weight pattern)."""
        key = np.asarray(weights, dtype=np.float64).tobytes()
        cache = self.__dict__.setdefault("_searches", {})
        if key not in cache:
            if len(cache) > 16:
                cache.clear()
            cache[key] = NearestProfileSearch(self._profiles, weights,
                                              n_components=self.n_components,
                                              block_size=self.chunk_size, device=self.device)
        return cache[key]

    # -------------------------------------------------------------- predict
    def predict(self, raster: xr.DataArray, *, client: Any = None, n_chunks: int | None = None,
                progress: bool = False) -> xr.Dataset:
        """Model atmosphere, σ, χ², index and quality for every pixel of a raster.

        Parameters
        ----------
        raster
            ``(y, x, wavelength)`` or ``(y, time, wavelength)`` DataArray in
            ``erg / (s cm2 sr Angstrom)`` or DN/s, vacuum Å, NaN (or a ``mask``
            coordinate) at missing samples. Other grids are interpolated onto
            the database grid.
        client
            ``None`` (run here), a ``dask.distributed.Client``, a scheduler
            address, or ``"local"`` (a LocalCluster of this machine). The
            pixels are split in chunks and looked up on the workers; the
            result is identical to the local one.
        n_chunks
            Number of pixel chunks (default: one per 20,000 pixels).
        progress
            Show a tqdm progress bar over the chunks.

        Returns
        -------
        xarray.Dataset
            ``temperature``, ``v_los``, ``v_turb``, ``n_e`` and ``sigma_*``
            (y, x, log_tau); ``chi2``, ``index`` (−1: none), ``quality`` (y, x);
            attrs ``method="iris2_lookup"``.
        """
        self._check_fitted()
        if not isinstance(raster, xr.DataArray) or "wavelength" not in raster.dims \
                or raster.ndim != 3:
            raise ValueError("raster must be an xarray.DataArray with dims "
                             "(y, x|time, wavelength)")
        raster = raster.transpose(..., "wavelength")
        intensity = raster_on_grid(raster, self.wavelength_)
        shape2 = intensity.shape[:2]
        flat = intensity.reshape(-1, intensity.shape[-1])
        index, chi2 = self._run_chunks(flat, client, n_chunks, progress)
        return self._result(raster, flat, index, chi2, shape2, method="iris2_lookup")

    def _run_chunks(self, flat: np.ndarray, client: Any, n_chunks: int | None,
                    progress: bool) -> tuple[np.ndarray, np.ndarray]:
        n = len(flat)
        n_chunks = max(1, int(n_chunks) if n_chunks else -(-n // 20000))
        bounds = np.linspace(0, n, n_chunks + 1).astype(int)
        pieces = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        if client is None:
            from tqdm.auto import tqdm

            results = [_lookup_block(self, p)
                       for p in tqdm(pieces, disable=not progress, desc="IRIS2 look-up",
                                     unit="chunk")]
        else:
            results = _dask_map(pieces, self, client, progress)
        index = np.concatenate([r[0] for r in results]) if results else np.empty(0, np.int64)
        chi2 = np.concatenate([r[1] for r in results]) if results else np.empty(0)
        return index, chi2

    def _result(self, raster: xr.DataArray, flat: np.ndarray, index: np.ndarray,
                chi2: np.ndarray, shape2: tuple[int, int], method: str) -> xr.Dataset:
        db = self.database_
        valid = np.isfinite(flat)
        complete = valid.all(1)
        frac = np.zeros(len(flat))
        if not complete.all():
            frac[~complete] = 1.0 - (valid[~complete] @ self.weights_) / self.weights_.sum()
        del valid
        quality = np.zeros(len(flat), dtype=np.uint8)
        quality[frac > _MASKED_FRACTION] |= 1
        quality[(frac > 0) & (frac <= _MASKED_FRACTION)] |= 8
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            peak = np.nan_to_num(np.fmax.reduce(flat, axis=1), nan=-np.inf)
        quality[(peak < self.min_signal_) & ~(quality & 1).astype(bool)] |= 2
        quality[np.nan_to_num(chi2, nan=-1.0) > self.chi2_threshold] |= 4
        spatial = raster.dims[:2]
        dims3 = (*spatial, "log_tau")
        ok = index >= 0
        safe = np.where(ok, index, 0)
        data_vars: dict[str, Any] = {}
        for name, (sig_name, unit, sig_unit) in MODEL_VARIABLES.items():
            for var, u in ((name, unit), (sig_name, sig_unit)):
                vals = np.asarray(db[var].values, dtype=np.float32)[safe]
                vals[~ok] = np.nan
                data_vars[var] = (dims3, vals.reshape(*shape2, -1), {"units": u})
        data_vars["chi2"] = (spatial, chi2.reshape(shape2).astype(np.float32), {
            "units": "", "long_name": "weighted squared residual / weighted squared intensity"})
        data_vars["index"] = (spatial, index.reshape(shape2), {
            "long_name": "database entry index (-1: none)"})
        return result_dataset(data_vars, raster, spatial, quality.reshape(shape2), self.log_tau_,
                              FLAG_MASKS, FLAG_MEANINGS, {
            "method": method, "chi2_threshold": self.chi2_threshold,
            "min_signal": self.min_signal_, "database_entries": int(db.sizes["entry"]),
            "database_mu": self.mu_})

    # ------------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike) -> Path:
        """Write the database and the parameters to one netCDF file.

        Example
        -------
        >>> IRIS2().fit(toy_database(5)).save("iris2.nc")  # doctest: +SKIP
        """
        self._check_fitted()
        ds = self.database_.copy()
        ds.attrs = dict(ds.attrs)
        ds.attrs["iris2_params"] = repr({
            "weights_windows": [tuple(map(float, w)) for w in self.weights_windows or ()],
            "base_weight": float(self.base_weight), "chi2_threshold": float(self.chi2_threshold),
            "min_signal": None if self.min_signal is None else float(self.min_signal),
            "n_components": self.n_components, "chunk_size": int(self.chunk_size)})
        path = Path(path)
        ds.to_netcdf(path, engine="h5netcdf")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> IRIS2:
        """Read a file written by :meth:`save`."""
        import ast

        db = load_database(path)
        if "iris2_params" not in db.attrs:
            raise ValueError(f"{path} is a database, not a saved IRIS2 model "
                             "(use IRIS2().fit(path) instead)")
        params = ast.literal_eval(str(db.attrs["iris2_params"]))
        return cls(**params, device=device).fit(db)

    @classmethod
    def from_sav(cls, path: str | os.PathLike, *, medium: str = "vacuum",
                 mu: float | None = None, **params: Any) -> IRIS2:
        """Fit on an IRIS² database in an IDL SAVE file.

        The file is read by :func:`iris_lab.io.iris2_sav.read_iris2_database`
        (``medium``, ``mu``); ``params`` go to :class:`IRIS2`.

        Example
        -------
        >>> model = IRIS2.from_sav("iris2_db.sav", chi2_threshold=0.1)  # doctest: +SKIP
        """
        from iris_lab.io.iris2_sav import read_iris2_database

        return cls(**params).fit(read_iris2_database(path, medium=medium, mu=mu))


def _dask_map(pieces: list[np.ndarray], model: IRIS2, client: Any, progress: bool) -> list:
    from dask.distributed import Client, LocalCluster, as_completed

    own = None
    if isinstance(client, str):
        if client == "local":
            cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                   dashboard_address=None)
            own = (Client(cluster), cluster)
        else:
            own = (Client(client), None)
        client = own[0]
    try:
        shared = client.scatter(model, broadcast=True)
        futures = [client.submit(_lookup_block, shared, p, pure=False) for p in pieces]
        if progress:
            from tqdm.auto import tqdm

            for _ in tqdm(as_completed(futures), total=len(futures), desc="IRIS2 look-up",
                          unit="chunk"):
                pass
        return client.gather(futures)
    finally:
        if own is not None:
            own[0].close()
            if own[1] is not None:
                own[1].close()


def brute_force_lookup(model: IRIS2, intensity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: the brute-force best index and χ² for (n, n_λ) intensities (NaN = masked).

    Example
    -------
    >>> m = IRIS2().fit(toy_database(20))
    >>> brute_force_lookup(m, m._profiles[:2])[0].tolist()
    [0, 1]
    """
    model._check_fitted()
    q = np.asarray(intensity, dtype=np.float64)
    valid = np.isfinite(q)
    wv = model.weights_[None] * valid
    obs = np.where(valid, q, 0.0)
    idx, dist = brute_force_nearest(obs, model._profiles, wv)
    return idx, dist / np.maximum((obs**2 * wv).sum(1), 1e-300)


def cli_iris2(args: Any) -> int:
    """The ``iris-lab iris2`` command: look up every raster file, skipping bad ones.

    One input writes ``args.out``; several write ``<out stem>_<input stem>.nc``
    next to it. A bad file (unreadable, truncated, no Mg II window, wrong
    wavelength coverage) prints one ``error:`` line on stderr and is skipped; the
    exit status is 1 when any file failed.

    Example
    -------
    ``iris-lab iris2 iris_l2_*_raster_t000_r0000*.fits --out result.nc``
    """
    import sys

    from tqdm.auto import tqdm

    from iris_lab.io.iris import read_iris_raster

    windows = [tuple(map(float, w)) for w in (args.weights_window or [])]
    try:
        model = IRIS2(weights_windows=windows or None, chi2_threshold=args.chi2_threshold,
                      device=args.device).fit(args.database)
    except ValueError as err:
        print(f"iris-lab iris2: error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out)
    paths = [Path(p) for p in args.rasters]
    failed = 0
    client = args.scheduler
    for path in tqdm(paths, desc="rasters", unit="file", disable=len(paths) < 2):
        try:
            if path.suffix == ".nc":
                raster = xr.load_dataarray(path, engine="h5netcdf")
            else:
                raster = read_iris_raster(path)
            if raster.ndim != 3:
                raise ValueError(f"{path}: expected one raster (y, x|time, wavelength), "
                                 f"got dims {raster.dims}")
            if args.rp:
                from iris_lab.methods.rp import (
                    RepresentativeProfiles,
                    invert_representative_profiles,
                )

                rp = RepresentativeProfiles(n_profiles=args.rp).fit(raster)
                result = invert_representative_profiles(model, rp, raster)
            else:
                result = model.predict(raster, client=client, progress=True)
        except (ValueError, OSError) as err:
            msg = str(err) if str(path) in str(err) else f"{path}: {err}"
            print(f"iris-lab iris2: error: {msg}", file=sys.stderr)
            failed += 1
            continue
        target = out if len(paths) == 1 else out.with_name(f"{out.stem}_{path.stem}.nc")
        result.attrs["source"] = str(path)
        for name in list(result.coords):
            if np.issubdtype(result[name].dtype, np.bool_):
                result = result.drop_vars(name)
        result.to_netcdf(target, engine="h5netcdf")
        print(f"{path} -> {target}")
    if failed:
        print(f"iris-lab iris2: {failed} of {len(paths)} file(s) failed", file=sys.stderr)
    return 1 if failed else 0
