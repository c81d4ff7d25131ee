"""Response functions of the Mg II database and the σ of eq. 2 (Sainz Dalda et
al. 2019): node perturbations, paired finite differences, the exact-σ top-up, the
paired references of older chunks, and the regression fill."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from iris_lab.builder.specs import SIGMA_EXPTIME_S, make_tasks
from iris_lab.builder.store import CheckpointStore, iter_chunk_files


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


def _rf_draws(spec: dict[str, Any]) -> np.ndarray:
    """The seeded uniform draws of a Mg II build: entry ``i`` gets exact response
    functions when ``u[i] < rf_fraction`` (the first draws of :func:`make_tasks`)."""
    return np.random.default_rng(spec["seed"] + 7).random(spec["n"])


def _companion_spec(base: dict[str, Any], kind: str, what: str) -> dict[str, Any]:
    """Specification of a store that completes a Mg II database (its spec embedded)."""
    if base.get("kind") != "mgii":
        raise ValueError(f"{what} needs a 'mgii' database specification")
    return {"kind": kind, "base": json.loads(json.dumps(base))}


def _companion_store_path(store: str | Path, suffix: str) -> Path:
    """``<name><suffix>.parts`` beside the store ``<name>.parts``."""
    store = Path(store)
    return store.with_name(store.stem + suffix + store.suffix)


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
    >>> from iris_lab.builder import make_spec
    >>> rf_topup_spec(make_spec("mgii", 1000))["kind"]
    'mgii_rf'
    """
    return _companion_spec(base, "mgii_rf", "a response-function top-up")


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
    >>> from iris_lab.builder import make_spec
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
    >>> from iris_lab.builder import make_spec
    >>> rf_reference_spec(make_spec("mgii", 1000))["kind"]
    'mgii_rf_reference'
    """
    return _companion_spec(base, "mgii_rf_reference", "paired references")


def rf_reference_store_path(store: str | Path) -> Path:
    """Where the paired references of a store go: ``<name>_ref.parts``."""
    return _companion_store_path(store, "_ref")


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


def _rows_of(ds: Any, entries: Any) -> tuple[np.ndarray, np.ndarray]:
    """Row of each of ``entries`` in ``ds``, and whether it is there.

    Example
    -------
    >>> import xarray as xr
    >>> ds = xr.Dataset(coords={"entry": [2, 5, 9]})
    >>> rows, found = _rows_of(ds, [5, 3, 9])
    >>> rows[found].tolist(), found.tolist()
    ([1, 2], [True, False, True])
    """
    have = np.asarray(ds["entry"].values).astype(int)
    wanted = np.asarray(entries).astype(int)
    if have.size == 0:
        return np.zeros(wanted.size, int), np.zeros(wanted.size, bool)
    order = np.argsort(have, kind="stable")
    rows = order[np.clip(np.searchsorted(have, wanted, sorter=order), 0, have.size - 1)]
    return rows, have[rows] == wanted


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
    i, found = _rows_of(ds, references["entry"].values)
    paired = ds["rf_paired"].values.astype(bool).copy()
    take = found & good
    take[found] &= ~paired[i[found]] & ds["rf_done"].values.astype(bool)[i[found]]
    i, j = i[take], np.flatnonzero(take)
    rf = ds["rf_spectrum"].values.copy()
    rf[i] += (ds["spectrum"].values[i] - references["reference_spectrum"].values[j])[:, None, :]
    paired[i] = True
    merged = int(take.sum())
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
                  references: CheckpointStore | None = None, *,
                  exact_elsewhere: int = 0) -> np.ndarray:
    """Entries the top-up still has to solve for ``n_exact`` exact entries in all,
    from what the stores hold (entries that failed in the top-up are not
    tried again; the next draws take their place). Responses count when
    paired, in the main store itself or by ``references``;
    ``exact_elsewhere`` entries with exact σ outside the store count too
    (:func:`~iris_lab.builder.combine.exact_outside`). Only entries the main
    store holds converged are chosen."""
    n = main.spec["n"]
    _, converged, done = _entry_flags(main, n, references)
    tried, _, top_done = _entry_flags(topup, n)
    return rf_topup_entries(main.spec, int(n_exact) - int(exact_elsewhere),
                            exact=done | (top_done & converged), tried=tried,
                            eligible=converged)


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
    done = ds["rf_done"].values.astype(bool).copy()
    paired = (ds["rf_paired"].values.astype(bool).copy() if "rf_paired" in ds
              else np.zeros(done.size, bool))
    top_paired = (top["rf_paired"].values.astype(bool) if "rf_paired" in top
                  else np.zeros(top.sizes["entry"], bool))
    i, take = _rows_of(ds, top["entry"].values)
    # an entry that has responses keeps them unless they are unpaired and the top-up's are
    take[take] &= ~done[i[take]] | (~paired[i[take]] & top_paired[take])
    i, j = i[take], np.flatnonzero(take)
    rf = ds["rf_spectrum"].values.copy()
    seconds = ds["rf_seconds"].values.copy()
    shift = ds["spectrum"].values[i] - top["spectrum"].values[j]
    rf[i] = top["rf_spectrum"].values[j] + shift[:, None, :]
    done[i] = True
    paired[i] = top_paired[j]
    seconds[i] = top["rf_seconds"].values[j] + top["solve_seconds"].values[j]
    merged = int(take.sum())
    ds["rf_spectrum"] = (ds["rf_spectrum"].dims, rf, ds["rf_spectrum"].attrs)
    ds["rf_done"] = (ds["rf_done"].dims, done)
    ds["rf_paired"] = (ds["rf_done"].dims, paired)
    ds["rf_seconds"] = (ds["rf_seconds"].dims, seconds, ds["rf_seconds"].attrs)
    total = float(topup["solve_seconds"].sum() + topup["rf_seconds"].sum())
    return ds, {"rf_topup_entries": str(merged),
                "rf_topup_seconds": f"{total:.0f}",
                "rf_topup": "entries after the seeded rf_fraction in the order of the same "
                            "uniform draws, solved again with response functions"}


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


def rf_topup_store_path(store: str | Path) -> Path:
    """Where the response-function top-up of a store goes: ``<name>_rf.parts``."""
    return _companion_store_path(store, "_rf")
