"""Parts of a Mg II database that its own checkpoint store does not hold: entries
carried over from an earlier export of the same build, and supplementary builds
of another seed that keep the database at its target size when some solves do
not converge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from iris_lab.builder.responses import _companion_store_path
from iris_lab.builder.specs import SEEDS, make_spec
from iris_lab.builder.store import CheckpointStore

#: A supplement of a Mg II database is drawn with the database's seed plus this.
SUPPLEMENT_SEED_OFFSET = 100

#: Attributes of an export that say which atmospheres and which set-up it holds.
_BUILD_KEYS = ("build_kind", "build_seed", "build_target_n", "build_chunk_size")
_SETUP_KEYS = ("setup", "active_atoms", "prd", "n_rays", "mu", "electrons", "hydrostatic",
               "tolerances", "t_max")

#: Attributes of an earlier export that describe its carried entries; kept, with
#: the prefix ``carried_``, in an export that carries them.
_CARRIED_ATTRS = ("rf_references_merged", "rf_references_rejected", "rf_references_seconds",
                  "rf_topup_entries", "rf_topup_seconds", "chunks_from_other_setup",
                  "build_date")


def supplement_spec(base: dict[str, Any], n: int) -> dict[str, Any]:
    """Specification of ``n`` supplementary entries of a Mg II database: the same
    families, set-up, chunking and response fraction, drawn with the seed
    ``base seed + SUPPLEMENT_SEED_OFFSET``. Their entry ids follow the base's
    (``base["n"] + i``) in the export.

    Example
    -------
    >>> spec = supplement_spec(make_spec("mgii", 1000), 16)
    >>> spec["seed"], spec["n"]
    (2119, 16)
    """
    if base.get("kind") != "mgii":
        raise ValueError(f"a supplement belongs to a Mg II database, not {base.get('kind')!r}")
    seed = int(base["seed"]) + SUPPLEMENT_SEED_OFFSET
    if seed in SEEDS.values():
        raise ValueError(f"the supplement's seed {seed} is the seed of another build")
    return make_spec("mgii", n, seed=seed, chunk_size=base["chunk_size"], synth=base["synth"],
                     rf_fraction=base["rf_fraction"])


def supplement_store_path(store: str | Path) -> Path:
    """Where the supplement of a store goes: ``<name>_extra.parts``.

    Example
    -------
    >>> supplement_store_path("build/mgii_database.parts").name
    'mgii_database_extra.parts'
    """
    return _companion_store_path(store, "_extra")


def _carried_mask(entries: np.ndarray, spec: dict[str, Any], solved: set[int]) -> np.ndarray:
    """Entries of an earlier export that are carried: the build's own (id < n) in
    chunks the store does not hold."""
    entries = np.asarray(entries).astype(int)
    return (entries < spec["n"]) & ~np.isin(entries // spec["chunk_size"], sorted(solved))


def _expected_attrs(spec: dict[str, Any]) -> dict[str, str]:
    from iris_lab.builder.export import provenance

    attrs = provenance(spec)
    return {k: attrs[k] for k in _BUILD_KEYS + _SETUP_KEYS if k in attrs}


def carried_chunks(earlier: str | Path, spec: dict[str, Any]) -> set[int]:
    """Chunk ids of the build ``spec`` that an earlier export of it holds
    (chunks with at least one kept entry).

    Raises
    ------
    ValueError
        When the file is another build (other atmospheres or set-up) or is not
        an export of a Mg II database.

    Notes
    -----
    A chunk none of whose entries converged is not in the export, so a
    resumed build solves it again.

    Example
    -------
    >>> carried_chunks("iris_lab/data/mgii_database.nc",
    ...                make_spec("mgii", 1000)) == set(range(250))  # doctest: +SKIP
    True
    """
    import xarray as xr

    with xr.open_dataset(earlier, engine="h5netcdf") as ds:
        _check_same_build(ds.attrs, spec, earlier)
        entries = ds["entry"].values.astype(int)
    entries = entries[_carried_mask(entries, spec, set())]
    return set((entries // spec["chunk_size"]).tolist())


def _check_same_build(attrs: dict[str, Any], spec: dict[str, Any], path: Any) -> None:
    expected = _expected_attrs(spec)
    differ = {k: (attrs.get(k), v) for k, v in expected.items() if str(attrs.get(k)) != v}
    if differ:
        raise ValueError(f"{path} is another build than {spec['kind']} seed {spec['seed']} "
                         f"n={spec['n']}: (file, build) differ in {differ}")


def carry_earlier(ds: Any, earlier: str | Path, spec: dict[str, Any], solved: set[int], *,
                  with_supplement: bool = False) -> tuple[Any, dict[str, str], int]:
    """Add to an exported Mg II dataset the entries of an earlier export of the
    same build whose chunks the store no longer holds.

    The earlier file keeps profiles, models and σ but not the fine spectra or
    response spectra, so a store that was lost can resume from it: the build
    solves only the chunks it lacks (:func:`carried_chunks`), and the export
    takes the rest from here. Exact σ (``rf_exact``) are carried as they are;
    the others are set to NaN for the regression fill of the whole database.

    Parameters
    ----------
    ds
        The store's entries after :func:`~iris_lab.builder.export._export_mgii`,
        or ``None`` when the store holds no chunk (everything is carried).
    earlier
        The earlier export (read fully before the new file replaces it).
    solved
        Chunk ids in the store; their entries are never carried.
    with_supplement
        Whether the export has its supplement store; supplementary entries
        (ids ≥ n) are never carried, so a file that holds some is refused
        without it (the database would silently shrink).

    Returns
    -------
    dataset, info, n_solved
        ``ds`` with the carried entries (sorted by entry), attributes saying
        what was carried, and the number of solves the carried chunks took
        (kept or not), for the export's counts.

    Notes
    -----
    The ``carried_*`` attributes are the earlier export's own description of
    what it carried (or, when it carried nothing, of its store). An export
    that held both kinds of entries describes only the carried ones, so after
    a second loss of checkpoints its store's attributes (e.g. its top-up's)
    are not carried again; the entries, models and σ always are.

    Example
    -------
    >>> ds, info, n_solved = carry_earlier(exported, "earlier.nc", spec,
    ...                                    store.done())  # doctest: +SKIP
    """
    import xarray as xr

    with xr.open_dataset(earlier, engine="h5netcdf") as handle:
        old = handle.load()
    _check_same_build(old.attrs, spec, earlier)
    beyond = int((old["entry"].values >= spec["n"]).sum())
    if beyond and not with_supplement:
        raise ValueError(f"{earlier} holds {beyond} supplementary entries (ids ≥ {spec['n']}) "
                         "and no supplement store is given (--supplement)")
    old = old.isel(entry=np.flatnonzero(_carried_mask(old["entry"].values, spec, solved)))
    if ds is not None:
        missing = [v for v in ds.data_vars if v not in old]
        if missing:
            raise ValueError(f"{earlier} lacks {missing}; cannot carry its entries")
        for coord in ("wavelength", "log_tau"):
            if not np.array_equal(old[coord].values, ds[coord].values):
                raise ValueError(f"{earlier} is on another {coord} grid than the store")
        old = old[list(ds.data_vars)]
    else:
        old = old.drop_vars([v for v in ("seed",) if v in old])
    exact = old["rf_exact"].values.astype(bool)
    for name in [v for v in old.data_vars if v.startswith("sigma_")]:
        values = old[name].values.copy()
        values[~exact] = np.nan
        old[name] = (old[name].dims, values, old[name].attrs)
    chunks = np.unique(old["entry"].values // spec["chunk_size"])
    n_solved = int(sum(min(spec["chunk_size"], spec["n"] - c * spec["chunk_size"])
                       for c in chunks))
    combined = old if ds is None else concat_entries(ds, old)
    info = {"carried_entries": str(old.sizes["entry"]),
            "carried_from": (f"{chunks.size} chunks ({old.sizes['entry']} entries, "
                             f"{int(exact.sum())} with exact sigma) from an earlier export "
                             "of this build, whose checkpoints were not kept")}
    # an export that carried entries itself describes them by its carried_* attributes
    # (its plain ones describe its store); an export of a store alone, by its plain ones
    prefix = "carried_" if "carried_from" in old.attrs else ""
    for key in _CARRIED_ATTRS:
        value = old.attrs.get(prefix + key)
        if value is not None:
            info[f"carried_{key}"] = str(value)
    return combined, info, n_solved


def exact_outside(spec: dict[str, Any], solved: set[int], carry_from: str | Path | None = None,
                  supplement: CheckpointStore | None = None) -> int:
    """Entries with exact σ that a Mg II database takes from outside its store.

    Parameters
    ----------
    spec, solved
        The database's specification and the chunk ids its store holds.
    carry_from
        An earlier export whose entries in other chunks are carried (ignored
        when it does not exist).
    supplement
        The supplement's store (its converged entries with paired responses).

    Returns
    -------
    int
        The count the response top-up subtracts from its target.

    Example
    -------
    >>> exact_outside(make_spec("mgii", 1000), set())
    0
    """
    import xarray as xr

    n = 0
    if carry_from is not None and Path(carry_from).exists():
        with xr.open_dataset(carry_from, engine="h5netcdf") as ds:
            _check_same_build(ds.attrs, spec, carry_from)
            carried = _carried_mask(ds["entry"].values, spec, solved)
            n += int((ds["rf_exact"].values.astype(bool) & carried).sum())
    if supplement is not None:
        from iris_lab.builder.responses import _entry_flags

        n += int(_entry_flags(supplement, supplement.spec["n"])[2].sum())
    return n


def offset_supplement(ds: Any, base: dict[str, Any]) -> Any:
    """A supplement's entries with ids after the base database's (``base["n"] + i``).

    Example
    -------
    >>> import xarray as xr
    >>> ds = xr.Dataset(coords={"entry": [0, 1]})
    >>> offset_supplement(ds, {"n": 1000})["entry"].values.tolist()
    [1000, 1001]
    """
    return ds.assign_coords(entry=ds["entry"].values.astype(int) + int(base["n"]))


def concat_entries(first: Any, second: Any) -> Any:
    """Two exported Mg II datasets as one, sorted by ``entry`` (ids must differ).

    Example
    -------
    >>> import xarray as xr
    >>> a = xr.Dataset({"v": ("entry", [1.0])}, coords={"entry": [5]})
    >>> b = xr.Dataset({"v": ("entry", [2.0])}, coords={"entry": [2]})
    >>> concat_entries(a, b)["entry"].values.tolist()
    [2, 5]
    """
    import xarray as xr

    ds = xr.concat([first, second], dim="entry", data_vars="minimal", coords="minimal",
                   compat="override", join="override")
    if len(np.unique(ds["entry"].values)) != ds.sizes["entry"]:
        raise ValueError("the parts of the database share entry ids")
    return ds.isel(entry=np.argsort(ds["entry"].values, kind="stable"))
