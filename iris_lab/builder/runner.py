"""Running chunks on dask.distributed: quiet local clusters, the resumable
chunk runner, and chunk functions isolated in fresh processes."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from iris_lab.builder.store import CheckpointStore


@dataclasses.dataclass
class BuildReport:
    """What a call of :func:`run_chunks` did."""

    done: list[int]
    failed: dict[int, str]
    skipped: list[int]
    seconds: float
    stopped_early: bool


#: dask settings of the clusters the builder starts. Every chunk runs for
#: minutes, so the schedulers' and workers' fast housekeeping (20 ms event-loop
#: ticks, 10 ms statistical profiling, 100 ms work stealing, 0.5 s system
#: monitor) only takes CPU from the solves: 12 % of one core for an idle
#: 2-worker cluster with dask's defaults, 1.7 % with these (benchmarks/README.md).
QUIET_CLUSTER_CONFIG: dict[str, Any] = {
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.profile.enabled": False,
    "distributed.scheduler.work-stealing": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.system-monitor.disk": False,
    "distributed.admin.system-monitor.host-cpu": False,
    "distributed.worker.memory.monitor-interval": "1s",
}


def local_cluster(n_workers: int, *, processes: bool = True, allowed_failures: int = 1) -> Any:
    """A ``LocalCluster`` for chunk builds: ``n_workers`` workers of one thread,
    ``OMP_NUM_THREADS=1``, no dashboard, and :data:`QUIET_CLUSTER_CONFIG`.

    Parameters
    ----------
    n_workers
        Worker count (one per core for NLTE solves).
    processes
        Worker processes (default) or threads.
    allowed_failures
        Times a chunk may take its worker down before dask gives up on it.

    Example
    -------
    >>> cluster = local_cluster(1, processes=False)
    >>> len(cluster.workers), cluster.scheduler.extensions.get("stealing") is None
    (1, True)
    >>> cluster.close()
    """
    import dask
    from dask.distributed import LocalCluster

    config = {**QUIET_CLUSTER_CONFIG, "distributed.scheduler.allowed-failures": allowed_failures}
    extra = {"env": {"OMP_NUM_THREADS": "1"}} if processes else {}
    with dask.config.set(config):
        return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=processes,
                            dashboard_address=None, **extra)


def run_chunks(tasks: Sequence[tuple[int, Any]], chunk_fn: Callable[[Any], Any],
               store: CheckpointStore, *, scheduler: str | None = None,
               workers: int | None = None, processes: bool = True,
               time_limit_s: float | None = None, progress: bool = True,
               max_in_flight: int | None = None, allowed_failures: int = 1,
               client: Any = None, max_chunks: int | None = None) -> BuildReport:
    """Run ``chunk_fn(payload)`` for every ``(chunk_id, payload)`` not in the store.

    Parameters
    ----------
    tasks
        ``(chunk_id, payload)`` pairs, in the order they should run.
    chunk_fn
        Picklable function returning an ``xarray.Dataset`` for one chunk.
    store
        Where finished chunks go; chunks already there are skipped.
    scheduler
        Address of a running dask scheduler (``tcp://host:8786``); otherwise
        a ``LocalCluster`` with ``workers`` workers (default: one per core)
        of one thread each.
    processes
        Worker processes (default) or threads (quick local runs and tests).
    time_limit_s
        Stop submitting after this many seconds and return when the chunks in
        flight are written (the build resumes later).

    Returns
    -------
    BuildReport
        Chunks done, failed (with the error), skipped (already in the store).
    """
    from dask.distributed import Client, as_completed
    from tqdm.auto import tqdm

    start = time.monotonic()
    done_before = store.done()
    todo = [(cid, payload) for cid, payload in tasks if cid not in done_before]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    skipped = [cid for cid, _ in tasks if cid in done_before]
    report = BuildReport(done=[], failed={}, skipped=skipped, seconds=0.0, stopped_early=False)
    if not todo:
        return report

    stop = {"flag": False}

    def _terminate(signum, frame):  # noqa: ARG001
        stop["flag"] = True

    previous_handler = None
    if _is_main_thread():
        previous_handler = signal.signal(signal.SIGTERM, _terminate)

    cluster = None
    own_client = client is None
    if client is not None:
        pass
    elif scheduler:
        client = Client(scheduler)
    else:
        cluster = local_cluster(workers or os.cpu_count() or 1, processes=processes,
                                allowed_failures=allowed_failures)
        client = Client(cluster)
    try:
        n_slots = sum(client.nthreads().values()) or 1
        # one chunk per worker slot: a worker that dies takes only its own chunk down
        limit = max_in_flight or n_slots
        queue = list(todo)
        futures: dict[Any, int] = {}
        bar = tqdm(total=len(todo), disable=not progress, desc=f"chunks ({store.path.name})")

        def _submit_more(pool) -> None:
            while queue and len(futures) < limit and not _should_stop():
                cid, payload = queue.pop(0)
                future = client.submit(chunk_fn, payload, key=f"chunk-{cid}-{store.path.name}",
                                       pure=False, retries=0)
                futures[future] = cid
                pool.add(future)

        def _should_stop() -> bool:
            if stop["flag"]:
                return True
            return time_limit_s is not None and time.monotonic() - start > time_limit_s

        pool = as_completed()
        _submit_more(pool)
        for future in pool:
            cid = futures.pop(future)
            try:
                dataset = future.result()
                converged = dataset["converged"].values if "converged" in dataset else []
                store.write(cid, dataset, {"n": int(np.size(converged)),
                                           "n_converged": int(np.sum(converged))})
                report.done.append(cid)
            except Exception as err:  # noqa: BLE001 - one bad chunk must not stop the build
                message = f"{type(err).__name__}: {err}"
                store.log({"chunk": cid, "status": "failed", "error": message[:2000]})
                report.failed[cid] = message
            bar.update(1)
            future.release()
            _submit_more(pool)
        bar.close()
        report.stopped_early = bool(queue)
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    report.seconds = time.monotonic() - start
    return report


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


_CHUNK_FUNCTIONS = {"mgii": "mgii_chunk", "flare": "flare_chunk",
                    "mgii_reference": "mgii_reference_chunk"}


def run_isolated(name: str, payload: dict[str, Any]) -> Any:
    """Run a chunk function in a fresh Python process and return its dataset.

    Lightweaver keeps state between contexts of one process: in our runs
    (Lightweaver 0.17.0) a Mg II PRD solve of FAL-C that converges in a fresh
    process (110 iterations) diverged after an Hα / Ca II solve in the same
    process. Each chunk therefore runs in its own interpreter (a few seconds
    of start-up against minutes of solving), which also turns a crash of the
    compiled solver into a failed chunk instead of a dead worker.
    """
    import pickle
    import subprocess
    import tempfile

    import xarray as xr

    if name not in _CHUNK_FUNCTIONS:
        raise ValueError(f"unknown chunk function {name!r}")
    with tempfile.TemporaryDirectory(prefix="iris_lab_chunk_") as tmp:
        src, dst = Path(tmp) / "payload.pkl", Path(tmp) / "result.nc"
        src.write_bytes(pickle.dumps(payload))
        code = ("import sys, pickle; from iris_lab import builder; "
                f"builder.exit_with_parent({os.getpid()}); "
                f"p = pickle.load(open({str(src)!r}, 'rb')); "
                f"builder.{_CHUNK_FUNCTIONS[name]}(p).to_netcdf({str(dst)!r}, engine='h5netcdf')")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0 or not dst.exists():
            raise RuntimeError(f"chunk process exited with {proc.returncode}: "
                               f"{proc.stderr.strip()[-1500:]}")
        with xr.open_dataset(dst, engine="h5netcdf") as ds:
            return ds.load()


def exit_with_parent(parent_pid: int, interval: float = 1.0) -> threading.Thread:
    """Watch ``parent_pid`` from a daemon thread and end this process when it is gone.

    A chunk process whose dask worker was killed (e.g. restarted by its nanny after
    missed heartbeats) would otherwise go on solving for nobody, on a core the
    resubmitted chunk needs. The check is the parent id (the process is adopted
    by another when its parent dies) every ``interval`` seconds.

    Example
    -------
    >>> import os
    >>> exit_with_parent(os.getppid()).daemon
    True
    """
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(3)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def mgii_chunk_isolated(payload: dict[str, Any]) -> Any:
    """:func:`mgii_chunk` in a fresh process (:func:`run_isolated`)."""
    return run_isolated("mgii", payload)


def mgii_reference_chunk_isolated(payload: dict[str, Any]) -> Any:
    """:func:`mgii_reference_chunk` in a fresh process (:func:`run_isolated`)."""
    return run_isolated("mgii_reference", payload)


def flare_chunk_isolated(payload: dict[str, Any]) -> Any:
    """:func:`flare_chunk` in a fresh process (:func:`run_isolated`)."""
    return run_isolated("flare", payload)
