"""Export of a checkpoint store as the shipped netCDF file (instrument, σ,
provenance)."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from iris_lab.builder.responses import (
    fill_sigma_regression,
    merge_rf_references,
    merge_rf_topup,
    sigma_from_responses,
)
from iris_lab.builder.specs import DL_CA8542, DL_HALPHA
from iris_lab.builder.store import CheckpointStore, _now, iter_chunk_files


def provenance(spec: dict[str, Any], command: str | None = None) -> dict[str, str]:
    """Provenance attributes (versions, seeds, set-up, command, date)."""
    import dask
    import xarray as xr

    from iris_lab.synthesis.nlte import NLTESynthesizer

    attrs = NLTESynthesizer(**spec["synth"]).provenance()
    try:
        from importlib.metadata import version

        iris_lab_version = version("iris_lab")
    except Exception:  # noqa: BLE001
        iris_lab_version = "unknown"
    attrs.update({
        "build_kind": spec["kind"], "build_seed": str(spec["seed"]),
        "build_target_n": str(spec["n"]), "build_chunk_size": str(spec["chunk_size"]),
        "build_date": _now(), "build_command": command or " ".join(sys.argv),
        "builder": "iris_lab.builder", "iris_lab_version": iris_lab_version,
        "numpy_version": np.__version__, "xarray_version": xr.__version__,
        "dask_version": dask.__version__, "python_version": platform.python_version(),
        "generator": ("iris_lab.worlds.flare.sample_flare_sequences" if spec["kind"] == "flare"
                      else "iris_lab.worlds.chromosphere.sample_mgii_atmospheres"),
    })
    return attrs


def _apply_rows(fn: Callable[[np.ndarray], np.ndarray], values: np.ndarray) -> np.ndarray:
    """Apply a linear instrument function to all spectra ``(..., n)`` in one call;
    a spectrum with any NaN gives a NaN row."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.all(np.isfinite(values), axis=-1)
    out = np.array(fn(np.where(bad[..., None], 0.0, values)), dtype=np.float64)
    out[bad] = np.nan
    return out


def _export_mgii(ds: Any) -> tuple[Any, dict[str, str]]:
    from iris_lab import instrument
    from iris_lab.synthesis.nlte import IRIS2_LOG_TAU

    wl = ds["wl_fine"].values
    wl_iris = np.asarray(instrument.iris_mgii_wavelengths())

    def degrade(row: np.ndarray) -> np.ndarray:
        return instrument.iris_degrade(wl, row)

    profile = _apply_rows(degrade, ds["spectrum"].values.astype(np.float64))
    n = ds.sizes["entry"]
    sigma = {k: np.full((n, IRIS2_LOG_TAU.size), np.nan)
             for k in ("temperature", "v_los", "v_turb", "log_n_e")}
    rf_exact = np.zeros(n, bool)
    paired = (ds["rf_paired"].values.astype(bool) if "rf_paired" in ds
              else np.zeros(n, bool))
    usable = ds["rf_done"].values.astype(bool) & paired
    rows = np.flatnonzero(usable)
    perturbed_all = _apply_rows(degrade, ds["rf_spectrum"].values[rows])
    for i, perturbed in zip(rows, perturbed_all, strict=True):
        sig = sigma_from_responses(profile[i], perturbed,
                                   ds["temperature"].values[i].astype(np.float64),
                                   IRIS2_LOG_TAU)
        for k, v in sig.items():
            sigma[k][i] = v
        rf_exact[i] = all(np.all(np.isfinite(v)) for v in sig.values())
    units = {"temperature": "K", "v_los": "cm / s", "v_turb": "cm / s", "log_n_e": "dex"}
    out = ds.drop_vars(["spectrum", "rf_spectrum", "wl_fine", "rf_parameter", "rf_done",
                        "rf_paired", "log_tau500"], errors="ignore")
    out = out.assign_coords(wavelength=("wavelength", wl_iris,
                                        {"units": "Angstrom", "medium": "vacuum"}))
    out["profile"] = (("entry", "wavelength"), profile.astype(np.float32),
                      {"units": "erg / (s cm2 sr Angstrom)", "mu": float(ds["spectrum"].mu),
                       "long_name": "IRIS-degraded specific intensity"})
    for k, v in sigma.items():
        out[f"sigma_{k}"] = (("entry", "log_tau"), v.astype(np.float32),
                             {"units": units[k],
                              "long_name": f"uncertainty of {k} (eq. 2, Sainz Dalda et al. 2019)"})
    out["rf_exact"] = ("entry", rf_exact)
    rf_time = ds["rf_seconds"].values[usable]
    info = {"rf_seconds_mean": f"{float(np.mean(rf_time)):.1f}" if rf_time.size else "n/a",
            "rf_unpaired_dropped": str(int((ds["rf_done"].values.astype(bool) & ~paired).sum())),
            "rf_pairing": "responses are perturbed - reference, both solved from the entry's "
                          "converged solution (builder.response_spectra)"}
    return out, info


