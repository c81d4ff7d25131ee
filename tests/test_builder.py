"""Resumable, fault-isolated database builds (iris_lab.builder).

The chunk functions here are small numpy computations so that the tests
exercise the dask scheduling, the checkpoint store and the fault handling in
seconds; the Lightweaver chunk functions are exercised in ``test_nlte.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

from iris_lab.builder import CheckpointStore, make_spec, run_chunks  # noqa: E402

CHUNK_MODULE = textwrap.dedent('''
    import time

    import numpy as np
    import xarray as xr


    def chunk(payload):
        """Square the entry ids; entries listed in ``bad`` do not converge."""
        time.sleep(payload.get("sleep", 0.0))
        if payload.get("raise"):
            raise RuntimeError("injected worker failure")
        entries = np.asarray(payload["entries"])
        converged = ~np.isin(entries, payload.get("bad", []))
        value = np.where(converged, entries.astype(float) ** 2, np.nan)
        return xr.Dataset({"value": ("entry", value), "converged": ("entry", converged)},
                          coords={"entry": entries})
''')


@pytest.fixture()
def chunk_module(tmp_path, monkeypatch):
    (tmp_path / "fake_chunks.py").write_text(CHUNK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import fake_chunks

    return importlib.reload(fake_chunks)


def _tasks(n_chunks: int, size: int = 3, **extra):
    return [(c, {"entries": np.arange(c * size, (c + 1) * size), **extra})
            for c in range(n_chunks)]


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path, chunk_module):
    store_dir = tmp_path / "store"
    spec = {"kind": "test", "n": 30}
    script = textwrap.dedent(f'''
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import numpy as np
        import fake_chunks
        from iris_lab.builder import CheckpointStore, run_chunks
        tasks = [(c, {{"entries": np.arange(3 * c, 3 * c + 3), "sleep": 0.4}})
                 for c in range(10)]
        run_chunks(tasks, fake_chunks.chunk, CheckpointStore({str(store_dir)!r}, {spec!r}),
                   processes=False, workers=1, progress=False)
    ''')
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(list(store_dir.glob("chunk_*.nc"))) >= 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # a hard kill: no clean-up runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = CheckpointStore(store_dir, spec).done()
    assert 2 <= len(before) < 10, "the kill should have landed mid-build"

    store = CheckpointStore(store_dir, spec)
    report = run_chunks(_tasks(10), chunk_module.chunk, store, processes=False, workers=1,
                        progress=False)
    assert sorted(report.skipped) == sorted(before)
    assert sorted(report.done) == sorted(set(range(10)) - before)
    ds = store.load("entry")
    np.testing.assert_array_equal(ds["entry"].values, np.arange(30))  # each entry once
    np.testing.assert_array_equal(ds["value"].values, np.arange(30.0) ** 2)
    # a third run has nothing left to do
    again = run_chunks(_tasks(10), chunk_module.chunk, store, processes=False, workers=1,
                       progress=False)
    assert again.done == [] and len(again.skipped) == 10


def test_faults_are_isolated(tmp_path, chunk_module):
    store = CheckpointStore(tmp_path / "store", {"kind": "test"})
    tasks = _tasks(6)
    tasks[2] = (2, {**tasks[2][1], "raise": True})  # a worker that raises
    tasks[4] = (4, {**tasks[4][1], "bad": [13]})  # an entry that does not converge
    report = run_chunks(tasks, chunk_module.chunk, store, processes=False, workers=2,
                        progress=False)
    assert set(report.failed) == {2}
    assert "injected worker failure" in report.failed[2]
    assert sorted(report.done) == [0, 1, 3, 4, 5]
    ds = store.load("entry")
    assert 6 not in ds["entry"].values  # the failed chunk is absent, not half-written
    assert int((~ds["converged"].values).sum()) == 1
    assert bool(ds["converged"].sel(entry=13)) is False
    np.testing.assert_array_equal(ds["value"].sel(entry=12).values, 144.0)
    failures = store.failures()
    assert [f["chunk"] for f in failures] == [2]
    # the next run retries the failed chunk only
    fixed = _tasks(6)
    report = run_chunks(fixed, chunk_module.chunk, store, processes=False, workers=1,
                        progress=False)
    assert report.done == [2]
    assert store.load("entry").sizes["entry"] == 18


def test_store_refuses_another_build(tmp_path):
    CheckpointStore(tmp_path / "s", {"kind": "mgii", "n": 10})
    with pytest.raises(ValueError, match="another build"):
        CheckpointStore(tmp_path / "s", {"kind": "mgii", "n": 20})
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["spec"] == {"kind": "mgii", "n": 10}


def test_make_spec_validates():
    with pytest.raises(ValueError, match="kind"):
        make_spec("hydrogen", 10)
    with pytest.raises(ValueError, match="n must"):
        make_spec("mgii", 0)
    spec = make_spec("flare", 40)
    assert spec["chunk_size"] == 20 and spec["synth"]["problem"] == "halpha_ca8542"


def test_import_chunks_from_another_setup(tmp_path):
    """Chunks of the same atmospheres solved with another set-up are copied in
    (only the missing ones), logged, and refused for other atmospheres."""
    import xarray as xr

    reference = make_spec("mgii", 40, synth={"n_rays": 5})
    cheaper = make_spec("mgii", 40, synth={"n_rays": 3})
    old = CheckpointStore(tmp_path / "old", reference)
    new = CheckpointStore(tmp_path / "new", cheaper)
    for chunk_id in (1, 2, 3):
        old.write(chunk_id, xr.Dataset({"x": ("entry", np.full(2, float(chunk_id)))}))
    new.write(2, xr.Dataset({"x": ("entry", np.full(2, -2.0))}))
    assert new.import_chunks(tmp_path / "old", "measured difference < 0.1 %") == [1, 3]
    assert new.done() == {1, 2, 3}
    with xr.open_dataset(new.chunk_path(2)) as kept:
        assert float(kept["x"][0]) == -2.0          # its own chunk is not overwritten
    (record,) = new.imported()
    assert record["chunks"] == [1, 3] and record["synth"] == {"n_rays": 5}
    other = CheckpointStore(tmp_path / "other", make_spec("mgii", 80, synth={"n_rays": 3}))
    with pytest.raises(ValueError, match="other atmospheres"):
        other.import_chunks(tmp_path / "old", "")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_chunk_process_ends_when_its_worker_dies(tmp_path):
    """A process watched by ``exit_with_parent`` ends soon after its parent is
    killed, instead of solving on for nobody (as run_isolated's chunk processes
    would when dask restarts their worker)."""
    pid_file = tmp_path / "child.pid"
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        code = ("import os, time; from iris_lab import builder; "
                "builder.exit_with_parent(%d, interval=0.2); "
                "open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
                % os.getpid())
        subprocess.Popen([sys.executable, "-c", code])
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.time() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.time() < deadline, "the child did not start"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(child, 0)                 # alive while its parent is
        time.sleep(0.6)
        os.kill(child, 0)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 10
    while True:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # a zombie is gone for our purpose: it no longer runs
        with open(f"/proc/{child}/stat") as fh:
            if fh.read().split(")")[-1].split()[0] == "Z":
                break
        assert time.time() < deadline, "the child outlived its parent by 10 s"
        time.sleep(0.1)


def test_rf_topup_continues_the_seeded_choice():
    """The top-up takes the entries whose uniform draws come next above rf_fraction:
    disjoint from the seeded choice, as many as n_exact asks, skipping entries that
    are not eligible or were tried; the same atmospheres as the database's chunks."""
    from iris_lab.builder import (
        make_tasks,
        rf_topup_entries,
        rf_topup_spec,
        rf_topup_store_path,
        rf_topup_tasks,
    )
    from iris_lab.builder.responses import _rf_draws

    spec = make_spec("mgii", 60)
    tasks = dict(make_tasks(spec))
    flags = np.zeros(60, bool)
    fields = {}
    for payload in tasks.values():
        flags[payload["entries"]] = payload["rf"]
        for j, e in enumerate(payload["entries"]):
            fields[int(e)] = payload["fields"]["temperature"][j]
    u = _rf_draws(spec)
    assert np.array_equal(flags, u < spec["rf_fraction"])  # the mask make_tasks uses
    n_exact = int(flags.sum()) + 5
    extra = rf_topup_entries(spec, n_exact)
    order = np.flatnonzero(~flags)[np.argsort(u[~flags])]
    assert np.array_equal(extra, np.sort(order[:5]))  # the next five draws
    assert rf_topup_entries(spec, int(flags.sum())).size == 0
    # one seeded entry without responses (not converged) and one tried and failed:
    exact = flags.copy()
    exact[np.flatnonzero(flags)[0]] = False
    eligible = np.ones(60, bool)
    eligible[np.flatnonzero(flags)[0]] = False
    tried = np.zeros(60, bool)
    tried[order[0]] = True
    again = rf_topup_entries(spec, n_exact, exact=exact, tried=tried, eligible=eligible)
    assert np.array_equal(again, np.sort(order[1:7]))  # six more, the tried one skipped
    top = rf_topup_spec(spec)
    top_tasks = rf_topup_tasks(top, extra)
    assert [cid for cid, _ in top_tasks] == extra.tolist()  # keyed by the entry id
    for cid, payload in top_tasks:
        assert payload["rf"].all() and payload["synth"] == spec["synth"]
        assert payload["entries"].tolist() == [cid]
        np.testing.assert_array_equal(payload["fields"]["temperature"][0], fields[cid])
    assert rf_topup_store_path("build/mgii_database.parts").name == "mgii_database_rf.parts"
    with pytest.raises(ValueError, match="mgii"):
        rf_topup_spec(make_spec("flare", 20))


