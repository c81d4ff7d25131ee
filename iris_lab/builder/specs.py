"""Build specifications: seeds, NLTE set-ups, and the seeded chunk tasks of the
Mg II database, the held-out set and the flare set."""

from __future__ import annotations

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
