"""IRIS² look-up and k-means at full-raster scale.

220,000 spectra (a 440 × 500 raster) against a 15,000-entry database of 473
wavelengths (analytic stand-in profiles, :func:`iris_lab.methods.iris2.toy_database`;
the queries are held-out entries with 3% noise). Prints one table:

* the measured float32 GEMM rate of this machine and the brute-force time it
  implies (2 · N_pix · N_db · N_λ flop),
* ``IRIS2.predict`` (exact pruned search + model, σ, χ², index, quality maps),
* agreement with a brute-force float64 search on a random subset,
* a naive numpy loop (one pixel at a time) timed on a subset, as pixels/s,
* k-means (``RepresentativeProfiles``, 60 RPs) of the same 220,000 × 473,
* peak resident memory.

Usage: ``python benchmarks/iris2_lookup.py [--threads 2] [--pixels 220000]
[--entries 15000] [--check 5000] [--device cpu] [--full-brute-force]``
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
from bench_timing import gemm_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pixels", type=int, default=220_000)
    parser.add_argument("--entries", type=int, default=15_000)
    parser.add_argument("--check", type=int, default=5000, help="brute-force subset size")
    parser.add_argument("--loop", type=int, default=300, help="naive-loop subset size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kmeans", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--full-brute-force", action="store_true",
                        help="also run the float32 brute force on every pixel")
    args = parser.parse_args()

    import torch
    import xarray as xr

    torch.set_num_threads(args.threads)
    from iris_lab.methods.iris2 import INTENSITY_UNITS, IRIS2, brute_force_lookup, toy_database
    from iris_lab.methods.rp import RepresentativeProfiles

    rows: list[tuple[str, str, str]] = []
    rate = gemm_rate(4096, 473, 15000, device=args.device, repeats=3) / 1e9
    flop = 2.0 * args.pixels * args.entries * 473
    rows.append(("float32 GEMM rate (4096x473 @ 473x15000)", f"{rate:.1f} GFLOP/s", ""))
    rows.append(("brute force, implied by that rate", f"{flop / rate / 1e9:.1f} s",
                 f"{flop / 1e12:.2f} TFLOP"))

    t0 = time.perf_counter()
    db = toy_database(args.entries, seed=0)
    held = toy_database(20_000, seed=1).profile.values
    rng = np.random.default_rng(2)
    pick = rng.integers(0, len(held), args.pixels)
    queries = held[pick]
    queries *= (1.0 + 0.03 * rng.standard_normal(queries.shape, dtype=np.float32))
    del held
    ny = 440 if args.pixels % 440 == 0 else 1
    raster = xr.DataArray(queries.reshape(ny, -1, 473), dims=("y", "x", "wavelength"),
                          coords={"wavelength": db.wavelength.values},
                          attrs={"units": INTENSITY_UNITS})
    t_gen = time.perf_counter() - t0
    model = IRIS2(device=args.device).fit(db)

    t0 = time.perf_counter()
    result = model.predict(raster)
    t_ours = time.perf_counter() - t0
    rows.append((f"IRIS2.predict exact pruned ({args.pixels} px, {args.entries} entries)",
                 f"{t_ours:.2f} s", f"{args.pixels / t_ours:,.0f} px/s; "
                 f"{flop / rate / 1e9 / t_ours:.1f}x faster than brute-force GEMM"))

    search = next(iter(model._searches.values()))
    st = search.stats_
    rows.append(("  pruning: bound pairs / (pixels x entries); exact candidates per pixel",
                 f"{st['bound_pairs'] / st['pixels'] / args.entries:.3f}; "
                 f"{st['candidates'] / st['pixels']:.2f}",
                 f"basis {search.n_components_} + 1 dims, {search.n_groups_} entry groups"))
    idx = result["index"].values.ravel()
    sub = rng.choice(args.pixels, size=min(args.check, args.pixels), replace=False)
    t0 = time.perf_counter()
    ref_idx, ref_chi2 = brute_force_lookup(model, queries[sub])
    t_ref = time.perf_counter() - t0
    same = float((ref_idx == idx[sub]).mean())
    rows.append((f"identical best match vs brute force float64 ({len(sub)} random px)",
                 f"{same * 100:.2f} %", f"brute force {len(sub) / t_ref:,.0f} px/s"))

    if args.full_brute_force:
        d = torch.as_tensor(db.profile.values.astype(np.float32))
        dn = (d**2).sum(1)
        t0 = time.perf_counter()
        bf = np.empty(args.pixels, dtype=np.int64)
        for s in range(0, args.pixels, 4096):
            q = torch.as_tensor(queries[s:s + 4096])
            bf[s:s + 4096] = torch.argmin(dn[None] - 2.0 * q @ d.T, dim=1).numpy()
        t_bf = time.perf_counter() - t0
        rows.append(("brute force float32 GEMM, every pixel (measured)", f"{t_bf:.2f} s",
                     f"same index {float((bf == idx).mean()) * 100:.3f} % "
                     "(float32 rounding near ties)"))

    n_loop = min(args.loop, args.pixels)
    dbp = model._profiles
    w = model.weights_
    t0 = time.perf_counter()
    loop_idx = np.empty(n_loop, dtype=np.int64)
    for i in range(n_loop):  # the naive baseline: one pixel at a time
        loop_idx[i] = np.argmin((((dbp - queries[i]) ** 2) * w).sum(1))
    t_loop = time.perf_counter() - t0
    rows.append((f"naive numpy loop ({n_loop} px timed)", f"{n_loop / t_loop:,.0f} px/s",
                 f"ours {args.pixels / t_ours / (n_loop / t_loop):.0f}x faster; "
                 f"full raster would take {args.pixels * t_loop / n_loop:.0f} s"))
    assert (loop_idx == idx[:n_loop]).all(), "naive loop disagrees with the look-up"

    if args.kmeans:
        t0 = time.perf_counter()
        rp = RepresentativeProfiles(n_profiles=60, random_state=0).fit(raster)
        t_km = time.perf_counter() - t0
        rows.append((f"k-means 60 RPs of {args.pixels} x 473 (fit + labels)", f"{t_km:.2f} s",
                     f"{rp.n_iter_} Lloyd iterations"))

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    rows.append(("peak resident memory (whole script)", f"{peak:.2f} GiB", ""))
    load = os.getloadavg()[0]
    print(f"device={args.device} threads={args.threads} load_avg_1min={load:.1f} "
          f"(data generation {t_gen:.1f} s, not timed)")
    width = max(len(r[0]) for r in rows)
    print(f"| {'measurement'.ljust(width)} | value | note |")
    print(f"|{'-' * (width + 2)}|-------|------|")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value} | {note} |")


if __name__ == "__main__":
    main()