def test_rf_topup_plan_counts_what_the_stores_hold(tmp_path):
    """The plan asks for the deficit of converged entries with responses in the
    database and the top-up, never an unconverged or already-tried entry."""
    import xarray as xr

    from iris_lab.builder import rf_topup_plan, rf_topup_spec
    from iris_lab.builder.responses import _rf_draws

    spec = make_spec("mgii", 40, chunk_size=10)
    seeded = _rf_draws(spec) < spec["rf_fraction"]
    main = CheckpointStore(tmp_path / "db.parts", spec)
    converged = np.ones(40, bool)
    converged[[3, 7]] = False
    for c in range(4):
        e = np.arange(10 * c, 10 * c + 10)
        main.write(c, xr.Dataset({"converged": ("entry", converged[e]),
                                  "rf_done": ("entry", seeded[e] & converged[e]),
                                  "rf_paired": ("entry", np.ones(10, bool))},
                                 coords={"entry": e}))
    top = CheckpointStore(tmp_path / "db_rf.parts", rf_topup_spec(spec))
    have = int((seeded & converged).sum())
    first = rf_topup_plan(main, top, have + 3)
    assert first.size == 3 and converged[first].all() and not seeded[first].any()
    # the first top-up entry fails, the second succeeds
    for e, ok in zip(first[:2], (False, True), strict=True):
        top.write(int(e), xr.Dataset({"converged": ("entry", [ok]), "rf_done": ("entry", [ok]),
                                      "rf_paired": ("entry", [ok])}, coords={"entry": [e]}))
    second = rf_topup_plan(main, top, have + 3)
    assert second.size == 2 and first[0] not in second and first[1] not in second
    assert first[2] in second


