"""FlareINN validation and speed against Radynversion (Osborne et al. 2019).

Validation on the held-out 20 % of the flare set: forward MSE in normalised
intensity (paper: 5.73e-5), calibration of the posterior (fraction of the true
values inside the 68 % and 95 % intervals, per quantity, below and above
3 Mm), and the RMS error of the posterior median per quantity and height band.

Speed: 20,000 posterior draws for one pixel (paper: 893 ms on a GTX 1050 Ti,
84.5 s on an i7-8700 CPU) and the posterior summary of a map with 200 draws
per pixel, each beside its floor on this machine: the network's matrix-multiply
FLOPs per draw times the number of draws, divided by the float32 GEMM rate
measured in the same run. Timed for the shipped network and for the
paper-sized architecture (width 384, hidden 384; random weights — the time
does not depend on their values).

Example
-------
``OMP_NUM_THREADS=2 python benchmarks/flare_inn.py --map-size 100``
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from bench_timing import best_time, gemm_rate

from iris_lab.methods.inn import (
    QUANTITIES,
    FlareINN,
    atmosphere_to_x,
    held_out_halves,
    normalise_profiles,
)
from iris_lab.methods.inn_fast import load_kernels

REPO = Path(__file__).resolve().parents[1]
PAPER = {"forward_mse": 5.73e-5, "draws_20000_gpu_s": 0.893, "draws_20000_cpu_s": 84.5}



def regression_reference(inn: FlareINN, data: xr.Dataset, held: xr.Dataset,
                         seconds: float, seed: int = 0) -> None:
    """Forward MSE of a plain regression network on the same data.

    A fully connected network (3 × 256, leaky ReLU) fitted directly x → y by
    Adam on the training samples (``held_out`` false) for ``seconds``: an upper
    bound on what the training set allows the forward direction to learn, with
    no invertibility, latent or MMD terms. Its held-out MSE (the same half as
    the INN's row) beside its training MSE tells a data limit (both small on
    training, both large on held-out) from an INN limit.
    """
    import time

    train = data.isel(sample=np.flatnonzero(~np.asarray(data["held_out"].values, bool)
                                            & np.asarray(data["converged"].values, bool)))

    def arrays(ds):
        x = atmosphere_to_x(ds["n_e"].values, ds["temperature"].values, ds["v_los"].values)
        y = normalise_profiles(ds["halpha"].values, ds["ca8542"].values)
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)

    x_tr, y_tr = arrays(train)
    x_te, y_te = arrays(held)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    width = 256
    net = torch.nn.Sequential(
        torch.nn.Linear(x_tr.shape[1], width), torch.nn.LeakyReLU(),
        torch.nn.Linear(width, width), torch.nn.LeakyReLU(),
        torch.nn.Linear(width, width), torch.nn.LeakyReLU(),
        torch.nn.Linear(width, y_tr.shape[1]))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    best = (np.inf, np.inf)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        idx = torch.randint(0, x_tr.shape[0], (128,), generator=gen)
        loss = ((net(x_tr[idx]) - y_tr[idx]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 500 == 0:
            with torch.no_grad():
                fit = float(((net(x_tr) - y_tr) ** 2).mean())
                test = float(((net(x_te) - y_te) ** 2).mean())
            best = min(best, (test, fit))
    pred_tr = inn.predict_profiles(train["n_e"].values, train["temperature"].values,
                                   train["v_los"].values)
    inn_fit = float(((pred_tr - y_tr.numpy()) ** 2).mean())
    print(f"| forward MSE on its training samples ({x_tr.shape[0]}) | {inn_fit:.3g} | — |")
    print(f"| plain regression x → y, same data ({step} Adam steps, {seconds:.0f} s): "
          f"held-out (best) / training | {best[0]:.3g} / {best[1]:.3g} | — |")


def validation(inn: FlareINN, data: xr.Dataset, n_pixels: int, n_draws: int,
               regression_seconds: float = 0.0) -> None:
    # the second half of the held-out sequences: the first chose the latent scale
    _, mask = held_out_halves(data)
    held = data.isel(sample=np.flatnonzero(mask))
    print(f"\nlatent scale {inn.latent_scale_} (chosen on the other held-out half: "
          f"{getattr(inn, 'latent_calibration_', {}).get('coverage', 'not calibrated')}); "
          f"68 % coverage on this half with latent scale 1: "
          f"{_coverage_at(inn, held, 1.0, min(n_draws, 200)):.2f}")
    y = normalise_profiles(held["halpha"].values, held["ca8542"].values)
    pred = inn.predict_profiles(held["n_e"].values, held["temperature"].values,
                                held["v_los"].values)
    mse = float(((pred - y) ** 2).mean())
    print(f"\nheld-out samples: {held.sizes['sample']}")
    print("| metric | FlareINN | Radynversion paper |\n|---|---|---|")
    print(f"| forward MSE (normalised intensity) | {mse:.3g} | {PAPER['forward_mse']:.3g} |")
    if regression_seconds > 0:
        regression_reference(inn, data, held, regression_seconds)

    rng = np.random.default_rng(0)
    pick = rng.choice(held.sizes["sample"], min(n_pixels, held.sizes["sample"]), replace=False)
    sub = held.isel(sample=np.sort(pick))
    draws = inn.sample((sub["halpha"].values, sub["ca8542"].values), n_draws, seed=1)
    nh = inn.n_height_
    truth = atmosphere_to_x(sub["n_e"].values, sub["temperature"].values, sub["v_los"].values)
    xd = atmosphere_to_x(draws["n_e"], draws["temperature"], draws["v_los"])
    lo68, hi68, lo95, hi95, med = np.percentile(xd, [16, 84, 2.5, 97.5, 50], axis=-2)
    low = inn.heights_ < 3e8
    print(f"\nposterior calibration ({len(pick)} held-out pixels × {n_draws} draws): fraction "
          "of true values inside the interval (ideal 0.68 / 0.95); RMS of the median in "
          "log10 n_e [dex], log10 T [dex], signed log10(|v|/1 km/s + 1)")
    print("| quantity | band | in 68 % | in 95 % | median RMS |\n|---|---|---|---|---|")
    for i, q in enumerate(QUANTITIES):
        sl = slice(i * nh, (i + 1) * nh)
        for band, sel in (("< 3 Mm", low), ("≥ 3 Mm", ~low)):
            t, a68, b68 = truth[:, sl][:, sel], lo68[:, sl][:, sel], hi68[:, sl][:, sel]
            a95, b95, m = lo95[:, sl][:, sel], hi95[:, sl][:, sel], med[:, sl][:, sel]
            c68 = np.mean((t >= a68) & (t <= b68))
            c95 = np.mean((t >= a95) & (t <= b95))
            rms = np.sqrt(np.mean((m - t) ** 2))
            print(f"| {q} | {band} | {c68:.2f} | {c95:.2f} | {rms:.3f} |")
    rms_h = np.sqrt(np.mean((med - truth) ** 2, axis=0)).reshape(3, nh)
    print("\nmedian RMS per height (every 5th height, Mm: log n_e / log T / v):")
    for j in range(0, nh, 5):
        print(f"  {inn.heights_[j] / 1e8:6.2f}  {rms_h[0, j]:.3f} / {rms_h[1, j]:.3f} / "
              f"{rms_h[2, j]:.3f}")


def _coverage_at(inn: FlareINN, data: xr.Dataset, scale: float, n_draws: int) -> float:
    kept = inn.latent_scale_
    inn.latent_scale_ = scale
    try:
        return inn.coverage(data, n_draws=n_draws)
    finally:
        inn.latent_scale_ = kept


def _rate() -> float:
    """The floor's float32 GEMM rate [FLOP/s], measured now."""
    return gemm_rate(8192, 384, 384, repeats=10)


