"""IRIS² IDL SAVE files: inversion results of ``iris2.pro`` and databases.

The IDL IRIS² code (Sainz Dalda et al. 2019, ApJL 875, L18; SolarSoft
``iris/idl/uio/utils/iris2/``) saves its result for a level-2 raster as
``iris2model_<obs>_raster_tNNN_rNNNNN.sav``: one variable ``iris2model``, a
structure whose tags are (IDL dimension order, i.e. the numpy shape reversed)

========================= ================================================================
``LTAU``                  (n_tau,) log10 τ500 (39 points, −7.6 … 0.0 in the v2.0 database)
``MODEL``                 [X, Y, n_tau, 4] → numpy (4, n_tau, Y, X): T [K], v_los [cm/s],
                          v_turb [cm/s], n_e [cm⁻³] (named in ``PHYSICAL_VARIABLE``)
``UNCERTAINTY``           same shape: σ of each, in the same (linear) units
``CHI2``                  [X, Y] → numpy (Y, X)
``MU``, ``DELTA_MU_DB``   μ of the raster and the μ tolerance of the database entries
``QC_FLAG``, ``HEADER`` … bookkeeping (also ``LEVEL_INFO``, ``INPUT_FILENAME`` …)
========================= ================================================================

X is the raster step (or the exposure of a sit-and-stare) and Y the position
along the slit. A pixel IRIS² did not invert has T = 0 (the whole model zero,
σ NaN, χ² 0); a raster it did not invert at all is saved as ``iris2model = -1``.

:func:`read_iris2_model` turns such a file into the result layout of
:meth:`iris_lab.methods.iris2.IRIS2.predict` — ``temperature``, ``v_los``,
``v_turb``, ``n_e`` and ``sigma_*`` on (y, x, log_tau), ``chi2``, ``index``
(−1: IRIS² does not store the database entry) and ``quality`` — so the widgets
and :mod:`iris_lab.methods.umf` work on it. Failed pixels get NaN and the
``masked`` quality bit, never zeros; σ(n_e) is converted to dex,
``log10(1 + σ/n_e)`` (≈ σ / (n_e ln 10) for small σ), as ``sigma_log_n_e``;
non-finite σ (IRIS² result files hold some ∞) become NaN.

:func:`read_iris2_database` reads a database saved as IDL SAVE — profiles
``[n_λ (+1: μ), n_entries]``, models and uncertainties ``[4, n_tau,
n_entries]``, ``ltau``, the wavelengths and μ, the layout of the SolarSoft
database files (``inv_mu_iris2``, ``mod_iris2``, ``wl_iris2``) — into the schema
of ``iris_lab/data/mgii_database.nc``, so that
``IRIS2().fit(read_iris2_database(path))`` (or ``IRIS2.from_sav(path)``) looks
rasters up in it. Names are matched case-insensitively, at the top level of the
file or inside a structure, with a few aliases (``wl``/``wave``/``wavelength``,
``prof``/``profiles``/``inv_mu``, ``mod``/``model``, ``unc``/``uncertainty`` …).

Every problem is a :class:`IRIS2SaveError` (a ``ValueError``) naming the file:
missing, not an IDL SAVE file, truncated or corrupt, missing fields (the
message lists the fields found), wrong shapes.

Example
-------
>>> from iris_lab.io.iris2_sav import read_iris2_model, read_iris2_database  # doctest: +SKIP
>>> result = read_iris2_model("iris2model_..._raster_t000_r00000.sav")  # doctest: +SKIP
>>> result["temperature"].dims  # doctest: +SKIP
('y', 'x', 'log_tau')
>>> from iris_lab.methods.iris2 import IRIS2  # doctest: +SKIP
>>> model = IRIS2().fit(read_iris2_database("my_iris2_db.sav"))  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

PathType = str | PathLike

#: Our variable names in IRIS²'s order of the last IDL axis of ``MODEL``.
IRIS2_ORDER: tuple[str, ...] = ("temperature", "v_los", "v_turb", "n_e")
#: Field aliases (lower case), first match wins.
MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "model": ("model", "models", "mod", "model_db", "mod_db"),
    "uncertainty": ("uncertainty", "uncertainties", "unc", "uncertainty_db", "unc_db", "sigma",
                    "model_uncertainty"),
    "ltau": ("ltau", "log_tau", "logtau", "ltau500", "ltau_db"),
    "chi2": ("chi2", "chisq", "chi_2", "chi2_map"),
    "names": ("physical_variable", "physical_variables"),
}
DATABASE_FIELDS: dict[str, tuple[str, ...]] = {
    "profile": ("profile", "profiles", "prof", "prof_db", "inv", "inv_db", "inv_mu", "prof_mu",
                "prof_mu_db", "iris2_db", "rp", "rp_db"),
    "wavelength": ("wavelength", "wl", "wave", "wl_db", "wl_iris2", "lambda", "lam"),
    "mu": ("mu", "mu_db", "mus"),
    **{k: MODEL_FIELDS[k] for k in ("model", "uncertainty", "ltau", "names")},
}
_KEYWORDS = {"temperature": ("t", "temp", "temperature"), "v_los": ("v_los", "vlos"),
             "v_turb": ("v_turb", "vturb", "vmic", "v_mic"), "n_e": ("n_e", "ne", "nne")}
_UNITS = {"temperature": "K", "v_los": "cm / s", "v_turb": "cm / s", "n_e": "1 / cm3"}
_SIGMA = {"temperature": ("sigma_temperature", "K"), "v_los": ("sigma_v_los", "cm / s"),
          "v_turb": ("sigma_v_turb", "cm / s"), "n_e": ("sigma_log_n_e", "dex")}


class IRIS2SaveError(ValueError):
    """An IRIS² IDL SAVE file that is missing, unreadable or not in the expected layout."""


# ----------------------------------------------------------------- reading
def _readsav(path: PathType) -> tuple[Path, dict[str, Any]]:
    """All variables of an IDL SAVE file (lower-case names), errors naming the path."""
    path = Path(path)
    if not path.is_file():
        raise IRIS2SaveError(f"{path}: no such file")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:2] != b"SR" or head[2:] not in (b"\x00\x04", b"\x00\x06"):
        raise IRIS2SaveError(f"{path}: not an IDL SAVE file (signature {head!r}, "
                             "expected b'SR\\x00\\x04')")
    from scipy.io import readsav

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            data = readsav(str(path), python_dict=True)
    except Exception as err:  # scipy raises bare Exception, struct.error, ValueError …
        raise IRIS2SaveError(f"{path}: truncated or corrupt IDL SAVE file "
                             f"({type(err).__name__}: {err})") from None
    return path, {str(k).lower(): v for k, v in data.items()}


def _is_struct(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.names is not None


def _struct_fields(value: np.ndarray, record: int | None, path: Path,
                   what: str) -> dict[str, Any]:
    """Tags (lower case) of one element of an IDL structure (array)."""
    flat = value.reshape(-1)
    if flat.size != 1 and record is None:
        raise IRIS2SaveError(f"{path}: {what} holds {flat.size} structures (an IRIS² result "
                             "per raster); choose one with record=")
    k = 0 if record is None else int(record)
    if not -flat.size <= k < flat.size:
        raise IRIS2SaveError(f"{path}: record={record} out of range: {what} holds "
                             f"{flat.size} structure(s)")
    row = flat[k]
    return {str(n).lower(): row[n] for n in flat.dtype.names}


def _gather(variables: dict[str, Any], record: int | None, path: Path) -> dict[str, Any]:
    """Top-level variables plus the tags of any structure variable (top level wins)."""
    out: dict[str, Any] = {}
    for name, value in variables.items():
        if _is_struct(value):
            for tag, v in _struct_fields(value, record, path, name).items():
                out.setdefault(tag, v)
    for name, value in variables.items():
        if not _is_struct(value):
            out[name] = value
    return out


def _pick(fields: dict[str, Any], aliases: Sequence[str]) -> Any:
    for name in aliases:
        if name in fields:
            return fields[name]
    return None


def _missing_error(path: Path, missing: Sequence[str], fields: Mapping[str, Any],
                   table: Mapping[str, tuple[str, ...]]) -> IRIS2SaveError:
    want = "; ".join(f"{m} (any of {', '.join(table[m])})" for m in missing)
    found = ", ".join(f"{k} {_describe(v)}" for k, v in fields.items()) or "none"
    return IRIS2SaveError(f"{path}: missing field(s) {want}. Fields in the file: {found}")


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype.str.lstrip('<>|=')}{list(value.shape)}"
    return type(value).__name__


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin1").strip()
    if isinstance(value, np.ndarray) and value.size == 1:
        return _text(value.reshape(-1)[0])
    return str(value).strip()


def _order(names: Any, n_var: int, path: Path) -> list[int]:
    """Index along the variable axis of T, v_los, v_turb, n_e (from PHYSICAL_VARIABLE)."""
    if names is None:
        return list(range(len(IRIS2_ORDER)))
    labels = [_text(s).lower() for s in np.asarray(names, dtype=object).reshape(-1)]
    keys = [lab.split("[")[0].strip().replace("unc_", "").replace(" ", "_") for lab in labels]
    index = []
    for var in IRIS2_ORDER:
        hits = [i for i, k in enumerate(keys) if k in _KEYWORDS[var]]
        if not hits:
            raise IRIS2SaveError(f"{path}: PHYSICAL_VARIABLE {labels} does not name {var}")
        index.append(hits[0])
    if max(index) >= n_var:
        raise IRIS2SaveError(f"{path}: PHYSICAL_VARIABLE names {len(labels)} variables but "
                             f"MODEL has {n_var}")
    return index


def _float_array(value: Any, name: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise IRIS2SaveError(f"{path}: field {name} is not numeric ({_describe(value)})") from None


def _sigma_log(sigma: np.ndarray, n_e: np.ndarray) -> np.ndarray:
    """σ of log10 n_e [dex] from the linear σ: log10(1 + σ/n_e) (≈ σ / (n_e ln 10) when small)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_e > 0, np.log10(1.0 + sigma / n_e), np.nan)


