"""Parallel, resumable builds of the NLTE databases on dask.distributed.

A build is a list of *chunks* (a few atmospheres that warm-start each other:
a stretch of a Mg II family chain, or one flare time sequence). Each chunk is
solved on a dask worker (one worker per core, one thread each, or the workers
of a running scheduler) and written, when finished, to an append-only
checkpoint store: one netCDF file per chunk, renamed into place atomically,
plus ``index.json`` (the build specification) and ``log.jsonl`` (one line per
finished or failed chunk). A killed build therefore loses at most the chunks
in flight, and a restart skips every chunk already on disk: nothing is lost or
duplicated. A solve that does not converge is kept in the chunk with
``converged=False`` (and left out of the exported file, where it is counted);
a chunk whose worker raises or dies is logged as failed and retried on the
next run; neither stops the rest of the build.

Chunks are processed in a seeded random order, so a partial build samples all
families (and all flare sequences) evenly.

The package: :mod:`~iris_lab.builder.store` (the checkpoint store),
:mod:`~iris_lab.builder.runner` (dask clusters, the chunk runner, process
isolation), :mod:`~iris_lab.builder.specs` (seeds, set-ups, tasks),
:mod:`~iris_lab.builder.chunks` (what a worker solves),
:mod:`~iris_lab.builder.responses` (response functions and σ),
:mod:`~iris_lab.builder.combine` (entries carried from an earlier export,
supplements) and :mod:`~iris_lab.builder.export` (the shipped files); this module holds the
build entry points and re-exports their API.

Example
-------
>>> from iris_lab.builder import build_database              # doctest: +SKIP
>>> build_database("flare", 40, "flare_set.nc", workers=2)   # doctest: +SKIP
PosixPath('flare_set.nc')
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from iris_lab.builder.chunks import (  # noqa: F401 - the package's API
    flare_chunk,
    mgii_chunk,
    mgii_reference_chunk,
)
from iris_lab.builder.combine import (  # noqa: F401 - the package's API
    SUPPLEMENT_SEED_OFFSET,
    carried_chunks,
    carry_earlier,
    exact_outside,
    supplement_spec,
    supplement_store_path,
)
from iris_lab.builder.export import (  # noqa: F401 - the package's API
    export,
    provenance,
)
from iris_lab.builder.responses import (  # noqa: F401 - the package's API
    CHAIN_MATCH_TOLERANCE,
    fill_sigma_regression,
    merge_rf_references,
    merge_rf_topup,
    perturb_node,
    response_spectra,
    rf_parameters,
    rf_reference_spec,
    rf_reference_store_path,
    rf_reference_tasks,
    rf_topup_entries,
    rf_topup_plan,
    rf_topup_spec,
    rf_topup_store_path,
    rf_topup_tasks,
    sigma_from_responses,
)
from iris_lab.builder.runner import (  # noqa: F401 - the package's API
    QUIET_CLUSTER_CONFIG,
    BuildReport,
    exit_with_parent,
    flare_chunk_isolated,
    local_cluster,
    mgii_chunk_isolated,
    mgii_reference_chunk_isolated,
    run_chunks,
    run_isolated,
)
from iris_lab.builder.specs import (  # noqa: F401 - the package's API
    DL_CA8542,
    DL_HALPHA,
    FLARE_STEPS,
    SEEDS,
    SIGMA_EXPTIME_S,
    Kind,
    default_synth,
    make_spec,
    make_tasks,
)
from iris_lab.builder.store import (  # noqa: F401 - the package's API
    CheckpointStore,
    iter_chunk_files,
)


def build_database(kind: Kind, n: int, out: str | Path, *, scheduler: str | None = None,
                   workers: int | None = None, seed: int | None = None,
                   chunk_size: int | None = None, store: str | Path | None = None,
                   synth: dict[str, Any] | None = None, rf_fraction: float = 0.1,
                   time_limit_s: float | None = None, progress: bool = True,
                   processes: bool = True, command: str | None = None,
                   export_file: bool = True, rf_min: int | None = None,
                   carry_from: str | Path | None = None,
                   supplement: int | None = None) -> Path:
    """Build (or resume) a database and export it to ``out``.

    Parameters
    ----------
    kind
        ``"mgii"`` (database), ``"mgii_heldout"`` (held-out atmospheres, other
        seed, no σ) or ``"flare"``.
    n
        Target number of entries (Mg II) or samples (flare).
    out
        Output netCDF; the checkpoint store defaults to ``build/<stem>.parts``.
    scheduler, workers
        A scheduler address, or the number of local workers (default: one per
        core).
    rf_min
        Mg II database: once every entry is solved, top up the entries with
        exact response functions to this many (:func:`rf_topup_spec`; its own
        store, ``<store>_rf.parts``, resumable like the main one; up to three
        rounds, each replacing the entries that failed in the last). Before
        it, chunks whose responses are unpaired get their paired references
        (:func:`rf_reference_tasks`, store ``<store>_ref.parts``). Not used
        by :func:`build_interleaved`.
    carry_from
        Mg II database: an earlier export of the same build (its file, e.g.
        ``out`` itself) whose chunks are not solved again when the store lacks
        them; the export carries their entries
        (:func:`~iris_lab.builder.combine.carry_earlier`). A build whose
        checkpoints were lost resumes from its shipped file this way; a file
        that does not exist yet (a first build) is ignored.
    supplement
        Mg II database: this many more atmospheres of another seed
        (:func:`~iris_lab.builder.combine.supplement_spec`, store
        ``<store>_extra.parts``), solved after the last entry and exported with
        ids from ``n`` on, so that the database keeps at least ``n`` entries
        when some solves do not converge.

    Example
    -------
    >>> build_database("mgii", 1000, "iris_lab/data/mgii_database.nc")  # doctest: +SKIP
    """
    if kind != "mgii" and (carry_from is not None or supplement):
        raise ValueError("carry_from and supplement belong to the Mg II database "
                         f"(kind 'mgii'), not to {kind!r}")
    t_start = time.monotonic()

    def left() -> float | None:
        return None if time_limit_s is None else time_limit_s - (time.monotonic() - t_start)

    spec = make_spec(kind, n, seed=seed, chunk_size=chunk_size, synth=synth,
                     rf_fraction=rf_fraction)
    out = Path(out)
    store_path = Path(store) if store else Path("build") / f"{out.stem}.parts"
    ckpt = CheckpointStore(store_path, spec)
    tasks = make_tasks(spec)
    carry_from = Path(carry_from) if carry_from is not None else None
    if carry_from is not None and carry_from.exists():
        carried = carried_chunks(carry_from, spec) - ckpt.done()
        tasks = [(c, p) for c, p in tasks if c not in carried]
        if carried:
            ckpt.log({"status": "carried", "chunks": len(carried), "from": str(carry_from)})
    else:
        carry_from = None
    report = run_chunks(tasks, flare_chunk_isolated if kind == "flare" else mgii_chunk_isolated,
                        ckpt,
                        scheduler=scheduler, workers=workers, processes=processes,
                        time_limit_s=time_limit_s, progress=progress)
    ckpt.log({"status": "run", "done": len(report.done), "failed": len(report.failed),
              "skipped": len(report.skipped), "seconds": round(report.seconds, 1)})
    complete = {c for c, _ in tasks} <= ckpt.done() and not report.stopped_early
    extra = None
    if kind == "mgii" and supplement:
        extra = CheckpointStore(supplement_store_path(store_path),
                                supplement_spec(spec, supplement))
        extra_tasks = make_tasks(extra.spec)
        if complete and (left() is None or left() > 0):
            more = run_chunks(extra_tasks, mgii_chunk_isolated, extra,
                              scheduler=scheduler, workers=workers, processes=processes,
                              time_limit_s=left(), progress=progress)
            extra.log({"status": "run", "done": len(more.done), "failed": len(more.failed),
                       "seconds": round(more.seconds, 1)})
        complete = complete and {c for c, _ in extra_tasks} <= extra.done()
    topup = references = None
    if kind == "mgii" and rf_min:
        if not 0 < rf_min <= n:
            raise ValueError(f"rf_min must be in 1..{n}, not {rf_min}")
        path = rf_topup_store_path(store_path)
        if complete or path.exists():
            topup = CheckpointStore(path, rf_topup_spec(spec))
        ref_path = rf_reference_store_path(store_path)
        if complete or ref_path.exists():
            references = CheckpointStore(ref_path, rf_reference_spec(spec))
        if complete:
            ref = pair_older_responses(ckpt, references, scheduler=scheduler, workers=workers,
                                       processes=processes, progress=progress,
                                       time_limit_s=left())
            complete = not ref.stopped_early
        for _ in range(3 if complete else 0):  # entries that fail are replaced next round
            entries = rf_topup_plan(ckpt, topup, rf_min, references,
                                    exact_elsewhere=exact_outside(spec, ckpt.done(),
                                                                  carry_from, extra))
            if entries.size == 0 or (left() is not None and left() <= 0):
                break
            top = run_chunks(rf_topup_tasks(topup.spec, entries), mgii_chunk_isolated, topup,
                             scheduler=scheduler, workers=workers, processes=processes,
                             time_limit_s=left(), progress=progress)
            topup.log({"status": "rf top-up", "done": len(top.done),
                       "failed": len(top.failed), "seconds": round(top.seconds, 1)})
            if top.stopped_early:
                break
    if export_file and (ckpt.done() or carry_from is not None):
        export(ckpt, out, command=command, rf_topup=topup, rf_references=references,
               carry_from=carry_from, supplement=extra)
    return out


def pair_older_responses(main: CheckpointStore, references: CheckpointStore,
                         **run_options: Any) -> BuildReport:
    """Solve the paired references of every chunk of ``main`` whose responses are
    unpaired (:func:`rf_reference_tasks`) into ``references`` and log the run;
    ``run_options`` go to :func:`run_chunks` (scheduler, workers, time limit…)."""
    report = run_chunks(rf_reference_tasks(main), mgii_reference_chunk_isolated, references,
                        **run_options)
    references.log({"status": "paired references", "done": len(report.done),
                    "failed": len(report.failed), "seconds": round(report.seconds, 1)})
    return report


def build_interleaved(jobs: Sequence[tuple[str, dict[str, Any], str | Path, int]], *,
                      workers: int = 1, scheduler: str | None = None,
                      deadline: float | None = None, progress: bool = True) -> None:
    """Build several stores on one cluster, alternating between them.

    Parameters
    ----------
    jobs
        ``(label, spec, store path, chunks per turn)``; each turn runs that
        many chunks of the job, then passes on to the next job, until every
        job is complete or ``deadline`` (a ``time.time()`` value) has passed.
        A partial build thus holds data of every job.
    """
    from dask.distributed import Client

    prepared = []
    for label, spec, store_path, per_turn in jobs:
        fn = flare_chunk_isolated if spec["kind"] == "flare" else mgii_chunk_isolated
        prepared.append((label, make_tasks(spec), fn, CheckpointStore(store_path, spec),
                         per_turn))
    cluster = None if scheduler else local_cluster(workers, allowed_failures=3)
    client = Client(scheduler or cluster)
    try:
        while deadline is None or time.time() < deadline:
            busy = False
            for label, tasks, fn, store, per_turn in prepared:
                if deadline is not None and time.time() >= deadline:
                    break
                report = run_chunks(tasks, fn, store, client=client, max_chunks=per_turn,
                                    progress=progress)
                busy = busy or bool(report.done or report.failed)
                store.log({"status": "turn", "job": label, "done": report.done,
                           "failed": list(report.failed), "seconds": round(report.seconds, 1)})
            if not busy:
                break
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def cli_build_database(args: Any) -> int:
    """``iris-lab build-database`` (see :func:`build_database`)."""
    out = build_database(args.kind, args.n, args.out, scheduler=args.scheduler,
                         workers=args.workers, seed=args.seed, chunk_size=args.chunk_size,
                         store=args.store, time_limit_s=args.time_limit,
                         command="iris-lab " + " ".join(sys.argv[1:]))
    print(f"wrote {out}")
    return 0
