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

    def _iris2(args: argparse.Namespace) -> int:
        from iris_lab.methods.iris2 import cli_iris2

        return cli_iris2(args)

    iris2 = sub.add_parser("iris2", help="IRIS² look-up inversion of Mg II h&k rasters")
    iris2.add_argument("rasters", nargs="+", help="IRIS level-2 raster FITS (or netCDF) files")
    iris2.add_argument("--out", required=True, help="result netCDF (several inputs: a stem)")
    iris2.add_argument("--database", default=None, help="Mg II database (default: shipped)")
    iris2.add_argument("--scheduler", default=None,
                       help="dask scheduler address, or 'local' for a LocalCluster")
    iris2.add_argument("--rp", type=int, default=0,
                       help="invert N representative profiles instead of every pixel")
    iris2.add_argument("--weights-window", nargs=3, action="append", metavar=("LO", "HI", "W"),
                       help="chi2 weight W between LO and HI Angstrom (repeatable)")
    iris2.add_argument("--chi2-threshold", type=float, default=0.05)
    iris2.add_argument("--device", default="cpu")
    iris2.set_defaults(func=_iris2)
    # --- end subcommands ---
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iris-lab`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