def _ltau(fields: dict[str, Any], path: Path) -> np.ndarray:
    ltau = _float_array(_pick(fields, MODEL_FIELDS["ltau"]), "ltau", path).reshape(-1)
    if ltau.size < 2 or not np.isfinite(ltau).all():
        raise IRIS2SaveError(f"{path}: ltau must hold at least two finite values, "
                             f"got {ltau.size}")
    # IDL float32 grids such as -6.7999997: round to the 1e-4 dex they were written for
    return np.round(ltau, 4)


# ----------------------------------------------------------------- results
def read_iris2_model(path: PathType, *, record: int | None = None,
                     chi2_threshold: float | None = None, v_los_sign: float = 1.0) -> xr.Dataset:
    """An IRIS² inversion result (``iris2model_*.sav``) in the layout of ``IRIS2.predict``.

    Parameters
    ----------
    path
        IDL SAVE file written by ``iris2.pro`` (variable ``iris2model``), or any
        SAVE file with the fields ``ltau``, ``model``, ``uncertainty`` and
        optionally ``chi2`` (top level or in a structure; any case).
    record
        Which structure when the file holds an array of them (several rasters).
    chi2_threshold
        Set the ``high_chi2`` quality bit where IRIS²'s χ² exceeds it (default:
        none; IRIS²'s χ² is not normalised like :class:`~iris_lab.methods.iris2.IRIS2`'s).
    v_los_sign
        Multiplies v_los (−1 for a file whose positive v_los is a blueshift; this
        package's convention is positive = redshift).

    Returns
    -------
    xarray.Dataset
        ``temperature`` [K], ``v_los``, ``v_turb`` [cm/s], ``n_e`` [cm⁻³] and
        ``sigma_temperature``, ``sigma_v_los``, ``sigma_v_turb``,
        ``sigma_log_n_e`` [dex] on (y, x, log_tau); ``chi2``, ``index`` (−1) and
        ``quality`` (y, x) with the flag bits of :mod:`iris_lab.methods.iris2`
        (1 ``masked``: a pixel IRIS² did not invert, T = 0 in the file);
        attrs ``method="iris2_sav"``, ``source``, ``mu`` and IRIS²'s bookkeeping.

    Raises
    ------
    IRIS2SaveError
        Missing or unreadable file, missing fields (listing the ones present),
        shapes that do not fit, a raster IRIS² did not invert (``iris2model = -1``).

    Example
    -------
    >>> res = read_iris2_model("iris2model_..._raster_t000_r00000.sav")  # doctest: +SKIP
    >>> res["temperature"].sel(log_tau=-4.0, method="nearest").plot()  # doctest: +SKIP
    """
    from iris_lab.methods.iris2 import FLAG_MASKS, FLAG_MEANINGS
    from iris_lab.methods.result import result_dataset

    path, variables = _readsav(path)
    top = variables.get("iris2model")
    if top is not None and not _is_struct(top):
        raise IRIS2SaveError(f"{path}: iris2model = {_text(top)} ({_describe(top)}), not an "
                             "IRIS² result structure: IRIS² did not invert this raster")
    fields = _gather(variables if top is None else {"iris2model": top}, record, path)
    missing = [k for k in ("model", "uncertainty", "ltau")
               if _pick(fields, MODEL_FIELDS[k]) is None]
    if missing:
        raise _missing_error(path, missing, fields, MODEL_FIELDS)
    ltau = _ltau(fields, path)
    model = _float_array(_pick(fields, MODEL_FIELDS["model"]), "model", path)
    sigma = _float_array(_pick(fields, MODEL_FIELDS["uncertainty"]), "uncertainty", path)
    expect = f"IDL [X, Y, {ltau.size} (ltau), 4] = numpy (4, {ltau.size}, Y, X)"
    if model.ndim != 4 or model.shape[1] != ltau.size or model.shape[0] < len(IRIS2_ORDER):
        raise IRIS2SaveError(f"{path}: model has numpy shape {model.shape}; expected {expect}")
    if sigma.shape != model.shape:
        raise IRIS2SaveError(f"{path}: uncertainty has numpy shape {sigma.shape}, model "
                             f"{model.shape}; both should be {expect}")
    ny, nx = model.shape[2:]
    chi2_raw = _pick(fields, MODEL_FIELDS["chi2"])
    if chi2_raw is None:
        chi2 = np.full((ny, nx), np.nan)
    else:
        chi2 = _float_array(chi2_raw, "chi2", path)
        if chi2.shape != (ny, nx):
            raise IRIS2SaveError(f"{path}: chi2 has numpy shape {chi2.shape}; expected "
                                 f"{(ny, nx)} (IDL [X, Y] like the model)")
    order = _order(_pick(fields, MODEL_FIELDS["names"]), model.shape[0], path)
    # numpy (var, tau, y, x) -> (var, y, x, tau)
    model = np.moveaxis(model[order], 1, -1)
    sigma = np.moveaxis(sigma[order], 1, -1)
    # IRIS² marks a pixel it did not invert with T = 0 (and a zero model)
    failed = ~(np.isfinite(model[0]) & (model[0] > 0)).all(-1)
    model[:, failed] = np.nan
    sigma[:, failed] = np.nan
    chi2 = np.where(failed, np.nan, chi2)
    model[1] *= float(v_los_sign)
    sigma[3] = _sigma_log(sigma[3], model[3])
    nonfinite_sigma = int((~np.isfinite(sigma[:, ~failed])).sum())
    sigma[~np.isfinite(sigma)] = np.nan
    quality = np.zeros((ny, nx), dtype=np.uint8)
    quality[failed] |= 1
    if chi2_threshold is not None:
        quality[np.nan_to_num(chi2, nan=-np.inf) > float(chi2_threshold)] |= 4
    dims3 = ("y", "x", "log_tau")
    data_vars: dict[str, Any] = {}
    for k, var in enumerate(IRIS2_ORDER):
        data_vars[var] = (dims3, model[k].astype(np.float32), {"units": _UNITS[var]})
        sig, unit = _SIGMA[var]
        data_vars[sig] = (dims3, sigma[k].astype(np.float32), {"units": unit})
    data_vars["sigma_log_n_e"][2]["long_name"] = "log10(1 + sigma(n_e) / n_e)"
    data_vars["chi2"] = (("y", "x"), chi2.astype(np.float32), {
        "units": "", "long_name": "IRIS2 chi2 (as saved by iris2.pro; NaN: not inverted)"})
    data_vars["index"] = (("y", "x"), np.full((ny, nx), -1, dtype=np.int64), {
        "long_name": "database entry index (-1: none; IRIS2 files do not store it)"})
    attrs: dict[str, Any] = {
        "method": "iris2_sav", "source": str(path), "failed_pixels": int(failed.sum()),
        "sigma_nonfinite_values": nonfinite_sigma, "v_los_sign": float(v_los_sign),
        "chi2_threshold": np.nan if chi2_threshold is None else float(chi2_threshold)}
    for key in ("mu", "delta_mu_db", "qc_flag", "level_info", "pca_components"):
        if key in fields and np.size(fields[key]) == 1:
            try:
                attrs[key] = float(np.asarray(fields[key], dtype=np.float64).reshape(-1)[0])
            except (TypeError, ValueError):
                pass
    for key in ("input_filename", "output_filename", "inv_db_fits", "model_db_fits"):
        if key in fields:
            attrs[key] = _text(fields[key])
    empty = xr.DataArray(np.empty((ny, nx, 0), dtype=np.float32), dims=("y", "x", "wavelength"))
    return result_dataset(data_vars, empty, ("y", "x"), quality, ltau, FLAG_MASKS,
                          FLAG_MEANINGS, attrs)


