"""Build ``iris_lab/data/mgii_database.nc`` and ``iris_lab/data/mgii_heldout.nc``.

Mg II h&k NLTE profiles (Lightweaver, angle-averaged PRD; set-up in
``iris_lab.builder.default_synth``) of the chromospheric families of
``iris_lab.worlds.chromosphere`` (seed 2019 for the database, 2020 for the
held-out atmospheres, which are therefore never in the database), degraded to
the IRIS NUV grid, with the model on the 39-point log τ500 grid and σ from
finite-difference response functions (eq. 2 of Sainz Dalda et al. 2019) on a
random 10 % of the entries, topped up after the last entry to at least
``--rf-min`` (105) such entries (the seeded 10 % of 1000 holds 90; see
``iris_lab.builder.rf_topup_spec``), filled by a regression on the rest.
Responses are paired differences (``iris_lab.builder.response_spectra``);
chunks written before the pairing get their references solved after the
last entry (``build/mgii_database_ref.parts``, ``rf_reference_spec``).

The build is resumable: checkpoints go to ``build/<name>.parts`` and a rerun
continues where the last one stopped; ``--export-only`` writes the shipped
file from what is built so far.

``--carry-from FILE`` resumes from an earlier export of the same build when
the checkpoints are gone: the chunks it holds are carried, not solved again
(``iris_lab.builder.carry_earlier``). ``--supplement N`` adds N atmospheres of
the seed + 100 after the last entry (``iris_lab.builder.supplement_spec``), so
that the database keeps ``--n`` entries when some solves do not converge.

Run (the shipped database)::

    python scripts/build_mgii_database.py --n 1000 --workers 2 --supplement 16 \
        --carry-from iris_lab/data/mgii_database.nc
    python scripts/build_mgii_database.py --heldout --n 200 --workers 2

``--interleave`` builds the database, the held-out set and the flare set
(``scripts/build_flare_set.py``) on one cluster in turns (four flare sequences,
four database chunks, two held-out chunks), so that a build stopped at any time
holds data of all three; ``--deadline HH:MM`` (UTC) stops it. Export with
``--export-only`` (and ``--heldout``, and ``build_flare_set.py --export-only``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    from iris_lab.builder import (
        CheckpointStore,
        build_database,
        export,
        make_spec,
        rf_reference_spec,
        rf_reference_store_path,
        rf_topup_spec,
        rf_topup_store_path,
        supplement_spec,
        supplement_store_path,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="entries (1000; held-out 200)")
    parser.add_argument("--heldout", action="store_true", help="build the held-out set")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--time-limit", type=float, default=None)
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--references-only", action="store_true",
                        help="database: only solve the paired references of chunks whose "
                             "responses are unpaired (also done after the last entry)")
    parser.add_argument("--no-export", action="store_true")
    parser.add_argument("--interleave", action="store_true",
                        help="database, held-out and flare set in turns")
    parser.add_argument("--deadline", default=None, help="HH:MM UTC to stop --interleave")
    parser.add_argument("--carry-from", default=None, metavar="FILE",
                        help="database: an earlier export of this build whose chunks are "
                             "carried instead of solved again when the store lacks them")
    parser.add_argument("--supplement", type=int, default=0, metavar="N",
                        help="database: N more atmospheres of the seed + 100, after the "
                             "last entry, so that the database keeps n converged entries")
    parser.add_argument("--rf-min", type=int, default=105,
                        help="database: entries with exact response functions at least "
                             "(a top-up after the last entry; 0: none)")
    args = parser.parse_args(argv)

    if args.interleave:
        import datetime as dt

        from iris_lab.builder import build_interleaved

        deadline = None
        if args.deadline:
            now = dt.datetime.now(dt.UTC)
            hh, mm = (int(x) for x in args.deadline.split(":"))
            stop = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
            deadline = (stop if stop > now else stop + dt.timedelta(days=1)).timestamp()
        build_interleaved([
            ("flare", make_spec("flare", 2000), ROOT / "build" / "flare_set.parts", 4),
            ("mgii", make_spec("mgii", 1000), ROOT / "build" / "mgii_database.parts", 4),
            ("mgii_heldout", make_spec("mgii_heldout", 200),
             ROOT / "build" / "mgii_heldout.parts", 2),
        ], workers=args.workers or 1, scheduler=args.scheduler, deadline=deadline)
        return

    kind = "mgii_heldout" if args.heldout else "mgii"
    n = args.n or (200 if args.heldout else 1000)
    name = "mgii_heldout" if args.heldout else "mgii_database"
    out = ROOT / "iris_lab" / "data" / f"{name}.nc"
    store = ROOT / "build" / f"{name}.parts"
    command = "python scripts/build_mgii_database.py " + " ".join(sys.argv[1:])
    rf_min = args.rf_min if kind == "mgii" and args.rf_min > 0 else None
    carry_from = args.carry_from if kind == "mgii" else None
    supplement = args.supplement if kind == "mgii" and args.supplement > 0 else None
    if args.references_only:
        from iris_lab.builder import pair_older_responses

        main_store = CheckpointStore(store, make_spec("mgii", n))
        pair_older_responses(main_store,
                             CheckpointStore(rf_reference_store_path(store),
                                             rf_reference_spec(main_store.spec)),
                             scheduler=args.scheduler, workers=args.workers)
        return
    if args.export_only:
        spec = make_spec(kind, n)
        topup = rf_topup_store_path(store)
        references = rf_reference_store_path(store)
        extra = supplement_store_path(store)
        export(CheckpointStore(store, spec), out, command=command,
               carry_from=carry_from,
               supplement=(CheckpointStore(extra, supplement_spec(spec, supplement))
                           if supplement and extra.exists() else None),
               rf_topup=(CheckpointStore(topup, rf_topup_spec(spec))
                         if kind == "mgii" and topup.exists() else None),
               rf_references=(CheckpointStore(references, rf_reference_spec(spec))
                              if kind == "mgii" and references.exists() else None))
    else:
        build_database(kind, n, out, scheduler=args.scheduler, workers=args.workers,
                       store=store, time_limit_s=args.time_limit, command=command,
                       export_file=not args.no_export, rf_min=rf_min,
                       carry_from=carry_from, supplement=supplement)
        if args.no_export:
            return
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
