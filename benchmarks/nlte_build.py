"""NLTE build benchmarks: set-up speed vs accuracy, and dask scaling.

Part ``setups``: each Mg II set-up (PRD/CRD, rays, model atom, depth points,
Ng acceleration) against the full one (PRD, 5 rays, 10-level Mg II atom, all
depth points) on FAL-C and one plage atmosphere of the generator: solve time,
iterations, and the error of the IRIS-degraded profile (maximum over the
window and at k2v/k3, relative to the full set-up's k2v intensity).

Part ``scaling``: Hα + Ca II 8542 solves of perturbed FAL-C atmospheres,
chunked as in a build, with 1 and 2 local workers (atmospheres per hour,
scaling efficiency = rate(2) / (2 rate(1))), and the same run against a
scheduler address (a separately started scheduler with 2 workers).

Part ``responses``: accuracy of the finite-difference response functions of
the database's σ on one entry: the difference of a perturbed solve to the
entry's own solution (unpaired, as the builder did first) and to a reference
solved again like the perturbed ones (paired, ``builder.response_spectra``),
both against a pair of solves with 5× tighter tolerances; the error is
‖fd − ref‖ / ‖ref‖ within ±1 Å of k and h at full resolution.

Part ``overhead``: CPU taken by an idle 2-worker cluster (scheduler, client
and workers; chunks run for minutes, so this is what dask takes from the
solves) with dask's default settings and with the builder's
``QUIET_CLUSTER_CONFIG``, measured one after the other in the same run.

Run: ``OMP_NUM_THREADS=1 python benchmarks/nlte_build.py [setups|scaling|responses|overhead|all]``.
Timings depend on what else runs on the machine; the table prints the load.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _k_features(wl: np.ndarray, profile: np.ndarray) -> tuple[float, float]:
    """k2v and k3 intensities: maximum blue of k centre and minimum near centre."""
    k0 = 2796.35
    blue = (wl > k0 - 0.4) & (wl < k0)
    core = (wl > k0 - 0.15) & (wl < k0 + 0.15)
    return float(profile[blue].max()), float(profile[core].min())


def _decimate(atm):
    """Keep every depth point above log τ = -3 and every second one below."""
    from iris_lab.atmosphere import Atmosphere

    keep = np.flatnonzero((atm.log_tau < -3.0) | (np.arange(atm.n_depth) % 2 == 0))
    keep = np.union1d(keep, [atm.n_depth - 1])
    return Atmosphere(**{k: v[keep] for k, v in atm.fields().items()}, scale=atm.scale)


def setups() -> list[str]:
    from iris_lab import instrument
    from iris_lab.atmosphere import Atmosphere
    from iris_lab.synthesis.nlte import NLTESynthesizer
    from iris_lab.worlds.chromosphere import sample_mgii_atmospheres

    falc = Atmosphere.reference("falc")
    plage_all, fam = sample_mgii_atmospheres(12, seed=5, families=["plage"])
    plage = plage_all[0]
    variants = [
        ("PRD, 5 rays, full atom (reference, shipped build)", {"prd": True, "n_rays": 5},
         False),
        ("PRD, 3 rays", {"prd": True, "n_rays": 3}, False),
        ("PRD, 5 rays, every 2nd depth point below log tau=-3", {"prd": True, "n_rays": 5},
         True),
        ("PRD, 5 rays, MgII h&k-only atom", {"prd": True, "n_rays": 5, "mgii_atom": "hk"},
         False),
        ("CRD, 5 rays", {"prd": False, "n_rays": 5}, False),
        ("CRD, 3 rays, Ng", {"prd": False, "n_rays": 3, "ng": True}, False),
    ]
    rows = ["| atmosphere | set-up | iterations | solve [s] | max abs err / I(k2v) "
            "| k2v err | k3 err |", "|---|---|---|---|---|---|---|"]
    for name, atm in (("FAL-C", falc), ("plage #0", plage)):
        ref = None
        for label, kw, decimate in variants:
            synth = NLTESynthesizer("mgii", retry=False, **{"ng": False, **kw})
            sol = synth.solve(_decimate(atm) if decimate else atm)
            if not sol.converged:
                rows.append(f"| {name} | {label} | {sol.iterations} | {sol.seconds:.1f} | "
                            f"not converged: {sol.message[:60]} | | |")
                continue
            spec = sol.spectra["mgii"]
            wl = instrument.iris_mgii_wavelengths()
            prof = np.asarray(instrument.iris_degrade(spec["wavelength"].values, spec.values))
            k2, k3 = _k_features(wl, prof)
            if ref is None:
                ref = (prof, k2, k3)
                errs = ("—", "—", "—")
            else:
                errs = (f"{np.max(np.abs(prof - ref[0])) / ref[1]:.3f}",
                        f"{k2 / ref[1] - 1:+.3f}", f"{k3 / ref[2] - 1:+.3f}")
            rows.append(f"| {name} | {label} | {sol.iterations} | {sol.seconds:.1f} | "
                        f"{errs[0]} | {errs[1]} | {errs[2]} |")
            print(rows[-1], flush=True)
    return rows


def _scaling_tasks(n_chunks: int, per_chunk: int):
    from iris_lab.atmosphere import Atmosphere

    falc = Atmosphere.reference("falc")
    rng = np.random.default_rng(0)
    tasks = []
    for c in range(n_chunks):
        factor = 1.0 + 0.03 * rng.standard_normal((per_chunk, 1)) * np.exp(
            -((falc.log_tau + 4.0) / 1.5) ** 2)
        atms = falc.broadcast_to((per_chunk,))
        fields = {k: np.array(v) for k, v in atms.fields().items()}
        fields["temperature"] = fields["temperature"] * factor
        tasks.append((c, {"samples": np.arange(c * per_chunk, (c + 1) * per_chunk),
                          "fields": fields, "sequence": np.full(per_chunk, c),
                          "step": np.arange(per_chunk), "beam": {},
                          "height": falc.height,
                          "synth": {"problem": "halpha_ca8542", "prd": False, "n_rays": 3,
                                    "ng": True}}))
    return tasks


def scaling(n_chunks: int = 8, per_chunk: int = 2, repeats: int = 3) -> list[str]:
    """Atmospheres per hour with 1 and 2 local workers and through a scheduler
    address: one untimed warm-up run (imports, atom files, disk cache), then
    ``repeats`` rounds of the three runs in turn; medians (min–max)."""
    from iris_lab.builder import CheckpointStore, flare_chunk_isolated, local_cluster, run_chunks

    tasks = _scaling_tasks(n_chunks, per_chunk)
    n_atm = n_chunks * per_chunk
    configs = (("LocalCluster", 1, False), ("LocalCluster", 2, False),
               ("scheduler address", 2, True))
    walls: dict[tuple[str, int], list[float]] = {(label, w): [] for label, w, _ in configs}
    with tempfile.TemporaryDirectory() as tmp:
        def run(workers: int, scheduler: bool, todo, name: str) -> float:
            store = CheckpointStore(Path(tmp) / name, {"bench": name})
            cluster = local_cluster(workers) if scheduler else None
            t0 = time.perf_counter()
            run_chunks(todo, flare_chunk_isolated, store, workers=workers, progress=False,
                       scheduler=cluster.scheduler_address if cluster else None)
            wall = time.perf_counter() - t0
            if cluster is not None:
                cluster.close()
            return wall

        run(2, False, tasks[:2], "warm-up")
        for r in range(repeats):
            for label, workers, scheduler in configs:
                wall = run(workers, scheduler, tasks, f"{label}-{workers}-{r}")
                walls[(label, workers)].append(wall)
                print(f"round {r}: {label}, {workers} workers: {wall:.1f} s", flush=True)
    rows = [f"{n_atm} atmospheres ({n_chunks} chunks of {per_chunk}), {repeats} rounds; "
            "median (min–max); efficiency per round against that round's one-worker run",
            "| run | workers | wall [s] | atmospheres / hour | efficiency |",
            "|---|---|---|---|---|"]
    one = np.asarray(walls[("LocalCluster", 1)])
    for label, workers, _ in configs:
        w = np.asarray(walls[(label, workers)])
        med = float(np.median(w))
        per_round = one / (workers * w)  # each round against that round's one-worker run
        eff = (f"{np.median(per_round):.2f} ({per_round.min():.2f}–{per_round.max():.2f})"
               if workers > 1 else "—")
        rows.append(f"| {label} | {workers} | {med:.1f} ({w.min():.1f}–{w.max():.1f}) | "
                    f"{n_atm / med * 3600:.0f} | {eff} |")
    return rows


def main(argv: list[str]) -> None:
    which = argv[1] if len(argv) > 1 else "all"
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at start")
    if which in ("setups", "all"):
        print("\n".join(setups()))
    if which in ("scaling", "all"):
        print("\n".join(scaling()))
    if which in ("responses", "all"):
        print("\n".join(responses()))
    if which in ("overhead", "all"):
        print("\n".join(overhead()))
    print(f"load average {os.getloadavg()[0]:.1f} at end")


def responses(task: int = -1, parameters: tuple[int, ...] = (3, 9, 16, 13)) -> list[str]:
    """Unpaired and paired finite-difference responses against tight solves."""
    from iris_lab.atmosphere import Atmosphere
    from iris_lab.builder import make_spec, make_tasks, perturb_node, rf_parameters
    from iris_lab.synthesis.nlte import NLTESynthesizer

    _, payload = make_tasks(make_spec("mgii", 1000))[task]
    synth = NLTESynthesizer(**payload["synth"])
    tight = NLTESynthesizer(**{**payload["synth"], "j_tol": 1e-3, "pops_tol": 2e-4,
                               "max_iter": 800, "retry": False})
    atm = Atmosphere(**payload["fields"], scale=payload["scale"])[0]
    entry = synth.solve(atm)
    reference = synth.solve(atm, warm_start=entry)
    entry_tight = tight.solve(atm, warm_start=entry)
    wl = entry.spectra["mgii"]["wavelength"].values
    window = (np.abs(wl - 2796.35) < 1.0) | (np.abs(wl - 2803.53) < 1.0)

    def norm(v):
        return float(np.sqrt(np.sum(v[window] ** 2)))

    s, r, st = (x.spectra["mgii"].values for x in (entry, reference, entry_tight))
    rows = [f"entry: task {task}, family {payload['family'][0]}; one solve's convergence "
            f"error ‖I − I_tight‖/‖I_tight‖ = {norm(s - st) / norm(st):.4f}",
            "| node (step) | ‖ref‖ / ‖I‖ | unpaired error | paired error | iterations |",
            "|---|---|---|---|---|"]
    params = rf_parameters()
    for j in parameters:
        name, k, _, step = params[j]
        changed = perturb_node(atm, entry.log_tau500, j)
        perturbed = synth.solve(changed, warm_start=entry)
        p = perturbed.spectra["mgii"].values
        ref = tight.solve(changed, warm_start=entry_tight).spectra["mgii"].values - st
        rows.append(f"| {name} node {k} ({step:g}) | {norm(ref) / norm(st):.2e} | "
                    f"{norm(p - s - ref) / norm(ref):.3f} | {norm(p - r - ref) / norm(ref):.3f} | "
                    f"{perturbed.iterations} |")
        print(rows[-1], flush=True)
    return rows


def _idle_cpu_percent(config: dict, workers: int, seconds: float) -> float:
    """CPU of an idle LocalCluster (this process and its children) in % of one core."""
    import dask
    import psutil
    from dask.distributed import Client, LocalCluster

    with dask.config.set(config):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                               dashboard_address=None, env={"OMP_NUM_THREADS": "1"})
    with Client(cluster):
        time.sleep(5.0)  # start-up done
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        before = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(seconds)
        after = [sum(p.cpu_times()[:2]) for p in procs]
    cluster.close()
    return 100.0 * (sum(after) - sum(before)) / seconds


def overhead(workers: int = 2, seconds: float = 40.0) -> list[str]:
    from iris_lab.builder import QUIET_CLUSTER_CONFIG

    default = _idle_cpu_percent({}, workers, seconds)
    quiet = _idle_cpu_percent(QUIET_CLUSTER_CONFIG, workers, seconds)
    return [f"Idle {workers}-worker LocalCluster over {seconds:.0f} s, CPU in % of one core:",
            "| settings | idle CPU [% of a core] | ratio to dask's defaults |",
            "|---|---|---|",
            f"| dask defaults | {default:.1f} | 1.00 |",
            f"| builder (QUIET_CLUSTER_CONFIG) | {quiet:.1f} | {quiet / default:.2f} |"]


if __name__ == "__main__":
    main(sys.argv)
