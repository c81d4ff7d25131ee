"""IRIS² look-up and k-means at full-raster scale.

220,000 spectra (a 440 × 500 raster) against a 15,000-entry database of 473
wavelengths (analytic stand-in profiles, :func:`iris_lab.methods.iris2.toy_database`;
the queries are held-out entries with 3% noise). Prints one table, every row
measured in the same run:

* the float32 GEMM rate of this machine (at the start and at the end of the
  run) and the brute-force time it implies (2 · N_pix · N_db · N_λ flop),
* ``IRIS2.predict`` (exact search + model, σ, χ², index, quality maps), with
  the time of building the search (included) and the pruning statistics,
* agreement with a brute-force float64 search on a random subset,
* a naive numpy loop (one pixel at a time) timed on a subset, as pixels/s,
* k-means (``RepresentativeProfiles``, 60 RPs) of the same 220,000 × 473, and
  on a random subset its agreement with plain full-space k-means (adjusted Rand
  index, inertia ratio; the Rand index of two full-space runs with different
  seeds as the yardstick),
* peak resident memory and the load average.

Usage: ``python benchmarks/iris2_lookup.py [--threads 2] [--pixels 220000]
[--entries 15000] [--check 2000] [--loop 100] [--kmeans-check 10000]
[--device cpu] [--full-brute-force]``
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
    parser.add_argument("--check", type=int, default=2000, help="brute-force subset size")
    parser.add_argument("--loop", type=int, default=100, help="naive-loop subset size")
    parser.add_argument("--kmeans-check", type=int, default=10000,
                        help="subset size of the full-space k-means comparison (0: skip)")
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

    load_start = os.getloadavg()[0]
    rows: list[tuple[str, str, str]] = []
    rate = gemm_rate(4096, 473, 15000, device=args.device, repeats=3) / 1e9
    flop = 2.0 * args.pixels * args.entries * 473
    t_brute = flop / rate / 1e9

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
    model._search(model.weights_)
    t_build = time.perf_counter() - t0
    model.__dict__.pop("_searches")
    t0 = time.perf_counter()
    result = model.predict(raster)
    t_ours = time.perf_counter() - t0
    rows.append((f"IRIS2.predict, exact ({args.pixels:,} px x {args.entries:,} entries x 473)",
                 f"{t_ours:.2f} s", f"{args.pixels / t_ours:,.0f} px/s; "
                 f"{t_brute / t_ours:.1f}x faster than the brute-force GEMM below"))
    rows.append(("  of which building the search (projection basis, bounds, tree)",
                 f"{t_build:.2f} s", "once per weight pattern"))
    rows.append(("float32 GEMM rate (4096x473 @ 473x15000), start of run", f"{rate:.1f} GFLOP/s",
                 ""))
    rows.append(("brute force implied by that rate (same pixels and entries)",
                 f"{t_brute:.1f} s", f"{flop / 1e12:.2f} TFLOP; {args.pixels / t_brute:,.0f} px/s"))

    search = next(iter(model._searches.values()))
    st = search.stats_
    rows.append(("  exact float64 candidates per pixel; pixels needing the radius query",
                 f"{st['candidates'] / st['pixels']:.2f}; "
                 f"{100 * st['fallback'] / st['pixels']:.1f} %",
                 f"bound in {search.n_components_} + 1 dims, {search.n_candidates} tree "
                 "candidates (brute force: 15,000 per pixel)"))
    idx = result["index"].values.ravel()
    chi2 = result["chi2"].values.ravel()
    sub = rng.choice(args.pixels, size=min(args.check, args.pixels), replace=False)
    t0 = time.perf_counter()
    ref_idx, ref_chi2 = brute_force_lookup(model, queries[sub])
    t_ref = time.perf_counter() - t0
    same = float((ref_idx == idx[sub]).mean())
    rel = float(np.max(np.abs(chi2[sub] - ref_chi2) / ref_chi2))
    rows.append((f"identical best match vs brute force float64 ({len(sub):,} random px)",
                 f"{same * 100:.2f} %", f"max rel. chi2 difference {rel:.1e} (float32 map); "
                 f"float64 brute force {len(sub) / t_ref:,.0f} px/s"))

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
        import sklearn.cluster  # noqa: F401  (library import, ~1-4 s, not timed)
        from sklearn.metrics import adjusted_rand_score

        t0 = time.perf_counter()
        rp = RepresentativeProfiles(n_profiles=60, random_state=0).fit(raster)
        t_km = time.perf_counter() - t0
        rows.append((f"k-means 60 RPs of {args.pixels:,} x 473 (fit + labels)", f"{t_km:.2f} s",
                     f"PCA {rp.n_dims_} of 473 dims (99.9 % of the variance); k-means++ and "
                     f"Lloyd on {rp.init_rows:,} profiles, then {rp.n_iter_} Lloyd iterations "
                     "on all; float64 full-space means"))
        if args.kmeans_check:
            ks = rng.choice(args.pixels, size=min(args.kmeans_check, args.pixels),
                            replace=False)
            part = xr.DataArray(queries[np.sort(ks)][None], dims=("y", "x", "wavelength"),
                                coords={"wavelength": db.wavelength.values},
                                attrs={"units": INTENSITY_UNITS})
            ours = RepresentativeProfiles(n_profiles=60, random_state=0,
                                          init_rows=len(ks) // 4).fit(part)
            t0 = time.perf_counter()
            full = RepresentativeProfiles(n_profiles=60, random_state=0, variance=None,
                                          init_rows=None, max_iter=100).fit(part)
            t_full = time.perf_counter() - t0
            other = RepresentativeProfiles(n_profiles=60, random_state=1, variance=None,
                                           init_rows=None, max_iter=100).fit(part)
            ari = adjusted_rand_score(full.labels_.values.ravel(), ours.labels_.values.ravel())
            ari_ref = adjusted_rand_score(full.labels_.values.ravel(),
                                          other.labels_.values.ravel())
            rows.append((f"  agreement with full-space k-means ({len(ks):,} random px)",
                         f"ARI {ari:.3f}; inertia ratio {ours.inertia_ / full.inertia_:.4f}",
                         f"full-space seed 0 vs seed 1: ARI {ari_ref:.3f}, inertia ratio "
                         f"{other.inertia_ / full.inertia_:.4f}; full-space fit "
                         f"{t_full:.1f} s ({full.n_iter_} iterations)"))

    rate_end = gemm_rate(4096, 473, 15000, device=args.device, repeats=3) / 1e9
    rows.append(("float32 GEMM rate, end of run", f"{rate_end:.1f} GFLOP/s",
                 f"brute force implied {flop / rate_end / 1e9:.1f} s"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    rows.append(("peak resident memory (whole script)", f"{peak:.2f} GiB", "goal <= 4 GiB"))
    print(f"device={args.device} threads={args.threads} load average (1 min) "
          f"{load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end "
          f"(data generation {t_gen:.1f} s, not timed)")
    width = max(len(r[0]) for r in rows)
    print(f"| {'measurement'.ljust(width)} | value | note |")
    print(f"|{'-' * (width + 2)}|-------|------|")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value} | {note} |")


if __name__ == "__main__":
    main()
