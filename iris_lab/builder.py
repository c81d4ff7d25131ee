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

Example
-------
>>> from iris_lab.builder import build_database              # doctest: +SKIP
>>> build_database("flare", 40, "flare_set.nc", workers=2)   # doctest: +SKIP
PosixPath('flare_set.nc')
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

Kind = Literal["mgii", "mgii_heldout", "flare"]

#: Default seeds of the shipped builds (held-out atmospheres use another seed).
SEEDS = {"mgii": 2019, "mgii_heldout": 2020, "flare": 2021}
#: Flare sequences: time steps per sequence and the CRISP offset grids [Å].
FLARE_STEPS = 20
DL_HALPHA = np.round(np.linspace(-1.4, 1.4, 29), 3)
DL_CA8542 = np.round(np.linspace(-1.2, 1.2, 25), 3)
#: Reference exposure and read noise used for the noise in the σ of eq. 2.
SIGMA_EXPTIME_S = 8.0


# ---------------------------------------------------------------------------
# checkpoint store
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# the generic runner
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# Mg II h&k database
# ---------------------------------------------------------------------------
def _noise_sigma(intensity: np.ndarray) -> np.ndarray:
    """1σ photon + read noise of IRIS NUV spectra on the IRIS² grid [input units]."""
    from iris_lab import instrument

    dn = np.maximum(np.asarray(instrument.iris_intensity_to_dn(intensity, SIGMA_EXPTIME_S)),
                    1e-3)
    return intensity * np.asarray(instrument.iris_noise_sigma(dn)) / dn


def _node_hat(log_tau: np.ndarray, nodes: np.ndarray, k: int) -> np.ndarray:
    """Piecewise-linear basis function of node ``k`` evaluated at ``log_tau``."""
    values = np.zeros(nodes.size)
    values[k] = 1.0
    return np.interp(log_tau, nodes, values)


def rf_parameters() -> list[tuple[str, int, float, float]]:
    """``(quantity, node index, node log τ, step)`` of the finite differences.

    Nodes of the IRIS² parametrisation (Sainz Dalda et al. 2019): T 7
    (relative step 2 %), v_los 4 and v_turb 4 (1 km/s), and 4 nodes in
    log n_e (0.05 dex) at the velocity nodes.
    """
    from iris_lab.worlds import chromosphere as ch

    out: list[tuple[str, int, float, float]] = []
    out += [("temperature", k, float(x), 0.02) for k, x in enumerate(ch.T_NODES)]
    out += [("v_los", k, float(x), 1.0e5) for k, x in enumerate(ch.V_NODES)]
    out += [("v_turb", k, float(x), 1.0e5) for k, x in enumerate(ch.VTURB_NODES)]
    out += [("log_n_e", k, float(x), 0.05) for k, x in enumerate(ch.V_NODES)]
    return out


def perturb_node(atmosphere: Any, log_tau500: np.ndarray, index: int) -> Any:
    """The atmosphere with node ``index`` of :func:`rf_parameters` perturbed by its
    step, spread by a hat function in ``log_tau500`` (the atmosphere's own log τ500).

    Example
    -------
    >>> from iris_lab.atmosphere import Atmosphere
    >>> falc = Atmosphere.reference("falc")
    >>> log_tau = np.linspace(-9.0, 1.0, falc.n_depth)
    >>> hotter = perturb_node(falc, log_tau, 3)  # T node 3, +2 %
    >>> ratio = hotter.temperature / falc.temperature
    >>> bool(1.01 < ratio.max() <= 1.02), bool(ratio.min() == 1.0)
    (True, True)
    """
    params = rf_parameters()
    name, k, _, step = params[index]
    nodes = np.array([p[2] for p in params if p[0] == name])
    hat = _node_hat(log_tau500, nodes, k)
    if name == "temperature":
        return atmosphere.replace(temperature=atmosphere.temperature * (1 + step * hat))
    if name == "log_n_e":
        return atmosphere.replace(n_e=atmosphere.n_e * 10.0 ** (step * hat))
    if name == "v_turb":
        return atmosphere.replace(v_turb=atmosphere.v_turb + step * hat)
    return atmosphere.replace(v_los=atmosphere.v_los + step * hat)