# ---------------------------------------------------------------- database
def _orient(arr: np.ndarray, name: str, want: tuple[int | None, ...],
            layouts: Sequence[tuple[int, ...]], path: Path, expect: str) -> np.ndarray:
    """Transpose ``arr`` by the first permutation in ``layouts`` whose shape fits ``want``."""
    for perm in layouts:
        if arr.ndim != len(perm):
            continue
        shape = tuple(arr.shape[p] for p in perm)
        if all(w is None or s == w for s, w in zip(shape, want, strict=True)):
            return np.transpose(arr, perm)
    raise IRIS2SaveError(f"{path}: {name} has numpy shape {arr.shape}; expected {expect}")


def read_iris2_database(path: PathType, *, medium: str = "vacuum", mu: float | None = None,
                        delta_mu: float = 0.1, units: str | None = None) -> xr.Dataset:
    """An IRIS² database in an IDL SAVE file, in the schema of the shipped Mg II database.

    Parameters
    ----------
    path
        IDL SAVE file with (top level or in a structure, any case) the profiles
        ``[n_λ, n_entries]`` or ``[n_λ + 1, n_entries]`` with μ in the last row
        (as ``inv_mu_iris2``), the models ``[4, n_tau, n_entries]`` (T, v_los,
        v_turb, n_e, as ``mod_iris2``), their uncertainties (same layout, same
        linear units), ``ltau``, the wavelengths [Å] and optionally μ (a number
        or one per entry). Arrays saved from Python (numpy order) are accepted too.
    medium
        ``"vacuum"`` or ``"air"``: the medium of the file's wavelengths; air
        wavelengths are converted to vacuum (the package's convention).
    mu, delta_mu
        Keep only entries with ``|μ_entry − mu| ≤ delta_mu`` (as IRIS² selects
        the database entries for a raster); default: all entries.
    units
        Intensity units of the profiles (default: ``erg / (s cm2 sr Angstrom)``,
        what :class:`~iris_lab.methods.iris2.IRIS2` compares rasters in).

    Returns
    -------
    xarray.Dataset
        ``profile`` (entry, wavelength); ``temperature``, ``v_los``, ``v_turb``,
        ``n_e`` and ``sigma_temperature``, ``sigma_v_los``, ``sigma_v_turb``,
        ``sigma_log_n_e`` [dex] (entry, log_tau); ``mu`` (entry); coordinates
        ``entry`` (index in the file), ``wavelength`` (vacuum Å), ``log_tau``.
        Entries with T ≤ 0 or non-finite values are dropped with a warning.

    Raises
    ------
    IRIS2SaveError
        Missing or unreadable file, missing fields (listing those present),
        shapes that do not fit, no entry left.

    Example
    -------
    >>> from iris_lab.methods.iris2 import IRIS2  # doctest: +SKIP
    >>> db = read_iris2_database("iris2_db.sav", mu=0.87)  # doctest: +SKIP
    >>> result = IRIS2().fit(db).predict(raster)  # doctest: +SKIP
    """
    from iris_lab.methods.iris2 import INTENSITY_UNITS

    if medium not in ("vacuum", "air"):
        raise ValueError(f"medium must be 'vacuum' or 'air', got {medium!r}")
    path, variables = _readsav(path)
    fields = _gather(variables, None, path)
    need = ("profile", "model", "uncertainty", "ltau", "wavelength")
    missing = [k for k in need if _pick(fields, DATABASE_FIELDS[k]) is None]
    if missing:
        raise _missing_error(path, missing, fields, DATABASE_FIELDS)
    ltau = _ltau(fields, path)
    wl = _float_array(_pick(fields, DATABASE_FIELDS["wavelength"]), "wavelength", path)
    wl = wl.reshape(-1)
    if wl.size < 2 or np.any(np.diff(wl) <= 0) or not np.isfinite(wl).all():
        raise IRIS2SaveError(f"{path}: wavelengths must increase strictly ({wl.size} values)")
    n_wl, n_tau = wl.size, ltau.size
    prof = _float_array(_pick(fields, DATABASE_FIELDS["profile"]), "profile", path)
    if prof.ndim == 1:
        prof = prof[None]
    mu_col = None
    if prof.ndim == 2 and n_wl + 1 in prof.shape and n_wl not in prof.shape:
        prof = _orient(prof, "profile", (None, n_wl + 1), [(0, 1), (1, 0)], path, "")
        prof, mu_col = prof[:, :n_wl], prof[:, n_wl]
    else:
        prof = _orient(prof, "profile", (None, n_wl), [(0, 1), (1, 0)], path,
                       f"IDL [{n_wl} (+1 for mu), n_entries] = numpy (n_entries, {n_wl})")
    n = prof.shape[0]
    expect = f"IDL [4, {n_tau} (ltau), {n}] = numpy ({n}, {n_tau}, 4)"
    raw_model = _float_array(_pick(fields, DATABASE_FIELDS["model"]), "model", path)
    if raw_model.ndim == 2 and n == 1:
        raw_model = raw_model[None]
    model = _orient(raw_model, "model", (n, n_tau, None), [(0, 1, 2), (2, 1, 0)], path, expect)
    raw_sigma = _float_array(_pick(fields, DATABASE_FIELDS["uncertainty"]), "uncertainty", path)
    if raw_sigma.ndim == 2 and n == 1:
        raw_sigma = raw_sigma[None]
    sigma = _orient(raw_sigma, "uncertainty", (n, n_tau, model.shape[2]), [(0, 1, 2), (2, 1, 0)],
                    path, expect)
    order = _order(_pick(fields, DATABASE_FIELDS["names"]), model.shape[2], path)
    if model.shape[2] < len(IRIS2_ORDER):
        raise IRIS2SaveError(f"{path}: model has {model.shape[2]} variables; expected "
                             f"{len(IRIS2_ORDER)} (T, v_los, v_turb, n_e): {expect}")
    model = np.moveaxis(model[:, :, order], -1, 0)          # (var, entry, tau)
    sigma = np.moveaxis(sigma[:, :, order], -1, 0)
    mu_raw = _pick(fields, DATABASE_FIELDS["mu"])
    if mu_raw is not None:
        mu_val = _float_array(mu_raw, "mu", path).reshape(-1)
        if mu_val.size not in (1, n):
            raise IRIS2SaveError(f"{path}: mu has {mu_val.size} values for {n} entries")
        mu_entry = np.broadcast_to(mu_val, (n,)).astype(np.float64)
    elif mu_col is not None:
        mu_entry = mu_col.astype(np.float64)
    else:
        mu_entry = np.full(n, np.nan)
    sigma[3] = _sigma_log(sigma[3], model[3])
    sigma[~np.isfinite(sigma)] = np.nan
    usable = (np.isfinite(prof).all(1) & np.isfinite(model).all((0, 2))
              & (model[0] > 0).all(1))
    in_mu = np.ones(n, dtype=bool) if mu is None else \
        np.abs(mu_entry - float(mu)) <= float(delta_mu)
    if not in_mu.any():
        raise IRIS2SaveError(f"{path}: no entry with |mu - {mu}| <= {delta_mu} (entries span "
                             f"mu {np.nanmin(mu_entry):.3f}-{np.nanmax(mu_entry):.3f})")
    good = usable & in_mu
    dropped = int((in_mu & ~usable).sum())
    if not good.any():
        raise IRIS2SaveError(f"{path}: no usable database entry (every model has T <= 0 or "
                             "non-finite values)")
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} database entries with T <= 0 or non-finite "
                      "values", stacklevel=2)
    if medium == "air":
        from iris_lab.atomic import air_to_vacuum

        wl = np.asarray(air_to_vacuum(wl), dtype=np.float64)
    keep = np.flatnonzero(good)
    f32 = np.float32
    dims = ("entry", "log_tau")
    mu_attr = float(mu_entry[keep][0]) if np.unique(mu_entry[keep]).size == 1 else (
        float(mu) if mu is not None else float("nan"))
    data_vars: dict[str, Any] = {
        "profile": (("entry", "wavelength"), prof[keep].astype(f32),
                    {"units": units or INTENSITY_UNITS, "mu": mu_attr}),
        "mu": ("entry", mu_entry[keep], {"long_name": "heliocentric mu of the entry"}),
    }
    for k, var in enumerate(IRIS2_ORDER):
        data_vars[var] = (dims, model[k][keep].astype(f32), {"units": _UNITS[var]})
        sig, unit = _SIGMA[var]
        data_vars[sig] = (dims, sigma[k][keep].astype(f32), {"units": unit})
    return xr.Dataset(
        data_vars,
        coords={"entry": ("entry", keep),
                "wavelength": ("wavelength", wl, {"units": "Angstrom", "medium": "vacuum",
                                                  "medium_in_file": medium}),
                "log_tau": ("log_tau", ltau, {"long_name": "log10 optical depth at 500 nm"})},
        attrs={"mu": mu_attr, "source": str(path), "provenance": "IRIS2 database (IDL SAVE)",
               "dropped_entries": dropped,
               "sigma_log_n_e": "log10(1 + sigma(n_e) / n_e) from the linear uncertainty"})