def test_merge_rf_topup_keeps_the_top_up_differences():
    """Merged response spectra give the top-up's own perturbed − reference; entries
    that already have responses, or whose top-up failed, are left alone."""
    import xarray as xr

    from iris_lab.builder import merge_rf_topup

    rng = np.random.default_rng(0)
    n, n_rf, n_wl = 5, 3, 7
    spec = rng.random((n, n_wl)) + 1.0
    rf = np.full((n, n_rf, n_wl), np.nan)
    rf[1] = spec[1] + 0.1  # entry 11 has exact responses already
    db = xr.Dataset({"spectrum": (("entry", "wl_fine"), spec),
                     "rf_spectrum": (("entry", "rf_parameter", "wl_fine"), rf),
                     "rf_done": ("entry", np.arange(n) == 1),
                     "rf_seconds": ("entry", np.zeros(n))},
                    coords={"entry": np.arange(10, 10 + n), "wl_fine": np.arange(n_wl),
                            "rf_parameter": np.arange(n_rf)})
    top_spec = spec[[1, 3, 4]] + 0.01  # a slightly different converged solution
    top_rf = top_spec[:, None, :] + rng.random((3, n_rf, n_wl))
    top = xr.Dataset({"spectrum": (("entry", "wl_fine"), top_spec),
                      "rf_spectrum": (("entry", "rf_parameter", "wl_fine"), top_rf),
                      "rf_done": ("entry", np.array([True, True, False])),
                      "converged": ("entry", np.ones(3, bool)),
                      "rf_seconds": ("entry", np.full(3, 100.0)),
                      "solve_seconds": ("entry", np.full(3, 5.0))},
                     coords={"entry": [11, 13, 14], "wl_fine": np.arange(n_wl),
                             "rf_parameter": np.arange(n_rf)})
    out, info = merge_rf_topup(db, top)
    assert info["rf_topup_entries"] == "1" and info["rf_topup_seconds"] == "315"
    assert out["rf_done"].values.tolist() == [False, True, False, True, False]
    np.testing.assert_allclose(out["rf_spectrum"].values[3] - spec[3],
                               top_rf[1] - top_spec[1], rtol=1e-12)
    np.testing.assert_array_equal(out["rf_spectrum"].values[1], rf[1])  # kept
    assert np.isnan(out["rf_spectrum"].values[4]).all()  # its top-up failed
    assert out["rf_seconds"].values[3] == 105.0


