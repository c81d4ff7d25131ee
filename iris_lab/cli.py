"""The ``iris-lab`` command line.

Each subcommand is a thin wrapper: it parses arguments and calls a function of
the module that does the work.

Example
-------
``iris-lab demo --out results/`` writes the demo's netCDF and PNG files.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from iris_lab.demo import run_demo

    outputs = run_demo(args.out)
    for label, path in outputs.items():
        print(f"{label}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="iris-lab", description="Solar spectral inversions: synthesis, look-up, networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the main job on embedded data")
    demo.add_argument("--out", default="iris_lab_demo", help="output folder")
    demo.set_defaults(func=_demo)

    # --- subcommands ---
    # (each block: add a subparser and set_defaults(func=...) calling into its module)
    def _build_database(args: argparse.Namespace) -> int:
        from iris_lab.builder import cli_build_database

        return cli_build_database(args)

    build = sub.add_parser(
        "build-database", help="NLTE Mg II database or flare set on dask (resumable)")
    build.add_argument("--kind", choices=["mgii", "mgii_heldout", "flare"], required=True)
    build.add_argument("--n", type=int, required=True, help="entries / samples wanted")
    build.add_argument("--out", required=True, help="output netCDF file")
    build.add_argument("--scheduler", default=None, help="dask scheduler address")
    build.add_argument("--workers", type=int, default=None, help="local workers (default: cores)")
    build.add_argument("--seed", type=int, default=None)
    build.add_argument("--chunk-size", type=int, default=None)
    build.add_argument("--store", default=None, help="checkpoint folder (build/<out>.parts)")
    build.add_argument("--time-limit", type=float, default=None, help="stop after seconds")
    build.set_defaults(func=_build_database)
    # --- end subcommands ---
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iris-lab`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