def _export_flare(ds: Any) -> Any:
    from iris_lab import instrument

    out = ds.drop_vars(["halpha_fine", "ca8542_fine", "off_halpha", "off_ca8542"])
    for line, grid in (("halpha", DL_HALPHA), ("ca8542", DL_CA8542)):
        offset = ds[f"off_{line}"].values

        def degrade(row: np.ndarray, line=line, offset=offset, grid=grid) -> np.ndarray:
            return instrument.crisp_degrade(offset, row, line, positions=grid)

        values = _apply_rows(degrade, ds[f"{line}_fine"].values.astype(np.float64))
        out = out.assign_coords({f"dl_{line}": (f"dl_{line}", grid, {"units": "Angstrom"})})
        out[line] = ((("sample", f"dl_{line}")), values.astype(np.float32),
                     {"units": "erg / (s cm2 sr Angstrom)", "mu": 1.0,
                      "long_name": f"{line} intensity after the CRISP transmission profile"})
    return out


def _kept(store: CheckpointStore, dim: str) -> tuple[Any, int]:
    """The converged entries (samples) of a store, and how many were solved."""
    ds = store.load(dim, defaults={"rf_paired": False} if dim == "entry" else None)
    n_total = ds.sizes[dim]
    ds = ds.isel({dim: np.flatnonzero(ds["converged"].values.astype(bool))})
    return ds.drop_vars([v for v in ("message",) if v in ds]), n_total


def _mgii_store(store: CheckpointStore, rf_topup: CheckpointStore | None = None,
                rf_references: CheckpointStore | None = None) -> tuple[Any, dict[str, str], int]:
    """A Mg II store's converged entries with its references and top-up merged,
    through :func:`_export_mgii` (σ not yet filled)."""
    ds, n_total = _kept(store, "entry")
    info: dict[str, str] = {}
    if rf_references is not None and any(iter_chunk_files(rf_references.path)):
        if rf_references.spec.get("base") != store.spec:
            raise ValueError("the paired references belong to another build")
        ds, more = merge_rf_references(ds, rf_references.load("entry"))
        info.update(more)
    if rf_topup is not None and any(rf_topup.path.glob("chunk_*.nc")):
        if rf_topup.spec.get("base") != store.spec:
            raise ValueError("the response-function top-up belongs to another build")
        ds, more = merge_rf_topup(ds, rf_topup.load("entry", defaults={"rf_paired": False}))
        info.update(more)
    ds, more = _export_mgii(ds)
    info.update(more)
    return ds, info, n_total


def _check_resumed(store: CheckpointStore, carry_from: str | Path | None) -> None:
    """Refuse to export a store resumed from an earlier export without that file:
    the export would silently leave out the carried entries."""
    log = store.path / "log.jsonl"
    resumed = log.exists() and any('"status": "carried"' in line
                                   for line in log.read_text().splitlines())
    if resumed and carry_from is None:
        raise ValueError(f"{store.path} was resumed from an earlier export and lacks its "
                         "chunks: pass that file as carry_from (--carry-from)")