def test_merge_rf_topup_refuses_another_grid():
    import xarray as xr

    from iris_lab.builder import merge_rf_topup

    def ds(wl):
        return xr.Dataset({"spectrum": (("entry", "wl_fine"), np.ones((1, wl.size))),
                           "rf_spectrum": (("entry", "rf_parameter", "wl_fine"),
                                           np.ones((1, 2, wl.size))),
                           "rf_done": ("entry", [True]), "converged": ("entry", [True]),
                           "rf_seconds": ("entry", [1.0]), "solve_seconds": ("entry", [1.0])},
                          coords={"entry": [0], "wl_fine": wl, "rf_parameter": ["a", "b"]})

    with pytest.raises(ValueError, match="wl_fine"):
        merge_rf_topup(ds(np.arange(3.0)), ds(np.arange(4.0)))


def test_local_cluster_workers_run_quiet():
    """The build's workers run with dask's fast housekeeping off (profiling,
    work stealing, 20 ms ticks), in their own processes with one thread."""
    from dask.distributed import Client

    from iris_lab.builder import local_cluster

    cluster = local_cluster(1, allowed_failures=3)
    try:
        with Client(cluster) as client:
            def settings():
                import os

                import dask
                return (dask.config.get("distributed.worker.profile.enabled"),
                        dask.config.get("distributed.admin.tick.interval"),
                        os.environ.get("OMP_NUM_THREADS"), os.getpid())

            (profile, tick, omp, pid), = client.run(settings).values()
            assert (profile, tick, omp) == (False, "1s", "1")
            assert pid != os.getpid()
            assert list(client.nthreads().values()) == [1]
        assert "stealing" not in cluster.scheduler.extensions
        assert cluster.scheduler.allowed_failures == 3
    finally:
        cluster.close()


def test_unpaired_responses_count_once_their_references_pair_them(tmp_path):
    """Chunks written before the responses were paired: their entries are not
    exact for the top-up plan, the reference tasks re-solve exactly those
    chunks, and a reproduced chain (mismatch below tolerance) pairs them."""
    import xarray as xr

    from iris_lab.builder import (
        make_tasks,
        merge_rf_references,
        rf_reference_spec,
        rf_reference_store_path,
        rf_reference_tasks,
        rf_topup_plan,
        rf_topup_spec,
    )
    from iris_lab.builder.responses import _rf_draws

    spec = make_spec("mgii", 40, chunk_size=10, rf_fraction=0.3)
    seeded = _rf_draws(spec) < spec["rf_fraction"]
    assert seeded[:20].any() and seeded[20:].any()
    main = CheckpointStore(tmp_path / "db.parts", spec)
    n_wl = 6
    spectra = np.random.default_rng(1).random((40, n_wl)) + 1.0
    for c in range(4):
        e = np.arange(10 * c, 10 * c + 10)
        data = {"converged": ("entry", np.ones(10, bool)), "rf_done": ("entry", seeded[e]),
                "spectrum": (("entry", "wl_fine"), spectra[e])}
        if c >= 2:  # written after the pairing
            data["rf_paired"] = ("entry", np.ones(10, bool))
        main.write(c, xr.Dataset(data, coords={"entry": e}))
    top = CheckpointStore(tmp_path / "db_rf.parts", rf_topup_spec(spec))
    paired_now = int(seeded[20:].sum())
    assert rf_topup_plan(main, top, paired_now + 1).size == 1
    assert rf_topup_plan(main, top, int(seeded.sum())).size == int(seeded[:20].sum())

    tasks = rf_reference_tasks(main)
    assert sorted(cid for cid, _ in tasks) == [0, 1]
    by_id = dict(make_tasks(spec))
    for cid, payload in tasks:
        np.testing.assert_array_equal(payload["need"], seeded[10 * cid:10 * cid + 10])
        np.testing.assert_array_equal(payload["stored"], spectra[10 * cid:10 * cid + 10])
        np.testing.assert_array_equal(payload["entries"], by_id[cid]["entries"])

    refs = CheckpointStore(rf_reference_store_path(main.path), rf_reference_spec(spec))
    assert refs.path.name == "db_ref.parts"
    need = np.flatnonzero(seeded[:20])
    mismatch = np.zeros(need.size)
    mismatch[0] = 1e-3  # this chain was not reproduced
    refs.write(0, xr.Dataset({"reference_spectrum": (("entry", "wl_fine"), spectra[need] + 0.5),
                              "chain_mismatch": ("entry", mismatch),
                              "converged": ("entry", np.ones(need.size, bool)),
                              "solve_seconds": ("entry", np.ones(need.size))},
                             coords={"entry": need}))
    assert rf_topup_plan(main, top, int(seeded.sum()), refs).size == 1

    rf = spectra[:, None, :] + np.arange(1.0, 4.0)[None, :, None]
    db = xr.Dataset({"spectrum": (("entry", "wl_fine"), spectra),
                     "rf_spectrum": (("entry", "rf_parameter", "wl_fine"), rf),
                     "rf_done": ("entry", seeded), "rf_paired": ("entry", np.zeros(40, bool))},
                    coords={"entry": np.arange(40)})
    out, info = merge_rf_references(db, refs.load("entry"))
    assert info["rf_references_merged"] == str(need.size - 1)
    assert out["rf_paired"].values.tolist() == [bool(e in need[1:]) for e in range(40)]
    for e in need[1:]:  # rf_spectrum - spectrum is now perturbed - reference
        np.testing.assert_allclose(out["rf_spectrum"].values[e] - spectra[e],
                                   rf[e] - (spectra[e] + 0.5), rtol=1e-12)
    np.testing.assert_array_equal(out["rf_spectrum"].values[need[0]], rf[need[0]])


