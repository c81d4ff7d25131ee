"""deepIRIS² against the IRIS² look-up and the RP path, on held-out atmospheres.

The held-out set (``iris_lab/data/mgii_heldout.nc``: atmospheres never in the
database) becomes a synthetic raster with IRIS-like noise (intensity → DN for
an exposure of ``--exptime`` s, photon + read noise, → DN/s). The three
methods invert it:

* deepIRIS² (the shipped weights ``iris_lab/data/deepiris2.safetensors``, or
  ``--weights``),
* the IRIS² look-up (:class:`iris_lab.methods.iris2.IRIS2`, same database),
* the RP path (k-means RPs of the raster, each RP looked up, mapped back).

Printed tables: RMS error against the true models per quantity and log τ (and
the mean over −5 < log τ < −1, where the lines are sensitive), the UMF (eq. 3
of Sainz Dalda et al. 2019) per region (the atmosphere families) and quantity,
and the prediction speed for 220,000 spectra (a full raster) beside the
look-up's time on the same spectra and this machine's float32 GEMM rate, all
measured in the same run.

``--toy`` runs the whole comparison on the analytic stand-in database of
:func:`iris_lab.methods.iris2.toy_database` (training a deepIRIS² first), for
when the NLTE database is not at hand.

Usage: ``python benchmarks/deepiris2.py [--threads 2] [--pixels 220000]
[--exptime 8] [--toy]``
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from bench_timing import gemm_rate

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = (-6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0)
LABELS = {"temperature": "T [K]", "v_los": "v_los [km/s]", "v_turb": "v_turb [km/s]",
          "n_e": "log n_e [dex]"}
SCALE = {"temperature": 1.0, "v_los": 1e-5, "v_turb": 1e-5, "n_e": 1.0}



def noisy_raster(held, exptime: float, seed: int):
    """The held-out profiles as a (1, n) DN/s raster with photon and read noise."""
    import xarray as xr

    from iris_lab.instrument import iris_add_noise, iris_intensity_to_dn

    wl = held["wavelength"].values
    prof = held["profile"].transpose("entry", "wavelength").values.astype(np.float64)
    dn = iris_intensity_to_dn(prof, exptime, wavelength=wl)
    noisy = iris_add_noise(dn, rng=np.random.default_rng(seed)) / exptime
    return xr.DataArray(noisy[None].astype(np.float32), dims=("y", "x", "wavelength"),
                        coords={"wavelength": wl}, attrs={"units": "DN/s"})


def truth_of(held):
    t = held[["temperature", "v_los", "v_turb", "n_e"]].transpose("entry", "log_tau")
    return t.rename(entry="x").expand_dims(y=1).transpose("y", "x", "log_tau")


def rms_table(results: dict, truth) -> list[str]:
    lt = truth["log_tau"].values
    cols = [int(np.argmin(np.abs(lt - d))) for d in DEPTHS]
    window = (lt > -5) & (lt < -1)
    head = "| quantity | method | " + " | ".join(f"{lt[c]:g}" for c in cols) + \
        " | mean −5<logτ<−1 | ratio to look-up |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for q, label in LABELS.items():
        rms_all = {}
        for name, res in results.items():
            ok = ~(res["quality"].values & 1).astype(bool)
            est = res[q].values[ok].astype(np.float64)
            tru = truth[q].values[ok].astype(np.float64)
            if q == "n_e":
                est, tru = np.log10(est), np.log10(tru)
            rms_all[name] = np.sqrt(np.nanmean((est - tru) ** 2, axis=0)) * SCALE[q]
        ref = float(np.mean(rms_all["IRIS² look-up"][window]))
        for name, rms in rms_all.items():
            mean = float(np.mean(rms[window]))
            ratio = f"{mean / ref:.2f}"
            lines.append(f"| {label} | {name} | " + " | ".join(f"{rms[c]:.3g}" for c in cols)
                         + f" | {mean:.3g} | {ratio} |")
    return lines


def umf_lines(results: dict, truth, regions: dict) -> list[str]:
    from iris_lab.methods.umf import umf_summary, umf_table, uncertainty_multiplication_factor

    tables = {}
    for name, res in results.items():
        umf = uncertainty_multiplication_factor(res, truth)
        tables[name] = umf_table(umf_summary(umf, regions))
    first = next(iter(tables.values()))
    inside = [c for c in first.columns if c.startswith("UMF -")][0]
    lines = ["| region | quantity | " + " | ".join(f"{n} ({inside})" for n in tables) + " |",
             "|" + "---|" * (len(tables) + 2)]
    for i, row in first.iterrows():
        vals = " | ".join(f"{t.loc[i, inside]:.2f}" for t in tables.values())
        lines.append(f"| {row['region']} | {row['quantity']} | {vals} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pixels", type=int, default=220_000)
    p.add_argument("--exptime", type=float, default=8.0)
    p.add_argument("--database", default=str(ROOT / "iris_lab" / "data" / "mgii_database.nc"))
    p.add_argument("--heldout", default=str(ROOT / "iris_lab" / "data" / "mgii_heldout.nc"))
    p.add_argument("--weights", default=None, help="default: the shipped weights")
    p.add_argument("--n-rp", type=int, default=60)
    p.add_argument("--toy", action="store_true", help="analytic stand-in database")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    import xarray as xr

    torch.set_num_threads(args.threads)
    from iris_lab.methods.deep import DeepIRIS2
    from iris_lab.methods.iris2 import IRIS2, toy_database
    from iris_lab.methods.rp import RepresentativeProfiles, invert_representative_profiles

    t0 = time.perf_counter()
    if args.toy:
        db, held = toy_database(2000, seed=11), toy_database(400, seed=12)
        deep = DeepIRIS2(seed=args.seed, max_epochs=100, patience=15, progress=False).fit(db)
        source = "analytic toy database (2000 entries; held-out 400, other seed)"
    else:
        db = xr.load_dataset(args.database, engine="h5netcdf")
        held = xr.load_dataset(args.heldout, engine="h5netcdf")
        deep = DeepIRIS2.load(args.weights)
        source = (f"{Path(args.database).name} ({db.sizes['entry']} entries); "
                  f"{Path(args.heldout).name} ({held.sizes['entry']} held-out atmospheres)")
    t_setup = time.perf_counter() - t0
    lookup = IRIS2().fit(db)

    raster = noisy_raster(held, args.exptime, args.seed)
    truth = truth_of(held)
    families = held["family"].values.astype(str) if "family" in held else \
        np.array(["all"] * held.sizes["entry"])
    regions = {f: (families == f)[None] for f in np.unique(families)}
    n_rp = max(2, min(args.n_rp, held.sizes["entry"] // 4))
    rp = RepresentativeProfiles(n_profiles=n_rp, random_state=args.seed).fit(raster)
    results = {
        "deepIRIS²": deep.predict(raster),
        "IRIS² look-up": lookup.predict(raster),
        f"RP path ({n_rp} RPs)": invert_representative_profiles(lookup, rp, raster),
    }
    print(f"data: {source}; noise: exposure {args.exptime:g} s (photon + read noise, DN/s); "
          f"setup {t_setup:.1f} s")
    print("\nRMS error against the true models (masked pixels excluded), per log τ500:\n")
    print("\n".join(rms_table(results, truth)))
    print("\nUMF = |p - p_true| / σ_p, median per region, mean over −5 < log τ < −1:\n")
    print("\n".join(umf_lines(results, truth, regions)))

    # speed: a full raster of noisy held-out spectra
    rng = np.random.default_rng(args.seed)
    pick = rng.integers(0, raster.sizes["x"], args.pixels)
    spectra = raster.values[0, pick].astype(np.float32)   # DN/s float32, as read_iris_raster
    ny = 440 if args.pixels % 440 == 0 else 1
    big = xr.DataArray(spectra.reshape(ny, -1, spectra.shape[-1]), dims=("y", "x", "wavelength"),
                       coords={"wavelength": raster["wavelength"].values},
                       attrs={"units": "DN/s"})
    rate = gemm_rate(4096, 473, 1024) / 1e9
    deep.predict(big.isel(y=slice(0, 1)))  # warm-up
    t0 = time.perf_counter()
    deep.predict(big)
    t_deep = time.perf_counter() - t0
    t0 = time.perf_counter()
    lookup.predict(big)
    t_lookup = time.perf_counter() - t0
    print(f"\nspeed, {args.pixels} spectra (DN/s → result Dataset), threads={args.threads}, "
          f"load_avg_1min={os.getloadavg()[0]:.1f}, float32 GEMM {rate:.1f} GFLOP/s:\n")
    print("| method | time [s] | spectra/s | ratio |\n|---|---|---|---|")
    print(f"| deepIRIS² predict | {t_deep:.2f} | {args.pixels / t_deep:,.0f} | "
          f"{t_lookup / t_deep:.2f}× the look-up's speed |")
    print(f"| IRIS² look-up ({db.sizes['entry']} entries) | {t_lookup:.2f} | "
          f"{args.pixels / t_lookup:,.0f} | 1 |")


if __name__ == "__main__":
    main()