def response_spectra(synth: Any, atmosphere: Any, solution: Any,
                     log_tau500: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Spectra of the node-perturbed atmospheres and of their paired reference.

    Each node of :func:`rf_parameters` is perturbed with a hat function in
    log τ500 and the NLTE problem is solved again, warm-started from
    ``solution`` (the entry's converged populations). The unperturbed
    atmosphere is solved again the same way: that *reference* and the
    perturbed solutions start from the same state and stop at the same
    tolerance, so their convergence errors largely cancel in the difference.
    Against ``solution`` itself they do not: a response of a few 0.1 % of the
    profile is below the ~0.4 % convergence error of one solve (measured on a
    coronal-hole entry against solves 5× tighter: differences with
    ``solution`` were off by 47–560 % of the response, paired differences by
    0.4–57 %, the worst at the weakest node; ``benchmarks/README.md``).

    Returns
    -------
    perturbed, reference
        ``(n_parameters, n_wavelength)`` (failed solves NaN) and
        ``(n_wavelength,)``, or ``None`` when the reference solve fails (the
        responses are then unusable).
    """
    params = rf_parameters()
    size = solution.spectra["mgii"].size
    out = np.full((len(params), size), np.nan)
    again = synth.solve(atmosphere, warm_start=solution)
    if not again.converged:
        return out, None
    for j in range(len(params)):
        sol = synth.solve(perturb_node(atmosphere, log_tau500, j), warm_start=solution)
        if sol.converged:
            out[j] = sol.spectra["mgii"].values
    return out, again.spectra["mgii"].values


def sigma_from_responses(profile: np.ndarray, perturbed: np.ndarray,
                         temperature_grid: np.ndarray,
                         grid: np.ndarray) -> dict[str, np.ndarray]:
    """σ on ``grid`` from finite-difference RFs, eq. 2 of Sainz Dalda et al. (2019).

    With R_p(λ) = (I_p(λ) − I(λ)) / Δp on the IRIS grid,

        σ_p² = 2 / (n + m) · Σ_λ ε(λ)² / Σ_λ R_p(λ)²,

    m wavelengths, n node parameters, and ε the residual, here the photon +
    read noise of an 8 s IRIS NUV exposure (a database entry fits itself; the
    noise is the residual an observation of it would leave). σ at the nodes
    is interpolated linearly in log τ onto ``grid``; a temperature σ from the
    relative step is converted to K with the entry's temperature at the node.

    Parameters
    ----------
    profile
        IRIS-degraded profile, (m,).
    perturbed
        IRIS-degraded perturbed profiles, (n, m) in :func:`rf_parameters` order.
    temperature_grid
        The entry's temperature on ``grid``.
    """
    params = rf_parameters()
    noise2 = np.sum(_noise_sigma(profile) ** 2)
    n_par, m = len(params), profile.size
    per_name: dict[str, tuple[list[float], list[float]]] = {}
    for j, (name, _, x, step) in enumerate(params):
        response = (perturbed[j] - profile) / step
        sigma = np.sqrt(2.0 / (n_par + m) * noise2 / max(float(np.sum(response**2)), 1e-300))
        if name == "temperature":
            sigma *= float(np.interp(x, grid, temperature_grid))
        xs, vs = per_name.setdefault(name, ([], []))
        xs.append(x)
        vs.append(sigma if np.isfinite(sigma) else np.nan)
    out = {}
    for name, (xs, vs) in per_name.items():
        x, v = np.asarray(xs), np.asarray(vs)
        good = np.isfinite(v)
        out[name] = (np.interp(grid, x[good], v[good]) if good.sum() >= 2
                     else np.full(grid.size, np.nan))
    return out


def mgii_chunk(payload: dict[str, Any]) -> Any:
    """Solve one chunk of the Mg II database (runs on a worker).

    ``payload``: ``entries`` (global ids), ``fields`` (atmosphere arrays,
    (n, depth)), ``family``, ``synth`` (NLTESynthesizer parameters),
    ``rf`` (bool per entry: compute finite-difference responses).
    The full-resolution spectra are stored; the instrument and the σ are
    applied at export (:func:`export`).
    """
    import xarray as xr

    from iris_lab.atmosphere import Atmosphere
    from iris_lab.synthesis.nlte import IRIS2_LOG_TAU, NLTESynthesizer, to_log_tau_grid

    synth = NLTESynthesizer(**payload["synth"])
    atms = Atmosphere(**payload["fields"], scale=payload.get("scale", "height"))
    entries = np.asarray(payload["entries"])
    n, n_depth = entries.size, atms.n_depth
    grid = IRIS2_LOG_TAU
    names = ("temperature", "v_los", "v_turb", "n_e", "p_gas", "rho")
    model = {k: np.full((n, grid.size), np.nan) for k in names}
    n_rf = len(rf_parameters())
    spectra = None
    rf_spectra = None
    wavelength = None
    log_tau500 = np.full((n, n_depth), np.nan)
    converged = np.zeros(n, bool)
    has_rf = np.zeros(n, bool)
    paired = np.zeros(n, bool)
    iterations = np.full(n, -1)
    seconds = np.zeros(n)
    rf_seconds = np.zeros(n)
    message = np.array([""] * n, dtype=object)
    previous = None
    for i in range(n):
        atm = atms[i]
        try:
            sol = synth.solve(atm, warm_start=previous)
            converged[i], iterations[i], seconds[i] = sol.converged, sol.iterations, sol.seconds
            message[i] = sol.message
            if not sol.converged:
                continue
            previous = sol
            spec = sol.spectra["mgii"]
            if spectra is None:
                wavelength = spec["wavelength"].values
                spectra = np.full((n, wavelength.size), np.nan)
                rf_spectra = np.full((n, n_rf, wavelength.size), np.nan)
            spectra[i] = spec.values
            log_tau500[i] = sol.log_tau500
            fitted = to_log_tau_grid(atm, sol.log_tau500, grid)
            for k in names:
                if k in fitted:
                    model[k][i] = fitted[k]
            if payload["rf"][i]:
                t0 = time.perf_counter()
                perturbed, reference = response_spectra(synth, atm, sol, sol.log_tau500)
                rf_seconds[i] = time.perf_counter() - t0
                if reference is not None:
                    # stored against the entry's own spectrum: rf_spectrum − spectrum
                    # is the paired difference perturbed − reference
                    rf_spectra[i] = perturbed + (spectra[i] - reference)[None, :]
                    has_rf[i] = paired[i] = bool(np.all(np.isfinite(rf_spectra[i])))
        except Exception as err:  # noqa: BLE001 - flag the entry, keep the chunk
            converged[i] = False
            message[i] = f"{type(err).__name__}: {err}"
    if spectra is None:  # nothing converged in this chunk
        lo, hi = 2790.0, 2810.0
        wavelength = np.linspace(lo, hi, int(round((hi - lo) / synth.step_aa)) + 1)
        spectra = np.full((n, wavelength.size), np.nan)
        rf_spectra = np.full((n, n_rf, wavelength.size), np.nan)
    f32 = np.float32
    dims2 = ("entry", "log_tau")
    units = {"temperature": "K", "v_los": "cm / s", "v_turb": "cm / s", "n_e": "1 / cm3",
             "p_gas": "dyn / cm2", "rho": "g / cm3"}
    data_vars: dict[str, Any] = {
        "spectrum": (("entry", "wl_fine"), spectra.astype(f32),
                     {"units": "erg / (s cm2 sr Angstrom)", "mu": synth.mu}),
        "rf_spectrum": (("entry", "rf_parameter", "wl_fine"), rf_spectra.astype(f32),
                        {"units": "erg / (s cm2 sr Angstrom)"}),
        "log_tau500": (("entry", "depth"), log_tau500.astype(f32)),
        "converged": ("entry", converged),
        "rf_done": ("entry", has_rf),
        "rf_paired": ("entry", paired, {"description": "rf_spectrum - spectrum is the "
                                        "difference to a paired reference solve"}),
        "family": ("entry", np.asarray(payload["family"]).astype(str)),
        "iterations": ("entry", iterations.astype(np.int32)),
        "solve_seconds": ("entry", seconds.astype(f32), {"units": "s"}),
        "rf_seconds": ("entry", rf_seconds.astype(f32), {"units": "s"}),
        "message": ("entry", message.astype(str)),
    }
    for k in names:
        data_vars[k] = (dims2, model[k].astype(f32), {"units": units[k]})
    params = rf_parameters()
    coords = {"entry": entries,
              "wl_fine": ("wl_fine", wavelength, {"units": "Angstrom", "medium": "vacuum"}),
              "log_tau": ("log_tau", grid, {"units": "", "long_name": "log10 tau500"}),
              "rf_parameter": ("rf_parameter", [f"{p[0]}_{p[1]}" for p in params])}
    return xr.Dataset(data_vars, coords=coords)


def mgii_reference_chunk(payload: dict[str, Any]) -> Any:
    """Paired references for a chunk whose response spectra were stored unpaired.

    Chunks written before the responses were paired (:func:`response_spectra`)
    hold perturbed spectra warm-started from each entry's solution, but no
    reference solved the same way. The chunk's warm-start chain is solved
    again, exactly as :func:`mgii_chunk` did, up to the last such entry; each
    entry's solution is checked against its stored spectrum
    (``chain_mismatch``, the largest difference relative to the profile's
    maximum: a reproduced chain is exact to the float32 storage) and the
    reference is solved from it.

    ``payload``: a :func:`make_tasks` payload plus ``need`` (bool per entry)
    and ``stored`` (the stored spectra, (n, n_wavelength)).
    """
    import xarray as xr

    from iris_lab.atmosphere import Atmosphere
    from iris_lab.synthesis.nlte import NLTESynthesizer

    synth = NLTESynthesizer(**payload["synth"])
    atms = Atmosphere(**payload["fields"], scale=payload.get("scale", "height"))
    need = np.asarray(payload["need"], bool)
    stored = np.asarray(payload["stored"], dtype=np.float64)
    picked = np.flatnonzero(need)
    reference = np.full((picked.size, stored.shape[-1]), np.nan)
    mismatch = np.full(picked.size, np.inf)
    seconds = np.zeros(picked.size)
    previous = None
    t0 = time.perf_counter()
    for i in range(int(picked.max()) + 1 if picked.size else 0):
        try:
            sol = synth.solve(atms[i], warm_start=previous)
        except Exception:  # noqa: BLE001 - as in mgii_chunk: the chain goes on
            continue
        if not sol.converged:
            continue
        previous = sol
        if need[i]:
            j = int(np.searchsorted(picked, i))
            spectrum = sol.spectra["mgii"].values
            mismatch[j] = float(np.max(np.abs(spectrum - stored[i]))
                                / np.max(np.abs(stored[i])))
            again = synth.solve(atms[i], warm_start=sol)
            if again.converged:
                reference[j] = again.spectra["mgii"].values
            seconds[j] = time.perf_counter() - t0
            t0 = time.perf_counter()
    return xr.Dataset(
        {"reference_spectrum": (("entry", "wl_fine"), reference.astype(np.float32)),
         "chain_mismatch": ("entry", mismatch.astype(np.float32)),
         "solve_seconds": ("entry", seconds.astype(np.float32), {"units": "s"}),
         "converged": ("entry", np.isfinite(reference).all(-1))},
        coords={"entry": np.asarray(payload["entries"])[picked]})


# ---------------------------------------------------------------------------
# flare set
# ---------------------------------------------------------------------------
def flare_chunk(payload: dict[str, Any]) -> Any:
    """Solve one flare sequence (Hα + Ca II 8542, warm-started along time)."""
    import xarray as xr

    from iris_lab.atmosphere import Atmosphere
    from iris_lab.synthesis.nlte import NLTESynthesizer

    synth = NLTESynthesizer(**payload["synth"])
    atms = Atmosphere(**payload["fields"], scale="height")
    samples = np.asarray(payload["samples"])
    n = samples.size
    fine: dict[str, np.ndarray] = {}
    offsets: dict[str, np.ndarray] = {}
    converged = np.zeros(n, bool)
    iterations = np.full(n, -1)
    seconds = np.zeros(n)
    message = np.array([""] * n, dtype=object)
    previous = None
    for i in range(n):
        try:
            sol = synth.solve(atms[i], warm_start=previous)
            converged[i], iterations[i], seconds[i] = sol.converged, sol.iterations, sol.seconds
            message[i] = sol.message
            if not sol.converged:
                continue
            previous = sol
            for line in ("halpha", "ca8542"):
                spec = sol.spectra[line]
                if line not in fine:
                    offsets[line] = spec["offset"].values
                    fine[line] = np.full((n, spec.size), np.nan)
                fine[line][i] = spec.values
        except Exception as err:  # noqa: BLE001 - flag the sample, keep the sequence
            converged[i] = False
            message[i] = f"{type(err).__name__}: {err}"
    for line in ("halpha", "ca8542"):
        if line not in fine:
            half = 2.5
            offsets[line] = np.round(np.linspace(-half, half, int(2 * half / synth.step_aa) + 1), 6)
            fine[line] = np.full((n, offsets[line].size), np.nan)
    units = "erg / (s cm2 sr Angstrom)"
    f32 = np.float32
    fields = payload["fields"]
    data_vars = {
        "temperature": (("sample", "height"), fields["temperature"].astype(f32), {"units": "K"}),
        "n_e": (("sample", "height"), fields["n_e"].astype(f32), {"units": "1 / cm3"}),
        "v_los": (("sample", "height"), fields["v_los"].astype(f32),
                  {"units": "cm / s", "long_name": "line-of-sight velocity, positive = downflow"}),
        "halpha_fine": (("sample", "off_halpha"), fine["halpha"].astype(f32),
                        {"units": units, "mu": synth.mu}),
        "ca8542_fine": (("sample", "off_ca8542"), fine["ca8542"].astype(f32),
                        {"units": units, "mu": synth.mu}),
        "converged": ("sample", converged),
        "sequence": ("sample", np.asarray(payload["sequence"], dtype=np.int32)),
        "step": ("sample", np.asarray(payload["step"], dtype=np.int32)),
        "iterations": ("sample", iterations.astype(np.int32)),
        "solve_seconds": ("sample", seconds.astype(f32), {"units": "s"}),
        "message": ("sample", message.astype(str)),
    }
    for k, v in payload["beam"].items():
        data_vars[k] = ("sample", np.asarray(v, dtype=f32))
    coords = {"sample": samples,
              "height": ("height", np.asarray(payload["height"], dtype=np.float64),
                         {"units": "cm", "long_name": "height grid of the sequence"}),
              "off_halpha": ("off_halpha", offsets["halpha"], {"units": "Angstrom"}),
              "off_ca8542": ("off_ca8542", offsets["ca8542"], {"units": "Angstrom"})}
    return xr.Dataset(data_vars, coords=coords)


# ---------------------------------------------------------------------------
# process isolation
# ---------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------
# specifications, tasks and export
# ---------------------------------------------------------------------------
def default_synth(kind: Kind) -> dict[str, Any]:
    """NLTE set-up of each build (see benchmarks/README.md for the accuracy).

    Mg II database: angle-averaged PRD, 3 rays (0.6x the work of 5 rays; the
    IRIS-degraded profiles differ by < 0.1 % of I(k2v) on FAL-C and plage), no
    Ng acceleration (Ng made the PRD iteration oscillate). Mg II held-out
    atmospheres: the 5-ray reference set-up, so that the validation of the
    look-up and of the networks includes the set-up error of the database.
    Hα + Ca II 8542: CRD, 3 rays (0.14 % from 5 rays on FAL-C), Ng (~3× fewer
    iterations); a failed solve is retried cold, then with 5 rays.
    """
    if kind == "flare":
        return {"problem": "halpha_ca8542", "prd": False, "n_rays": 3, "mu": 1.0,
                "mgii_atom": "full", "electrons": "given", "hydrostatic": False,
                "max_iter": 300, "j_tol": 5e-3, "pops_tol": 1e-3, "ng": True, "step_aa": 0.01,
                "t_max": None, "retry": True}
    return {"problem": "mgii", "prd": True, "n_rays": 3 if kind == "mgii" else 5, "mu": 1.0,
            "mgii_atom": "full", "electrons": "given", "hydrostatic": False, "max_iter": 300,
            "j_tol": 5e-3, "pops_tol": 1e-3, "ng": False, "step_aa": 0.01, "t_max": None,
            "retry": True}


def make_spec(kind: Kind, n: int, *, seed: int | None = None, chunk_size: int | None = None,
              synth: dict[str, Any] | None = None, rf_fraction: float = 0.1) -> dict[str, Any]:
    """The build specification stored with the checkpoints."""
    if kind not in ("mgii", "mgii_heldout", "flare"):
        raise ValueError(f"kind must be 'mgii', 'mgii_heldout' or 'flare', not {kind!r}")
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer, not {n!r}")
    default_chunk = FLARE_STEPS if kind == "flare" else 4
    return {"kind": kind, "n": int(n), "seed": int(SEEDS[kind] if seed is None else seed),
            "chunk_size": int(chunk_size or default_chunk),
            "synth": synth or default_synth(kind),
            "rf_fraction": float(rf_fraction if kind == "mgii" else 0.0)}


def make_tasks(spec: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """``(chunk_id, payload)`` in the seeded processing order."""
    kind, n, seed, size = spec["kind"], spec["n"], spec["seed"], spec["chunk_size"]
    rng = np.random.default_rng(seed + 7)
    if kind == "flare":
        from iris_lab.worlds.flare import flare_height_grid, sample_flare_sequences

        n_seq = int(np.ceil(n / size))
        atm, beam = sample_flare_sequences(n_seq, size, seed=seed)
        height = flare_height_grid()
        tasks = []
        for s in range(n_seq):
            sub = atm[s]
            fields = {k: np.asarray(v) for k, v in sub.fields().items()}
            beam_s = {}
            for name in ("flux", "e_cut", "delta"):
                if name in beam:
                    arr = np.asarray(beam[name].values, dtype=float)
                    arr = arr[s] if arr.ndim >= 1 and arr.shape[0] == n_seq else arr
                    beam_s[name] = np.broadcast_to(arr, (size,)).copy()
            tasks.append((s, {"samples": s * size + np.arange(size), "fields": fields,
                              "sequence": np.full(size, s), "step": np.arange(size),
                              "beam": beam_s, "height": height, "synth": spec["synth"]}))
        order = rng.permutation(len(tasks))
        return [tasks[i] for i in order]

    from iris_lab.worlds.chromosphere import sample_mgii_atmospheres

    atm, family = sample_mgii_atmospheres(n, seed=seed)
    rf = rng.random(n) < spec["rf_fraction"]
    tasks = []
    for c, start in enumerate(range(0, n, size)):
        idx = np.arange(start, min(start + size, n))
        sub = atm[idx[0]:idx[-1] + 1]
        fields = {k: np.asarray(v) for k, v in sub.fields().items()}
        tasks.append((c, {"entries": idx, "fields": fields, "family": family[idx],
                          "rf": rf[idx], "synth": spec["synth"], "scale": atm.scale}))
    order = rng.permutation(len(tasks))
    return [tasks[i] for i in order]


def _rf_draws(spec: dict[str, Any]) -> np.ndarray:
    """The seeded uniform draws of a Mg II build: entry ``i`` gets exact response
    functions when ``u[i] < rf_fraction`` (the first draws of :func:`make_tasks`)."""
    return np.random.default_rng(spec["seed"] + 7).random(spec["n"])


def rf_topup_spec(base: dict[str, Any]) -> dict[str, Any]:
    """Specification of the response-function top-up store of a Mg II database.

    The seeded ``rf_fraction`` of a build gives a random count of entries with
    exact response functions (90 of 1000 for the shipped seed), fewer still
    when some of them do not converge. Once the database is complete, the
    top-up solves again, with response functions, the converged entries whose
    uniform draws come next (:func:`rf_topup_entries`): what a larger
    ``rf_fraction`` would have chosen, without rebuilding what is solved. Its
    chunks are single entries keyed by the entry id, so asking for more later
    only adds chunks (:func:`merge_rf_topup` merges them at export).

    Example
    -------
    >>> rf_topup_spec(make_spec("mgii", 1000))["kind"]
    'mgii_rf'
    """
    if base.get("kind") != "mgii":
        raise ValueError("a response-function top-up needs a 'mgii' database specification")
    return {"kind": "mgii_rf", "base": json.loads(json.dumps(base))}


def rf_topup_entries(base: dict[str, Any], n_exact: int, *, exact: np.ndarray | None = None,
                     tried: np.ndarray | None = None,
                     eligible: np.ndarray | None = None) -> np.ndarray:
    """The next entries to solve again with response functions, in the order of
    the seeded uniform draws above ``rf_fraction``, as many as bring the entries
    with exact responses to ``n_exact``.

    Parameters
    ----------
    base
        The database specification.
    n_exact
        Entries with exact response functions wanted.
    exact, tried, eligible
        Boolean arrays over the ``n`` entries: entries with exact responses now
        (default: the seeded choice, as planned), entries the top-up has
        already attempted (never chosen again), entries that may be chosen
        (default: all; at run time the converged ones).

    Example
    -------
    >>> rf_topup_entries(make_spec("mgii", 1000), 105).size
    15
    """
    n = base["n"]
    u = _rf_draws(base)
    seeded = u < base["rf_fraction"]
    exact = seeded if exact is None else np.asarray(exact, bool)
    tried = np.zeros(n, bool) if tried is None else np.asarray(tried, bool)
    eligible = np.ones(n, bool) if eligible is None else np.asarray(eligible, bool)
    candidates = np.flatnonzero(eligible & ~seeded & ~exact & ~tried)
    k = max(0, int(n_exact) - int(exact.sum()))
    return np.sort(candidates[np.argsort(u[candidates], kind="stable")[:k]])


def rf_topup_tasks(spec: dict[str, Any], entries: np.ndarray) -> list[tuple[int, dict[str, Any]]]:
    """Chunks of the top-up: one entry each (an isolated cold start, not a warm
    start from an unrelated atmosphere), keyed by the entry id."""
    from iris_lab.worlds.chromosphere import sample_mgii_atmospheres

    base = spec["base"]
    entries = np.asarray(entries, dtype=int)
    if entries.size == 0:
        return []
    atm, family = sample_mgii_atmospheres(base["n"], seed=base["seed"])
    fields = atm.fields()
    return [(int(e), {"entries": np.array([e]),
                      "fields": {k: np.asarray(v)[[e]] for k, v in fields.items()},
                      "family": family[[e]], "rf": np.ones(1, bool), "synth": base["synth"],
                      "scale": atm.scale}) for e in entries]


#: Largest relative difference between a re-solved chain entry and its stored
#: spectrum for which the entry's responses are paired with the new reference
#: (the chain is deterministic: reproduced entries agree to the float32 storage).
CHAIN_MATCH_TOLERANCE = 1e-5


def rf_reference_spec(base: dict[str, Any]) -> dict[str, Any]:
    """Specification of the store of paired references (:func:`mgii_reference_chunk`)
    for a Mg II database whose older chunks hold unpaired responses.

    Example
    -------
    >>> rf_reference_spec(make_spec("mgii", 1000))["kind"]
    'mgii_rf_reference'
    """
    if base.get("kind") != "mgii":
        raise ValueError("paired references need a 'mgii' database specification")
    return {"kind": "mgii_rf_reference", "base": json.loads(json.dumps(base))}


def rf_reference_store_path(store: str | Path) -> Path:
    """Where the paired references of a store go: ``<name>_ref.parts``."""
    store = Path(store)
    return store.with_name(store.stem + "_ref" + store.suffix)


def rf_reference_tasks(main: CheckpointStore) -> list[tuple[int, dict[str, Any]]]:
    """Chunks of ``main`` with converged entries whose responses are unpaired
    (written before :func:`response_spectra` paired them), as
    :func:`mgii_reference_chunk` payloads keyed by the main chunk id; chunks
    imported from another set-up (:meth:`CheckpointStore.import_chunks`) are
    replayed with that set-up."""
    import xarray as xr

    tasks = dict(make_tasks(main.spec))
    setup_of = {int(c): record["synth"] for record in main.imported()
                for c in record.get("chunks", []) if record.get("synth")}
    out = []
    for path in iter_chunk_files(main.path):
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            if "rf_paired" in ds:
                continue
            need = ds["rf_done"].values.astype(bool) & ds["converged"].values.astype(bool)
            if not need.any():
                continue
            cid = int(path.stem.split("_")[-1])
            payload = dict(tasks[cid])
            if not np.array_equal(payload["entries"], ds["entry"].values):
                raise ValueError(f"chunk {cid} of {main.path} holds other entries than its task")
            payload.update(need=need, stored=ds["spectrum"].values)
            if cid in setup_of:  # imported from a store with another set-up: replay that
                payload["synth"] = setup_of[cid]
            out.append((cid, payload))
    return out


def merge_rf_references(ds: Any, references: Any) -> tuple[Any, dict[str, str]]:
    """Pair the unpaired responses of a loaded Mg II store with their references.

    For every entry whose chain was reproduced (``chain_mismatch`` below
    :data:`CHAIN_MATCH_TOLERANCE`) and whose reference converged,
    ``rf_spectrum`` is shifted by ``spectrum − reference``, so that
    ``rf_spectrum − spectrum`` is the paired difference, and ``rf_paired`` is
    set.
    """
    good = (references["converged"].values.astype(bool)
            & (references["chain_mismatch"].values < CHAIN_MATCH_TOLERANCE))
    where = {int(e): i for i, e in enumerate(ds["entry"].values)}
    rf = ds["rf_spectrum"].values.copy()
    paired = ds["rf_paired"].values.astype(bool).copy()
    merged = 0
    for j, entry in enumerate(references["entry"].values):
        i = where.get(int(entry))
        if i is None or paired[i] or not good[j] or not ds["rf_done"].values[i]:
            continue
        shift = ds["spectrum"].values[i] - references["reference_spectrum"].values[j]
        rf[i] = rf[i] + shift[None, :]
        paired[i] = True
        merged += 1
    ds["rf_spectrum"] = (ds["rf_spectrum"].dims, rf, ds["rf_spectrum"].attrs)
    ds["rf_paired"] = (ds["rf_paired"].dims, paired)
    return ds, {"rf_references_merged": str(merged),
                "rf_references_rejected": str(int((~good).sum())),
                "rf_references_seconds": f"{float(references['solve_seconds'].sum()):.0f}"}


def _entry_flags(store: CheckpointStore, n: int, references: CheckpointStore | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(present, converged, paired responses done) over the ``n`` entries of a
    store; unpaired responses count when ``references`` pairs them."""
    import xarray as xr

    present, converged, done = (np.zeros(n, bool) for _ in range(3))
    paired = np.zeros(n, bool)
    if references is not None:
        for path in iter_chunk_files(references.path):
            with xr.open_dataset(path, engine="h5netcdf") as ds:
                ok = (ds["converged"].values.astype(bool)
                      & (ds["chain_mismatch"].values < CHAIN_MATCH_TOLERANCE))
                paired[ds["entry"].values.astype(int)[ok]] = True
    for path in iter_chunk_files(store.path):
        with xr.open_dataset(path, engine="h5netcdf") as ds:
            e = ds["entry"].values.astype(int)
            present[e] = True
            converged[e] = ds["converged"].values.astype(bool)
            own = ds["rf_paired"].values.astype(bool) if "rf_paired" in ds else False
            done[e] = ds["rf_done"].values.astype(bool) & converged[e] & (own | paired[e])
    return present, converged, done


def rf_topup_plan(main: CheckpointStore, topup: CheckpointStore, n_exact: int,
                  references: CheckpointStore | None = None) -> np.ndarray:
    """Entries the top-up still has to solve for ``n_exact`` exact entries in all,
    from what the stores hold (entries that failed in the top-up are not
    tried again; the next draws take their place). Responses count when
    paired, in the main store itself or by ``references``."""
    n = main.spec["n"]
    _, converged, done = _entry_flags(main, n, references)
    tried, _, top_done = _entry_flags(topup, n)
    return rf_topup_entries(main.spec, n_exact, exact=done | (top_done & converged),
                            tried=tried, eligible=converged)


def merge_rf_topup(ds: Any, topup: Any) -> tuple[Any, dict[str, str]]:
    """Put the top-up's response spectra into a loaded Mg II store.

    For each entry solved again with response functions (converged, all
    responses finite) the perturbed spectra are shifted by the difference of
    the two reference solutions, so that perturbed − reference is the top-up's
    own: the σ of :func:`sigma_from_responses` (the instrument is linear) then
    comes from one consistent pair of solutions.

    Returns
    -------
    dataset, info
        ``ds`` with ``rf_spectrum``, ``rf_done`` and ``rf_seconds`` updated, and
        attributes for the export (entries merged, top-up solve time).
    """
    for coord in ("wl_fine", "rf_parameter"):
        if not np.array_equal(ds[coord].values, topup[coord].values):
            raise ValueError(f"the top-up's {coord} differs from the database's")
    good = topup["converged"].values.astype(bool) & topup["rf_done"].values.astype(bool)
    top = topup.isel(entry=np.flatnonzero(good))
    where = {int(e): i for i, e in enumerate(ds["entry"].values)}
    rf = ds["rf_spectrum"].values.copy()
    done = ds["rf_done"].values.astype(bool).copy()
    paired = (ds["rf_paired"].values.astype(bool).copy() if "rf_paired" in ds
              else np.zeros(done.size, bool))
    top_paired = (top["rf_paired"].values.astype(bool) if "rf_paired" in top
                  else np.zeros(top.sizes["entry"], bool))
    seconds = ds["rf_seconds"].values.copy()
    merged = 0
    for j, entry in enumerate(top["entry"].values):
        i = where.get(int(entry))
        if i is None or (done[i] and (paired[i] or not top_paired[j])):
            continue
        shift = ds["spectrum"].values[i] - top["spectrum"].values[j]
        rf[i] = top["rf_spectrum"].values[j] + shift[None, :]
        done[i] = True
        paired[i] = top_paired[j]
        seconds[i] = float(top["rf_seconds"].values[j] + top["solve_seconds"].values[j])
        merged += 1
    ds["rf_spectrum"] = (ds["rf_spectrum"].dims, rf, ds["rf_spectrum"].attrs)
    ds["rf_done"] = (ds["rf_done"].dims, done)
    ds["rf_paired"] = (ds["rf_done"].dims, paired)
    ds["rf_seconds"] = (ds["rf_seconds"].dims, seconds, ds["rf_seconds"].attrs)
    total = float(topup["solve_seconds"].sum() + topup["rf_seconds"].sum())
    return ds, {"rf_topup_entries": str(merged),
                "rf_topup_seconds": f"{total:.0f}",
                "rf_topup": "entries after the seeded rf_fraction in the order of the same "
                            "uniform draws, solved again with response functions"}


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
    """Apply a 1-D instrument function to every row (NaN rows stay NaN)."""
    out = None
    for i, row in enumerate(values):
        result = np.asarray(fn(row), dtype=np.float64)
        if out is None:
            out = np.full((values.shape[0], result.size), np.nan)
        out[i] = result if np.all(np.isfinite(row)) else np.nan
    return out if out is not None else np.zeros((0, 0))


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
    for i in np.flatnonzero(usable):
        perturbed = _apply_rows(degrade, ds["rf_spectrum"].values[i].astype(np.float64))
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


def export(store: CheckpointStore, out: str | Path, *, command: str | None = None,
           fill_sigma: bool = True, rf_topup: CheckpointStore | None = None,
           rf_references: CheckpointStore | None = None) -> Path:
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
    Only paired responses give exact σ.
    """
    spec = store.spec
    dim = "sample" if spec["kind"] == "flare" else "entry"
    ds = store.load(dim, defaults={"rf_paired": False} if spec["kind"] == "mgii" else None)
    n_total = ds.sizes[dim]
    keep = ds["converged"].values.astype(bool)
    ds = ds.isel({dim: np.flatnonzero(keep)})
    ds = ds.drop_vars([v for v in ("message",) if v in ds])
    attrs = provenance(spec, command)
    attrs.update({"n_solved": str(n_total), "n_not_converged": str(int(n_total - keep.sum())),
                  "n_kept": str(int(keep.sum())),
                  "solve_seconds_total": f"{float(ds['solve_seconds'].sum()):.0f}"})
    for record in store.imported():
        setup = record.get("synth") or {}
        attrs["chunks_from_other_setup"] = (
            f"chunks {record['chunks']} solved with n_rays={setup.get('n_rays')}, "
            f"prd={setup.get('prd')}: {record.get('note', '')}")
    if spec["kind"] == "flare":
        ds = _export_flare(ds)
        seqs = np.unique(ds["sequence"].values)
        rng = np.random.default_rng(spec["seed"] + 11)
        all_seq = np.arange(int(np.ceil(spec["n"] / spec["chunk_size"])))
        held = set(rng.choice(all_seq, size=max(1, round(0.2 * all_seq.size)), replace=False))
        ds["held_out"] = (dim, np.array([s in held for s in ds["sequence"].values]))
        ds["held_out"].attrs["description"] = "20% of the sequences, seeded, whole sequences"
        attrs.update({"line_centre_halpha_vacuum_aa": "6564.61",
                      "line_centre_halpha_air_aa": "6562.80",
                      "line_centre_ca8542_vacuum_aa": "8544.44",
                      "line_centre_ca8542_air_aa": "8542.09",
                      "n_sequences": str(seqs.size)})
    else:
        if rf_references is not None and any(iter_chunk_files(rf_references.path)):
            if rf_references.spec.get("base") != store.spec:
                raise ValueError("the paired references belong to another build")
            ds, info = merge_rf_references(ds, rf_references.load("entry"))
            attrs.update(info)
        if rf_topup is not None and any(rf_topup.path.glob("chunk_*.nc")):
            if rf_topup.spec.get("base") != store.spec:
                raise ValueError("the response-function top-up belongs to another build")
            ds, info = merge_rf_topup(ds, rf_topup.load("entry", defaults={"rf_paired": False}))
            attrs.update(info)
        ds, info = _export_mgii(ds)
        attrs.update(info)
        if fill_sigma:
            ds, info = fill_sigma_regression(ds)
            attrs.update(info)
    ds.attrs = attrs
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    encoding = {v: {"zlib": True, "complevel": 4} for v in ds.data_vars
                if ds[v].dtype.kind == "f"}
    ds.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
    os.replace(tmp, out)
    return out


def fill_sigma_regression(ds: Any, *, seed: int = 0) -> tuple[Any, dict[str, str]]:
    """Fill σ where exact response functions are missing, by ridge regression.

    The regression maps (log T, v_los, v_turb, log n_e on the log τ grid, and
    the log of the IRIS profile) to log σ of each quantity; it is fitted on
    the entries with exact σ. Its error is the median absolute error in dex
    under leave-one-out (K-fold, 5 folds) cross-validation on those entries.
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    exact = ds["rf_exact"].values.astype(bool)
    info = {"sigma_exact_entries": str(int(exact.sum()))}
    if exact.sum() < 5:
        info["sigma_fill"] = "none (fewer than 5 entries with exact response functions)"
        return ds, info
    x = np.concatenate([
        np.log10(ds["temperature"].values), ds["v_los"].values / 1e5,
        ds["v_turb"].values / 1e5, np.log10(ds["n_e"].values),
        np.log10(np.maximum(ds["profile"].values, 1e-30)),
    ], axis=1).astype(np.float64)
    errors = []
    for name in ("temperature", "v_los", "v_turb", "log_n_e"):
        var = f"sigma_{name}"
        y = np.log10(np.maximum(ds[var].values.astype(np.float64), 1e-30))
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
        folds = KFold(n_splits=min(5, int(exact.sum())), shuffle=True, random_state=seed)
        predicted = cross_val_predict(model, x[exact], y[exact], cv=folds)
        err = float(np.median(np.abs(predicted - y[exact])))
        errors.append(f"{name}: {err:.3f} dex")
        model.fit(x[exact], y[exact])
        filled = ds[var].values.copy()
        filled[~exact] = (10.0 ** model.predict(x[~exact])).astype(filled.dtype)
        ds[var] = (ds[var].dims, filled, ds[var].attrs)
    info["sigma_fill"] = ("ridge regression of log sigma on the model and log profile, "
                          "fitted on the entries with exact RFs")
    info["sigma_fill_error_cv_median_abs"] = "; ".join(errors)
    return ds, info


def build_database(kind: Kind, n: int, out: str | Path, *, scheduler: str | None = None,
                   workers: int | None = None, seed: int | None = None,
                   chunk_size: int | None = None, store: str | Path | None = None,
                   synth: dict[str, Any] | None = None, rf_fraction: float = 0.1,
                   time_limit_s: float | None = None, progress: bool = True,
                   processes: bool = True, command: str | None = None,
                   export_file: bool = True, rf_min: int | None = None) -> Path:
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

    Example
    -------
    >>> build_database("mgii", 1000, "iris_lab/data/mgii_database.nc")  # doctest: +SKIP
    """
    spec = make_spec(kind, n, seed=seed, chunk_size=chunk_size, synth=synth,
                     rf_fraction=rf_fraction)
    out = Path(out)
    store_path = Path(store) if store else Path("build") / f"{out.stem}.parts"
    ckpt = CheckpointStore(store_path, spec)
    tasks = make_tasks(spec)
    report = run_chunks(tasks, flare_chunk_isolated if kind == "flare" else mgii_chunk_isolated,
                        ckpt,
                        scheduler=scheduler, workers=workers, processes=processes,
                        time_limit_s=time_limit_s, progress=progress)
    ckpt.log({"status": "run", "done": len(report.done), "failed": len(report.failed),
              "skipped": len(report.skipped), "seconds": round(report.seconds, 1)})
    topup = references = None
    if kind == "mgii" and rf_min:
        if not 0 < rf_min <= n:
            raise ValueError(f"rf_min must be in 1..{n}, not {rf_min}")
        path = rf_topup_store_path(store_path)
        complete = len(ckpt.done()) >= len(tasks) and not report.stopped_early
        if complete or path.exists():
            topup = CheckpointStore(path, rf_topup_spec(spec))
        ref_path = rf_reference_store_path(store_path)
        if complete or ref_path.exists():
            references = CheckpointStore(ref_path, rf_reference_spec(spec))
        start = time.monotonic()
        if complete:
            ref = run_chunks(rf_reference_tasks(ckpt), mgii_reference_chunk_isolated, references,
                             scheduler=scheduler, workers=workers, processes=processes,
                             time_limit_s=None if time_limit_s is None
                             else time_limit_s - report.seconds, progress=progress)
            references.log({"status": "paired references", "done": len(ref.done),
                            "failed": len(ref.failed), "seconds": round(ref.seconds, 1)})
            complete = not ref.stopped_early
        for _ in range(3 if complete else 0):  # entries that fail are replaced next round
            left = None if time_limit_s is None else \
                time_limit_s - report.seconds - (time.monotonic() - start)
            entries = rf_topup_plan(ckpt, topup, rf_min, references)
            if entries.size == 0 or (left is not None and left <= 0):
                break
            top = run_chunks(rf_topup_tasks(topup.spec, entries), mgii_chunk_isolated, topup,
                             scheduler=scheduler, workers=workers, processes=processes,
                             time_limit_s=left, progress=progress)
            topup.log({"status": "rf top-up", "done": len(top.done),
                       "failed": len(top.failed), "seconds": round(top.seconds, 1)})
            if top.stopped_early:
                break
    if export_file and ckpt.done():
        export(ckpt, out, command=command, rf_topup=topup, rf_references=references)
    return out


def rf_topup_store_path(store: str | Path) -> Path:
    """Where the response-function top-up of a store goes: ``<name>_rf.parts``."""
    store = Path(store)
    return store.with_name(store.stem + "_rf" + store.suffix)


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


def iter_chunk_files(store: str | Path) -> Iterable[Path]:
    """The chunk files of a store, in chunk order."""
    return sorted(Path(store).glob("chunk_*.nc"))


def cli_build_database(args: Any) -> int:
    """``iris-lab build-database`` (see :func:`build_database`)."""
    out = build_database(args.kind, args.n, args.out, scheduler=args.scheduler,
                         workers=args.workers, seed=args.seed, chunk_size=args.chunk_size,
                         store=args.store, time_limit_s=args.time_limit,
                         command="iris-lab " + " ".join(sys.argv[1:]))
    print(f"wrote {out}")
    return 0
