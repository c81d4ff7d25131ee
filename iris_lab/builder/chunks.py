"""Chunk functions (run on a worker): the Mg II database, its paired references,
and the flare set."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from iris_lab.builder.responses import response_spectra, rf_parameters


def warm_chain(synth: Any, atmospheres: Any, n: int) -> Iterator[tuple[int, Any, Exception | None]]:
    """Solve atmospheres ``0 … n−1`` in order, each warm-started from the last
    converged solution: the chain of a Mg II chunk.

    Yields ``(i, solution, None)``, or ``(i, None, error)`` when the solve
    raised; the chain goes on either way, and a solution that did not converge
    is yielded but never warm-starts the next. :func:`mgii_chunk` and
    :func:`mgii_reference_chunk` both walk it, so a replayed chain is the
    same chain by construction.

    Example
    -------
    >>> from types import SimpleNamespace
    >>> class Synth:
    ...     def solve(self, atm, warm_start=None):
    ...         return SimpleNamespace(converged=atm > 0, started=warm_start)
    >>> [(i, s.started is not None) for i, s, _ in warm_chain(Synth(), [1, 0, 1], 3)]
    [(0, False), (1, True), (2, True)]
    """
    previous = None
    for i in range(n):
        try:
            solution = synth.solve(atmospheres[i], warm_start=previous)
        except Exception as err:  # noqa: BLE001 - reported to the caller, the chain goes on
            yield i, None, err
            continue
        if solution.converged:
            previous = solution
        yield i, solution, None


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
    for i, sol, error in warm_chain(synth, atms, n):
        atm = atms[i]
        try:
            if error is not None:
                raise error
            converged[i], iterations[i], seconds[i] = sol.converged, sol.iterations, sol.seconds
            message[i] = sol.message
            if not sol.converged:
                continue
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
    t0 = time.perf_counter()
    for i, sol, error in warm_chain(synth, atms, int(picked.max()) + 1 if picked.size else 0):
        if error is not None or not sol.converged:
            continue
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