def _paired(fn, flops: float, repeats: int) -> tuple[float, float, float]:
    """Median time of ``fn``, median GEMM rate and the median of the paired ratios
    time / floor over ``repeats`` rounds; each round's floor uses the rate measured
    just before and just after its timing (this machine's GEMM rate drifts by ±20 %
    within seconds: unpaired best-of figures mix different moments)."""
    fn()  # warm-up (kernels compiled, buffers paged in)
    times, rates, ratios = [], [], []
    for _ in range(repeats):
        before = _rate()
        t = best_time(fn, 1)
        rate = 0.5 * (before + _rate())
        times.append(t)
        rates.append(rate)
        ratios.append(t * rate / flops)
    return float(np.median(times)), float(np.median(rates)), float(np.median(ratios))


def speed(label: str, inn: FlareINN, map_size: int, n_draws_map: int,
          repeats: int = 5) -> None:
    fl = inn.flops_per_draw()
    prof = np.concatenate([np.linspace(0.3, 1.0, inn.n_halpha_),
                           np.linspace(0.5, 1.0, inn.n_ca8542_)])
    t1, rate1, q1 = _paired(lambda: inn.sample(prof, 20000, seed=0), fl * 20000,
                            max(repeats, 5))
    cube = xr.Dataset(
        {"halpha": (("y", "x", "dl_halpha"),
                    np.broadcast_to(prof[:inn.n_halpha_], (map_size, map_size, inn.n_halpha_))
                    * (1 + 0.01 * np.random.default_rng(0).random((map_size, map_size, 1)))),
         "ca8542": (("y", "x", "dl_ca8542"),
                    np.broadcast_to(prof[inn.n_halpha_:], (map_size, map_size, inn.n_ca8542_)))},
        coords={"dl_halpha": inn.dl_halpha_, "dl_ca8542": inn.dl_ca8542_})
    n_rt = 16
    t2, rate2, q2 = _paired(
        lambda: inn.posterior_summary(cube, n_draws_map, n_round_trip=n_rt),
        fl * map_size ** 2 * (n_draws_map + n_rt), repeats)
    print(f"| {label}: 20,000 draws, 1 pixel | {fl / 1e6:.2f} | {t1:.3f} s | "
          f"{fl * 20000 / rate1:.3f} s | {q1:.2f} | {rate1 / 1e9:.1f} | "
          "893 ms GPU / 84.5 s CPU |")
    print(f"| {label}: {map_size}×{map_size} map × {n_draws_map} draws (+{n_rt} round trip) | "
          f"{fl / 1e6:.2f} | {t2:.1f} s | {fl * map_size ** 2 * (n_draws_map + n_rt) / rate2:.1f} s"
          f" | {q2:.2f} | {rate2 / 1e9:.1f} | — |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="default: the shipped weights")
    p.add_argument("--data", default=str(REPO / "iris_lab/data/flare_set.nc"))
    p.add_argument("--pixels", type=int, default=300, help="held-out pixels for calibration")
    p.add_argument("--draws", type=int, default=1000, help="draws per pixel for calibration")
    p.add_argument("--map-size", type=int, default=100)
    p.add_argument("--map-draws", type=int, default=200)
    p.add_argument("--paper-map-size", type=int, default=25,
                   help="map side for the paper-sized network (the 100×100 map takes long; "
                        "0: skip the paper-sized network)")
    p.add_argument("--also", nargs="*", default=[],
                   help="other weights files to time beside the shipped network")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-speed", action="store_true", help="validation only")
    p.add_argument("--regression-seconds", type=float, default=0.0,
                   help="also fit a plain x → y regression network this long on the same "
                        "training samples (a data-limited reference for the forward MSE)")
    p.add_argument("--skip-validation", action="store_true", help="speed only")
    args = p.parse_args()
    inn = (FlareINN.load(args.weights, device=args.device) if args.weights
           else FlareINN.load_shipped(device=args.device))
    inn.progress = False
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(f"shipped network: width {inn.width}, hidden {inn.hidden}, latent {inn.n_latent}, "
          f"{inn.n_blocks} blocks, {inn.n_parameters():,} weights; provenance: "
          f"{getattr(inn, 'provenance_', {}).get('data', '?')}, "
          f"{getattr(inn, 'provenance_', {}).get('n_samples', '?')} samples")
    if args.skip_validation:
        pass
    elif Path(args.data).exists():
        validation(inn, xr.load_dataset(args.data, engine="h5netcdf"), args.pixels, args.draws,
                   args.regression_seconds)
    else:
        print(f"(no flare set at {args.data}: validation skipped)")
    if args.skip_speed:
        return
    # the floor's rate is measured just before and after each timed round (paired ratios)
    print(f"\nload average {os.getloadavg()[0]:.2f}; fused kernels: {load_kernels() is not None}")
    print("| case | MFLOP/draw | time (median) | floor | time/floor (median of paired rounds) | "
          "GEMM GFLOP/s | paper |\n"
          "|---|---|---|---|---|---|---|")
    speed("shipped", inn, args.map_size, args.map_draws)
    for other in args.also:
        net = FlareINN.load(other, device=args.device)
        net.progress = False
        speed(f"{Path(other).stem} (width {net.width}, hidden {net.hidden})", net,
              args.map_size, args.map_draws)
    if args.paper_map_size <= 0:
        print(f"load average after: {os.getloadavg()[0]:.2f}")
        return
    paper = FlareINN(width=384, hidden=384, n_latent=200, n_blocks=5, device=args.device,
                     progress=False)
    paper.n_height_, paper.n_halpha_, paper.n_ca8542_ = inn.n_height_, inn.n_halpha_, \
        inn.n_ca8542_
    paper.x_mean_, paper.x_std_ = inn.x_mean_, inn.x_std_
    paper.heights_, paper.dl_halpha_, paper.dl_ca8542_ = (inn.heights_, inn.dl_halpha_,
                                                          inn.dl_ca8542_)
    paper._build()
    paper.net_.eval()
    speed("paper-sized", paper, args.paper_map_size, args.map_draws, repeats=3)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
