"""Build ``iris_lab/data/flare_set.nc``: flare atmospheres with Hα and Ca II 8542.

Beam-heated flare time sequences of ``iris_lab.worlds.flare`` (seed 2021,
20 steps per sequence) on Radynversion's 50-point height grid; Hα and
Ca II 854.2 nm in NLTE (Lightweaver, H and Ca II active, CRD; set-up in
``iris_lab.builder.default_synth``), each sequence warm-started along time,
then passed through the CRISP transmission profile on 29 (Hα) and 25
(Ca II 8542) offsets. 20 % of the sequences (seeded) are flagged
``held_out``.

The build is resumable (checkpoints in ``build/flare_set.parts``);
``--export-only`` writes the shipped file from what is built so far.

Run::

    python scripts/build_flare_set.py --n 2000 --workers 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    from iris_lab.builder import CheckpointStore, build_database, export, make_spec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="samples")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--time-limit", type=float, default=None)
    parser.add_argument("--export-only", action="store_true")
    args = parser.parse_args(argv)

    out = ROOT / "iris_lab" / "data" / "flare_set.nc"
    store = ROOT / "build" / "flare_set.parts"
    command = "python scripts/build_flare_set.py " + " ".join(sys.argv[1:])
    if args.export_only:
        export(CheckpointStore(store, make_spec("flare", args.n)), out, command=command)
    else:
        build_database("flare", args.n, out, scheduler=args.scheduler, workers=args.workers,
                       store=store, time_limit_s=args.time_limit, command=command)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
