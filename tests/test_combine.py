"""A Mg II database resumed from an earlier export, and supplementary entries
(iris_lab.builder.combine).

The chunks are real :func:`~iris_lab.builder.mgii_chunk` outputs (atmospheres,
response functions, σ and the export are the package's), with the NLTE solver
replaced by a fast analytic stand-in so that whole builds take seconds.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("dask.distributed")

from iris_lab.builder import (  # noqa: E402
    CheckpointStore,
    build_database,
    carried_chunks,
    exact_outside,
    export,
    make_spec,
    make_tasks,
    mgii_chunk,
    rf_topup_plan,
    rf_topup_spec,
    supplement_spec,
    supplement_store_path,
)

N, CHUNK = 24, 4


class AnalyticSynth:
    """Stand-in for NLTESynthesizer: a Mg II-like profile whose level follows the
    atmosphere's mean T, velocities and log n_e (every node has a response)."""

    mu, step_aa = 1.0, 0.01
    wl = np.round(np.linspace(2790.0, 2810.0, 2001), 4)

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def provenance(self):
        return {"setup": "analytic-stand-in", "n_rays": str(self.kwargs.get("n_rays"))}

    def solve(self, atm, warm_start=None):
        level = (float(np.mean(atm.temperature)) * 1e-3 + float(np.mean(atm.v_los)) * 1e-6
                 + float(np.mean(atm.v_turb)) * 1e-6 + float(np.mean(np.log10(atm.n_e))))
        shape = 1.0 + np.exp(-(((self.wl - 2796.35) / 0.2) ** 2))
        return SimpleNamespace(
            converged=True, iterations=5, seconds=1.0, message="", error=0.0,
            log_tau500=np.linspace(-8.0, 1.0, atm.n_depth),
            spectra={"mgii": xr.DataArray(1e-5 * level * shape, dims="wavelength",
                                          coords={"wavelength": self.wl})})


@pytest.fixture()
def analytic(monkeypatch):
    from iris_lab.synthesis import nlte

    monkeypatch.setattr(nlte, "NLTESynthesizer", AnalyticSynth)


def _spec(n=N):
    return make_spec("mgii", n, chunk_size=CHUNK, rf_fraction=0.4)


def _fill(store, chunks=None, scale=1.0):
    """Solve the given chunks of a store's build with the stand-in."""
    for cid, payload in make_tasks(store.spec):
        if chunks is None or cid in chunks:
            ds = mgii_chunk(payload)
            for name in ("spectrum", "rf_spectrum"):
                ds[name] = ds[name] * scale
            store.write(cid, ds)


