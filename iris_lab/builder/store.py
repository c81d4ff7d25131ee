"""Append-only checkpoint store of a chunked build: one netCDF file per finished
chunk, the build specification and a log."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


class CheckpointStore:
    """Append-only store of finished chunks (one netCDF file each).

    Parameters
    ----------
    path
        Folder of the store (created).
    spec
        Build specification; a store created with another specification is
        refused (``ValueError``), so a resumed build is the same build.

    Example
    -------
    >>> store = CheckpointStore("build/demo.parts", {"kind": "flare", "n": 40})  # doctest: +SKIP
    >>> store.done()                                                            # doctest: +SKIP
    set()
    """

    def __init__(self, path: str | Path, spec: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.spec = json.loads(json.dumps(spec))
        index = self.path / "index.json"
        if index.exists():
            stored = json.loads(index.read_text())
            if stored.get("spec") != self.spec:
                raise ValueError(
                    f"checkpoint store {self.path} holds another build "
                    f"({stored.get('spec')}); use another --out or remove it")
        else:
            record = {"spec": self.spec, "created": _now()}
            tmp = index.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, index)

    def chunk_path(self, chunk_id: int) -> Path:
        return self.path / f"chunk_{chunk_id:06d}.nc"

    def done(self) -> set[int]:
        """Ids of the chunks on disk."""
        return {int(p.stem.split("_")[1]) for p in self.path.glob("chunk_*.nc")}

    def write(self, chunk_id: int, dataset: Any, info: dict[str, Any] | None = None) -> Path:
        """Write one chunk atomically (temporary file, then rename)."""
        final = self.chunk_path(chunk_id)
        tmp = final.with_name(final.name + f".{os.getpid()}.tmp")
        encoding = {v: {"zlib": True, "complevel": 4} for v in dataset.data_vars
                    if dataset[v].dtype.kind == "f"}
        dataset.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
        os.replace(tmp, final)
        self.log({"chunk": chunk_id, "status": "done", **(info or {})})
        return final

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / "log.jsonl", "a") as handle:
            handle.write(json.dumps({"time": _now(), **record}) + "\n")

    def import_chunks(self, other: str | Path, note: str) -> list[int]:
        """Copy finished chunks of another store (same atmospheres and chunk
        ids, another solver set-up) that this store lacks, and log them.

        Used to keep chunks solved with a reference set-up when a build
        switches to a cheaper one whose difference was measured (``note``
        says how much); :func:`export` lists the imported chunks in ``attrs``.
        """
        source = Path(other)
        stored = json.loads((source / "index.json").read_text())["spec"]
        mine = {k: v for k, v in self.spec.items() if k != "synth"}
        if {k: v for k, v in stored.items() if k != "synth"} != mine:
            raise ValueError(f"{source} holds other atmospheres ({stored}); cannot import")
        done = self.done()
        imported = []
        for path in sorted(source.glob("chunk_*.nc")):
            chunk_id = int(path.stem.split("_")[1])
            if chunk_id in done:
                continue
            tmp = self.chunk_path(chunk_id).with_name(f"{path.name}.{os.getpid()}.tmp")
            shutil.copyfile(path, tmp)
            os.replace(tmp, self.chunk_path(chunk_id))
            imported.append(chunk_id)
        self.log({"status": "imported", "chunks": imported, "source": str(source),
                  "synth": stored.get("synth"), "note": note})
        return imported

    def imported(self) -> list[dict[str, Any]]:
        """Log records of :meth:`import_chunks`."""
        log = self.path / "log.jsonl"
        if not log.exists():
            return []
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [r for r in lines if r.get("status") == "imported" and r.get("chunks")]

    def failures(self) -> list[dict[str, Any]]:
        log = self.path / "log.jsonl"
        if not log.exists():
            return []
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return [r for r in lines if r.get("status") == "failed"]

    def load(self, dim: str, defaults: dict[str, Any] | None = None) -> Any:
        """All chunks concatenated along ``dim``, sorted by it (no duplicates).

        ``defaults``: value of a ``dim``-variable that chunks written before it
        existed lack (e.g. ``{"rf_paired": False}``).
        """
        import xarray as xr

        parts = []
        for path in sorted(self.path.glob("chunk_*.nc")):
            with xr.open_dataset(path, engine="h5netcdf") as ds:
                part = ds.load()
            for name, value in (defaults or {}).items():
                if name not in part:
                    part[name] = (dim, np.full(part.sizes[dim], value))
            parts.append(part)
        if not parts:
            raise ValueError(f"no finished chunks in {self.path}")
        combined = xr.concat(parts, dim=dim, data_vars="minimal", coords="minimal",
                             compat="override", join="override")
        order = np.argsort(combined[dim].values, kind="stable")
        combined = combined.isel({dim: order})
        if len(np.unique(combined[dim].values)) != combined.sizes[dim]:
            raise ValueError(f"duplicated {dim} values in {self.path}")
        return combined


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iter_chunk_files(store: str | Path) -> Iterable[Path]:
    """The chunk files of a store, in chunk order."""
    return sorted(Path(store).glob("chunk_*.nc"))