def test_load_fills_variables_older_chunks_lack(tmp_path):
    import xarray as xr

    store = CheckpointStore(tmp_path / "s.parts", {"kind": "test"})
    store.write(0, xr.Dataset({"a": ("entry", [1.0, 2.0])}, coords={"entry": [0, 1]}))
    store.write(1, xr.Dataset({"a": ("entry", [3.0]), "flag": ("entry", [True])},
                              coords={"entry": [2]}))
    ds = store.load("entry", defaults={"flag": False})
    assert ds["flag"].values.tolist() == [False, False, True]


def test_merge_rf_topup_pairing_flags(tmp_path):
    """A paired top-up entry replaces an unpaired response; an unpaired top-up entry
    (a chunk written before the pairing, NaN-filled on load) never counts as paired."""
    import xarray as xr

    from iris_lab.builder import merge_rf_topup

    n, n_rf, n_wl = 3, 2, 4
    spec = np.ones((n, n_wl))
    rf = np.full((n, n_rf, n_wl), np.nan)
    rf[0] = 5.0
    db = xr.Dataset({"spectrum": (("entry", "wl_fine"), spec),
                     "rf_spectrum": (("entry", "rf_parameter", "wl_fine"), rf),
                     "rf_done": ("entry", [True, False, False]),
                     "rf_paired": ("entry", [False, False, False]),
                     "rf_seconds": ("entry", np.zeros(n))},
                    coords={"entry": [0, 1, 2], "wl_fine": np.arange(n_wl),
                            "rf_parameter": np.arange(n_rf)})
    store = CheckpointStore(tmp_path / "top.parts", {"kind": "test"})
    for e, with_flag in ((0, True), (1, False), (2, True)):
        data = {"spectrum": (("entry", "wl_fine"), spec[[e]] + 0.5),
                "rf_spectrum": (("entry", "rf_parameter", "wl_fine"),
                                np.full((1, n_rf, n_wl), 2.0)),
                "rf_done": ("entry", [True]), "converged": ("entry", [True]),
                "rf_seconds": ("entry", [1.0]), "solve_seconds": ("entry", [1.0])}
        if with_flag:
            data["rf_paired"] = ("entry", [True])
        store.write(e, xr.Dataset(data, coords={"entry": [e], "wl_fine": np.arange(n_wl),
                                                "rf_parameter": np.arange(n_rf)}))
    top = store.load("entry", defaults={"rf_paired": False})
    out, info = merge_rf_topup(db, top)
    assert out["rf_paired"].values.tolist() == [True, False, True]
    assert out["rf_done"].values.tolist() == [True, True, True]
    np.testing.assert_allclose(out["rf_spectrum"].values[0] - 1.0, 2.0 - 1.5)
    assert info["rf_topup_entries"] == "3"