def export(store: CheckpointStore, out: str | Path, *, command: str | None = None,
           fill_sigma: bool = True, rf_topup: CheckpointStore | None = None,
           rf_references: CheckpointStore | None = None,
           carry_from: str | Path | None = None,
           supplement: CheckpointStore | None = None) -> Path:
    """Write the finished chunks of a store as the shipped netCDF file.

    The instrument is applied here (IRIS NUV degradation for Mg II, CRISP
    transmission for Hα / Ca II 8542), σ follows from the stored response
    spectra (:func:`sigma_from_responses`) and, for entries without them, from
    a regression (:func:`fill_sigma_regression`) whose error is stored in
    ``attrs``. Non-converged entries are dropped and counted in ``attrs``.
    ``rf_topup``: the store of a response-function top-up
    (:func:`rf_topup_spec`), merged by :func:`merge_rf_topup` when it has
    finished chunks; ``rf_references``: the paired references of older
    chunks (:func:`rf_reference_spec`), merged by :func:`merge_rf_references`.
    Only paired responses give exact σ. ``carry_from``: an earlier export of
    the same Mg II build, whose entries in chunks the store lacks are carried
    (:func:`~iris_lab.builder.combine.carry_earlier`); ``supplement``: the
    store of supplementary entries (:func:`~iris_lab.builder.combine.supplement_spec`),
    exported with ids after the database's. The per-entry ``seed`` says which
    draw an entry comes from.
    """
    spec = store.spec
    attrs = provenance(spec, command)
    if spec["kind"] == "flare":
        ds, n_total = _kept(store, "sample")
        ds = _export_flare(ds)
        seqs = np.unique(ds["sequence"].values)
        rng = np.random.default_rng(spec["seed"] + 11)
        all_seq = np.arange(int(np.ceil(spec["n"] / spec["chunk_size"])))
        held = set(rng.choice(all_seq, size=max(1, round(0.2 * all_seq.size)), replace=False))
        ds["held_out"] = ("sample", np.array([s in held for s in ds["sequence"].values]))
        ds["held_out"].attrs["description"] = "20% of the sequences, seeded, whole sequences"
        attrs.update({"line_centre_halpha_vacuum_aa": "6564.61",
                      "line_centre_halpha_air_aa": "6562.80",
                      "line_centre_ca8542_vacuum_aa": "8544.44",
                      "line_centre_ca8542_air_aa": "8542.09",
                      "n_sequences": str(seqs.size)})
    else:
        from iris_lab.builder.combine import carry_earlier, concat_entries, offset_supplement

        _check_resumed(store, carry_from)
        has_supplement = supplement is not None and any(iter_chunk_files(supplement.path))
        ds, n_total = None, 0
        if any(iter_chunk_files(store.path)):
            ds, info, n_total = _mgii_store(store, rf_topup, rf_references)
            attrs.update(info)
        if carry_from is not None:
            ds, info, n_carried = carry_earlier(ds, carry_from, spec, store.done(),
                                                with_supplement=has_supplement)
            attrs.update(info)
            n_total += n_carried
        if ds is None:
            raise ValueError(f"no finished chunks in {store.path}")
        seed = np.full(ds.sizes["entry"], spec["seed"], dtype=np.int32)
        if has_supplement:
            extra, _, n_extra = _mgii_store(supplement)
            extra = offset_supplement(extra, spec)
            ds = concat_entries(ds, extra)
            seed = np.concatenate([seed, np.full(extra.sizes["entry"],
                                                 supplement.spec["seed"], dtype=np.int32)])
            n_total += n_extra
            attrs["supplement"] = (
                f"entries {spec['n']}+: {extra.sizes['entry']} converged of {n_extra} solved "
                f"(of {supplement.spec['n']}) atmospheres drawn with seed "
                f"{supplement.spec['seed']} (builder.supplement_spec), so that the database "
                "keeps its target size after the solves that do not converge")
        ds["seed"] = ("entry", seed, {"long_name": "seed of the atmosphere draw"})
        if fill_sigma:
            ds, info = fill_sigma_regression(ds)
            attrs.update(info)
    dim = "sample" if spec["kind"] == "flare" else "entry"
    attrs.update({"n_solved": str(n_total), "n_kept": str(ds.sizes[dim]),
                  "n_not_converged": str(int(n_total - ds.sizes[dim])),
                  "solve_seconds_total": f"{float(ds['solve_seconds'].sum()):.0f}"})
    for record in store.imported():
        setup = record.get("synth") or {}
        attrs["chunks_from_other_setup"] = (
            f"chunks {record['chunks']} solved with n_rays={setup.get('n_rays')}, "
            f"prd={setup.get('prd')}: {record.get('note', '')}")
    ds.attrs = attrs
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    encoding = {v: {"zlib": True, "complevel": 4} for v in ds.data_vars
                if ds[v].dtype.kind == "f"}
    ds.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
    os.replace(tmp, out)
    return out