def test_carry_earlier_resumes_a_lost_store(tmp_path, analytic):
    """An export of a store whose checkpoints are gone but for two chunks (one of
    them solved again differently) carries the other chunks' entries unchanged:
    profiles, models and exact σ; the solves are counted once."""
    spec = _spec()
    first = CheckpointStore(tmp_path / "first.parts", spec)
    _fill(first)
    earlier = export(first, tmp_path / "earlier.nc")
    old = xr.open_dataset(earlier)
    assert carried_chunks(earlier, spec) == set(range(N // CHUNK))
    exact = old["rf_exact"].values
    assert exact.sum() >= 5 and (~exact).sum() >= 5  # both the carry and the fill matter

    again = CheckpointStore(tmp_path / "again.parts", spec)
    _fill(again, chunks={0, 1}, scale=1.1)  # chunk 1 solved again, differently
    out = xr.open_dataset(export(again, tmp_path / "out.nc", carry_from=earlier))
    assert out["entry"].values.tolist() == list(range(N))
    assert out.attrs["n_solved"] == str(N) and out.attrs["carried_entries"] == str(N - 8)
    new = np.arange(8)
    carried = np.arange(8, N)
    np.testing.assert_allclose(out["profile"].values[new], 1.1 * old["profile"].values[new],
                               rtol=1e-5)
    np.testing.assert_array_equal(out["profile"].values[carried],
                                  old["profile"].values[carried])
    np.testing.assert_array_equal(out["temperature"].values[carried],
                                  old["temperature"].values[carried])
    keep = carried[exact[carried]]
    np.testing.assert_array_equal(out["sigma_v_los"].values[keep],
                                  old["sigma_v_los"].values[keep])
    assert out["rf_exact"].values.sum() == exact.sum()
    assert np.isfinite(out["sigma_temperature"].values).all()
    assert (out["seed"].values == spec["seed"]).all()
    # exporting the result again carries the same entries: the file is a fixed point
    twice = xr.open_dataset(export(again, tmp_path / "out.nc", carry_from=tmp_path / "out.nc"))
    np.testing.assert_array_equal(twice["profile"].values, out["profile"].values)
    assert twice.attrs["carried_build_date"] == out.attrs["carried_build_date"]
    # the store's own provenance (here a top-up of its entries) is not mistaken for
    # the carried entries'
    with_topup = out.copy()
    with_topup.attrs["rf_topup_entries"] = "3"
    with_topup.to_netcdf(tmp_path / "with_topup.nc", engine="h5netcdf")
    third = xr.open_dataset(export(again, tmp_path / "third.nc",
                                   carry_from=tmp_path / "with_topup.nc"))
    assert "carried_rf_topup_entries" not in third.attrs
    assert {k for k in third.attrs if k.startswith("carried_")} == \
        {k for k in out.attrs if k.startswith("carried_")}


def test_carry_refuses_another_build(tmp_path, analytic):
    spec = _spec()
    store = CheckpointStore(tmp_path / "db.parts", spec)
    _fill(store, chunks={0})
    earlier = export(store, tmp_path / "earlier.nc")
    for other in (make_spec("mgii", N, chunk_size=CHUNK, rf_fraction=0.4, seed=7),
                  make_spec("mgii", N + 4, chunk_size=CHUNK, rf_fraction=0.4),
                  make_spec("mgii", N, chunk_size=CHUNK, rf_fraction=0.4,
                            synth={**spec["synth"], "n_rays": 5})):
        with pytest.raises(ValueError, match="another build"):
            carried_chunks(earlier, other)


def test_supplement_entries_follow_the_database(tmp_path, analytic):
    spec = _spec()
    extra_spec = supplement_spec(spec, 8)
    assert extra_spec["seed"] == spec["seed"] + 100 and extra_spec["synth"] == spec["synth"]
    assert supplement_store_path(tmp_path / "db.parts").name == "db_extra.parts"
    with pytest.raises(ValueError, match="seed"):
        supplement_spec(make_spec("mgii", 10, seed=1920), 4)  # 2020: the held-out seed
    with pytest.raises(ValueError, match="Mg II"):
        supplement_spec(make_spec("flare", 20), 4)
    main = CheckpointStore(tmp_path / "db.parts", spec)
    _fill(main, chunks={0, 1})
    extra = CheckpointStore(supplement_store_path(main.path), extra_spec)
    _fill(extra)
    out = xr.open_dataset(export(main, tmp_path / "db.nc", supplement=extra))
    assert out["entry"].values.tolist() == list(range(8)) + list(range(N, N + 8))
    assert out["seed"].values.tolist() == [spec["seed"]] * 8 + [extra_spec["seed"]] * 8
    assert out.attrs["n_solved"] == "16"
    # the supplement's atmospheres are its own draw, not the database's
    assert not np.allclose(out["temperature"].values[8:], out["temperature"].values[:8])


def test_topup_counts_exact_entries_outside_the_store(tmp_path, analytic):
    """Carried and supplementary exact σ reduce what the top-up solves; it picks
    only entries the store holds."""
    spec = _spec()
    full = CheckpointStore(tmp_path / "full.parts", spec)
    _fill(full)
    earlier = export(full, tmp_path / "earlier.nc")
    n_carried = int(xr.open_dataset(earlier)["rf_exact"].values[8:].sum())
    main = CheckpointStore(tmp_path / "db.parts", spec)
    _fill(main, chunks={0, 1})
    extra = CheckpointStore(supplement_store_path(main.path), supplement_spec(spec, 8))
    _fill(extra)
    n_extra = int(xr.open_dataset(export(extra, tmp_path / "x.nc"))["rf_exact"].values.sum())
    outside = exact_outside(spec, main.done(), earlier, extra)
    assert outside == n_carried + n_extra
    top = CheckpointStore(tmp_path / "db_rf.parts", rf_topup_spec(spec))
    in_store = int(xr.open_dataset(export(main, tmp_path / "m.nc"))["rf_exact"].values.sum())
    want = in_store + outside + 2
    plan = rf_topup_plan(main, top, want, exact_elsewhere=outside)
    assert plan.size == 2 and (plan < 8).all()
    assert rf_topup_plan(main, top, want - 2, exact_elsewhere=outside).size == 0


def test_build_database_solves_only_what_the_earlier_export_lacks(tmp_path, analytic,
                                                                  monkeypatch):
    import iris_lab.builder as builder

    spec = _spec()
    part = CheckpointStore(tmp_path / "part.parts", spec)
    _fill(part, chunks={0, 2, 3, 5})
    earlier = export(part, tmp_path / "db.nc")
    monkeypatch.setattr(builder, "mgii_chunk_isolated", mgii_chunk)  # in-process stand-in
    out = build_database("mgii", N, tmp_path / "db.nc", store=tmp_path / "new.parts",
                         chunk_size=CHUNK, rf_fraction=0.4, workers=1, processes=False,
                         progress=False, carry_from=earlier, supplement=4)
    assert CheckpointStore(tmp_path / "new.parts", spec).done() == {1, 4}
    assert CheckpointStore(tmp_path / "new_extra.parts", supplement_spec(spec, 4)).done() == {0}
    ds = xr.open_dataset(out)
    assert ds["entry"].values.tolist() == list(range(N + 4))
    assert ds.attrs["n_solved"] == str(N + 4) and ds.attrs["carried_entries"] == "16"


def test_a_fully_carried_build_still_exports_and_a_partial_export_is_refused(
        tmp_path, analytic, monkeypatch):
    """An earlier export that holds every chunk leaves the store empty: the build
    solves only the supplement and exports all of it. Exporting a resumed store
    without its earlier file, or a file with supplementary entries without the
    supplement, is an error rather than a smaller database."""
    import iris_lab.builder as builder

    spec = _spec()
    full = CheckpointStore(tmp_path / "full.parts", spec)
    _fill(full)
    earlier = export(full, tmp_path / "db.nc")
    monkeypatch.setattr(builder, "mgii_chunk_isolated", mgii_chunk)
    out = build_database("mgii", N, tmp_path / "db.nc", store=tmp_path / "new.parts",
                         chunk_size=CHUNK, rf_fraction=0.4, workers=1, processes=False,
                         progress=False, carry_from=earlier, supplement=4)
    store = CheckpointStore(tmp_path / "new.parts", spec)
    assert store.done() == set()
    ds = xr.open_dataset(out)
    assert ds["entry"].values.tolist() == list(range(N + 4))
    assert ds.attrs["n_solved"] == str(N + 4) and ds.attrs["carried_entries"] == str(N)
    extra = CheckpointStore(tmp_path / "new_extra.parts", supplement_spec(spec, 4))
    with pytest.raises(ValueError, match="supplement"):
        export(store, tmp_path / "x.nc", carry_from=out)
    _fill(store, chunks={0})
    store.log({"status": "carried", "chunks": 5, "from": str(out)})
    with pytest.raises(ValueError, match="carry_from"):
        export(store, tmp_path / "x.nc", supplement=extra)
    again = xr.open_dataset(export(store, tmp_path / "x.nc", carry_from=out, supplement=extra))
    assert again["entry"].values.tolist() == list(range(N + 4))
    with pytest.raises(ValueError, match="Mg II"):
        build_database("flare", 20, tmp_path / "f.nc", carry_from=out)
