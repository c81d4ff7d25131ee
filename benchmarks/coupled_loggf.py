"""Coupled inversion of atomic parameters: accuracy per mode and cost per iteration.

Three sub-commands print Markdown tables:

``scaling``
    Time of the linear algebra of one coupled LM iteration (normal-equation
    blocks from the Jacobians, Marquardt scaling, Schur-complement solve)
    against a dense solve of the same system, for 100, 300, 1000, 3000
    pixels, with the problem size of the 4015–4017 Å experiment (n = 16
    local parameters, k = 2 (L − 1) global ones, m = 4 × 201 data). Also the
    measured cost of one LTE forward pass per pixel on this machine.
``lte``
    The paper's experiment (Vukadinović et al. 2024) with the LTE engine on
    the project's photospheric field of view: initial log(gf) ~ N(exact,
    0.2 dex), Δλ ~ N(exact, 5 mÅ), bounds [−2.0, 1.5] dex and [−30, 22] mÅ
    relative to exact; T at 4 nodes (−2.5, −1.5, −0.5, 0.4), v_los, v_turb,
    B, inclination at 3 (−2.2, −1.1, 0); modes 1, 2, 3 and the spatially
    averaged method; S/N none, 1000, 300. Prints line-depth-weighted mean
    |Δlog gf| ± s.e., mean |Δλ|, RMSD of T, v_los, B between the outer nodes,
    χ²_ν and wall time.
``proxy``
    The same protocol on an analytic multi-line forward model (Gaussian
    lines with Boltzmann-like temperature sensitivity, blends, saturation) —
    cheap enough for 1000 pixels on 2 cores; a check of the algorithms, not
    of the physics.

Example: ``OMP_NUM_THREADS=1 python benchmarks/coupled_loggf.py scaling``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from bench_timing import best_time

from iris_lab.inversion.coupled import (
    AtomicInversion,
    AtomicParameters,
    CoupledLevenbergMarquardt,
    NormalBlocks,
    dense_solve,
    schur_solve,
)
from iris_lab.inversion.experiment import depth_weighted_error

DT = torch.float64
PAPER = {2: 0.025, 3: 0.004}



# ----------------------------------------------------------------------------- scaling
def scaling(pixels, n=16, k=34, m=804, dense_max=300, chunk=250, seed=0) -> None:
    gen = torch.Generator().manual_seed(seed)
    print(f"\n### Linear algebra per coupled LM iteration (n={n}, k={k}, m={m})\n")
    print("| pixels | blocks + Schur solve [s] | per pixel [ms] | dense solve [s] "
          "| dense / Schur |")
    print("|---:|---:|---:|---:|---:|")
    for p in pixels:
        # Jacobians are produced chunk by chunk in the fit; time the same here
        jl = [torch.randn(min(chunk, p - s), m, n, generator=gen, dtype=DT)
              for s in range(0, p, chunk)]
        jg = [torch.randn(j.shape[0], m, k, generator=gen, dtype=DT) for j in jl]
        rr = [torch.randn(j.shape[0], m, generator=gen, dtype=DT) for j in jl]

        def blocks(jl=jl, jg=jg, rr=rr):
            out = None
            for a, b, c in zip(jl, jg, rr, strict=True):
                part = NormalBlocks.from_jacobians(a, b, c)
                out = part if out is None else out + part
            return out

        full = blocks()

        def schur(blocks=blocks):
            scaled, dl, dg = blocks().damped(1e-2)
            return schur_solve(scaled)

        t_schur = best_time(schur, repeats=3 if p < 1000 else 1)
        if p <= dense_max:
            scaled, _, _ = full.damped(1e-2)
            t_dense = best_time(lambda scaled=scaled: dense_solve(scaled), repeats=1)
            t_dense += best_time(lambda blocks=blocks: blocks().damped(1e-2), repeats=1)
            dense = f"{t_dense:.3f} | {t_dense / t_schur:.1f}"
        else:
            size = (p * n + k) ** 2 * 8 / 2 ** 30
            dense = f"not run ({size:.1f} GiB matrix) | —"
        print(f"| {p} | {t_schur:.3f} | {1e3 * t_schur / p:.3f} | {dense} |")


def iteration_cost(pixels, seed: int = 0) -> None:
    """Wall time of one whole coupled LM iteration with the LTE engine (the
    notebook's 5-line problem, the paper's node layout): Jacobians by batched
    forward differences, normal-equation blocks, Schur solve, trial model."""
    from iris_lab.atomic import LineList
    from iris_lab.inversion.experiment import SMALL_LINES, small_log_tau, window_wavelengths
    from iris_lab.inversion.lm import _weighted_data
    from iris_lab.inversion.lte import LTEForward, default_nodes, quiet_sun_start
    from iris_lab.nodes import NodeModel
    from iris_lab.synthesis.lte import LTESynthesizer
    from iris_lab.worlds.photosphere import sample_photosphere_fov, synthesize_fov

    lines = LineList.shipped("4015_4017").select(list(SMALL_LINES))
    wave = window_wavelengths(lines.wavelength_air)
    model = NodeModel(default_nodes(), log_tau=small_log_tau())
    synth = LTESynthesizer(lines, wave)
    i_c = float(np.asarray(synth.continuum_intensity().detach()).ravel()[0])
    fwd = LTEForward(model, synth, continuum=i_c)
    atomic = AtomicParameters(len(lines), reference_line=1)
    k = atomic.n_parameters
    start = quiet_sun_start(model, b_field=300.0, inclination=1.0, v_turb=0.8e5, azimuth=None)
    n = start.size
    print(f"\n### One coupled LM iteration with the LTE engine ({len(lines)} lines, "
          f"{wave.size} wavelengths × IQUV, {model.log_tau.size} depths; n = {n}, k = {k})\n")
    print("| pixels | Jacobians + blocks [s] | Schur solve [s] | trial model [s] | "
          "iteration [s] | per pixel [ms] |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in pixels:
        side = int(np.ceil(np.sqrt(p)))
        atm, _ = sample_photosphere_fov(side, side, seed=seed, log_tau=small_log_tau())
        obs = synthesize_fov(atm, lines, wave)["clean"].values.reshape(side * side, -1)[:p]
        obs_t, sqrt_w = _weighted_data(torch.as_tensor(obs), 1e-3, 1.0, DT, "cpu")
        x = torch.tensor(np.broadcast_to(start, (p, n)).copy(), dtype=DT)
        g = torch.zeros(k, dtype=DT)
        solver = CoupledLevenbergMarquardt(jacobian="batched", chunk_size=256)
        lo, hi = model.bounds
        solver._fd_scale = torch.as_tensor(np.r_[hi - lo, np.full(k, 0.05)], dtype=DT)

        def coupled(local, glob):
            gf, dl = atomic.split(glob)
            return fwd.atomic(local, gf, dl)

        t0 = time.perf_counter()
        blocks, _ = solver.linearise(coupled, x, g, obs_t, sqrt_w)
        t1 = time.perf_counter()
        scaled, dl, dg = blocks.damped(1e-1)
        dx, dgl = schur_solve(scaled)
        t2 = time.perf_counter()
        solver._model(coupled, x + dx / dl, g + dgl / dg)
        t3 = time.perf_counter()
        print(f"| {p} | {t1 - t0:.2f} | {t2 - t1:.3f} | {t3 - t2:.2f} | {t3 - t0:.2f} | "
              f"{1e3 * (t3 - t0) / p:.1f} |")


# ----------------------------------------------------------------------------- metrics
def run_modes(forward, observed, local0, truth_gf, truth_dl, atomic, depth_w, *, sigma,
              g0, glo, ghi, llo, lhi, names, modes, max_iter, strat=None):
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        inv = AtomicInversion(mode, atomic, max_iter=max_iter,
                              coupled_options={"n_perturbations": 2, "chi2_target": 1.2})
        inv.fit(forward, observed, local0, global0=g0, sigma=sigma, local_lower=llo,
                local_upper=lhi, global_lower=glo, global_upper=ghi, local_names=names)
        wall = time.perf_counter() - t0
        free = atomic.free_lines
        e_gf = (inv.log_gf_offset_.numpy() - truth_gf)[free]
        e_dl = (inv.dlambda_.numpy() - truth_dl)[free]
        gf_mean, gf_se = depth_weighted_error(e_gf, depth_w[free])
        row = {"mode": mode, "gf": gf_mean, "gf_se": gf_se,
               "dl": 1e3 * float(np.mean(np.abs(e_dl))),
               "chi2": float(np.nanmean(inv.dataset_["chi2_reduced"].values)), "wall": wall}
        if mode == 1:
            row["gf"] = row["gf_se"] = row["dl"] = np.nan
        if strat is not None:
            row.update(strat(inv.local_))
        rows.append(row)
    return rows


def print_rows(title: str, rows, extra=()) -> None:
    print(f"\n### {title}\n")
    cols = ["mode", "⟨∣Δlog gf∣⟩_depth [dex]", "paper", "⟨∣Δλ∣⟩ [mÅ]", *extra, "χ²_ν",
            "wall [s]"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        paper = PAPER.get(r["mode"], "—")
        gf = "—" if np.isnan(r["gf"]) else f"{r['gf']:.4f} ± {r['gf_se']:.4f}"
        dl = "—" if np.isnan(r["dl"]) else f"{r['dl']:.2f}"
        cells = [str(r["mode"]), gf, str(paper), dl] + [f"{r[e]:.3g}" for e in extra] + \
            [f"{r['chi2']:.3g}", f"{r['wall']:.1f}"]
        print("| " + " | ".join(cells) + " |")


# ----------------------------------------------------------------------------- proxy
def proxy(n_pix: int, snrs, modes, max_iter: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    n_lines = 18
    wave = torch.linspace(-1.0, 1.0, 201, dtype=DT)
    centres = torch.tensor(np.sort(rng.uniform(-0.9, 0.9, n_lines)), dtype=DT)
    energy = torch.tensor(rng.uniform(0.0, 4.5, n_lines), dtype=DT)
    log_gf = torch.tensor(rng.uniform(-1.5, 0.5, n_lines), dtype=DT)

    def spectrum(local, gf, dl):
        theta, v, w = local[:, :1], local[:, 1:2], local[:, 2:3]
        eta = 10.0 ** (log_gf + gf - theta * energy)
        phi = torch.exp(-(((wave[None, :, None] - (centres + dl + v)[:, None, :])
                           / w[:, None]) ** 2))
        return torch.exp(-(eta[:, None, :] * phi).sum(-1))

    local = torch.tensor(np.column_stack([rng.uniform(0.1, 0.5, n_pix),
                                          rng.uniform(-0.03, 0.03, n_pix),
                                          rng.uniform(0.02, 0.04, n_pix)]), dtype=DT)
    zeros = torch.zeros(n_pix, n_lines, dtype=DT)
    clean = spectrum(local, zeros, zeros)
    mean_spec = clean.mean(0)
    idx = torch.argmin((wave[:, None] - centres[None]).abs(), 0)
    depth_w = (1.0 - mean_spec[idx]).numpy()
    ref = int(np.argmax(depth_w))
    atomic = AtomicParameters(n_lines, reference_line=ref)
    g0 = atomic.join(rng.normal(0, 0.2, n_lines), rng.normal(0, 0.005, n_lines))
    k_half = len(atomic.free_lines)
    glo = np.r_[np.full(k_half, -2.0), np.full(k_half, -0.030)]
    ghi = np.r_[np.full(k_half, 1.5), np.full(k_half, 0.022)]
    start = torch.tensor([0.3, 0.0, 0.03], dtype=DT).expand(n_pix, 3).clone()
    for snr in snrs:
        noise = 0.0 if snr is None else \
            torch.sqrt(clean) / snr * torch.randn(clean.shape, dtype=DT,
                                                  generator=torch.Generator().manual_seed(1))
        rows = run_modes(spectrum, clean + noise, start, np.zeros(n_lines), np.zeros(n_lines),
                         atomic, depth_w, sigma=1e-4 if snr is None else 1.0 / snr, g0=g0,
                         glo=glo, ghi=ghi, llo=[0.0, -0.1, 0.01], lhi=[1.0, 0.1, 0.08],
                         names=["theta", "v", "w"], modes=modes, max_iter=max_iter)
        print_rows(f"Analytic-line proxy, {n_pix} pixels, {n_lines} lines, S/N = "
                   f"{'∞' if snr is None else snr}", rows)


# ----------------------------------------------------------------------------- LTE
def lte(ny: int, nx: int, snrs, modes, max_iter: int, *, lines: str, grid: str,
        step: float, seed: int = 0, out: str | None = None) -> None:
    """The paper's experiment with the LTE engine, through
    :func:`iris_lab.inversion.experiment.run_coupled_experiment` (the same
    code the notebook runs); one table per S/N, each result written to
    ``<out>_snr<S/N>.nc`` when ``out`` is given."""
    from iris_lab.atomic import LineList
    from iris_lab.inversion.experiment import (
        SMALL_LINES,
        run_coupled_experiment,
        small_log_tau,
        summary_table,
        window_wavelengths,
    )
    from iris_lab.inversion.lte import default_nodes
    from iris_lab.worlds.photosphere import photosphere_log_tau

    line_idx = list(range(18)) if lines == "all" else list(SMALL_LINES)
    log_tau = photosphere_log_tau() if grid == "fine" else small_log_tau()
    centres = LineList.shipped("4015_4017").select(line_idx).wavelength_air
    wave = window_wavelengths(centres, step)
    for snr in snrs:
        t0 = time.perf_counter()
        ds = run_coupled_experiment(ny, nx, lines=line_idx, wavelengths=wave, log_tau=log_tau,
                                    nodes=default_nodes(), snr=snr, modes=modes,
                                    max_iter=max_iter, seed=seed, progress=False)
        label = "inf" if snr is None else f"{snr:g}"
        if out:
            ds.to_netcdf(f"{out}_snr{label}.nc", engine="h5netcdf")
        table = summary_table(ds)
        print(f"\n### LTE engine, {ny}×{nx} pixels, {len(line_idx)} lines, "
              f"{wave.size} wavelengths, {log_tau.size} depths, S/N = "
              f"{'∞' if snr is None else snr}  ({time.perf_counter() - t0:.0f} s in all; "
              f"reference line {ds.attrs['reference_line_label']})\n")
        cols = [c.replace("|", "∣") for c in table.columns]   # no pipes inside cells
        print("| | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for name, row in table.iterrows():
            cells = ["—" if not np.isfinite(v) else f"{v:.4g}" for v in row.values]
            print(f"| {name} | " + " | ".join(cells) + " |")


def _snr(value: str):
    return None if value.lower() in ("none", "inf") else float(value)


def _mode(value: str):
    return value if value == "averaged" else int(value)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("scaling")
    p.add_argument("--pixels", type=int, nargs="+", default=[100, 300, 1000, 3000])
    p.add_argument("--dense-max", type=int, default=300)
    p.add_argument("--engine", type=int, nargs="*", default=None,
                   help="also time whole iterations with the LTE engine at these pixel counts")
    p = sub.add_parser("proxy")
    p.add_argument("--pixels", type=int, default=1000)
    p.add_argument("--snr", type=_snr, nargs="+", default=[None, 1000.0, 300.0])
    p.add_argument("--modes", type=_mode, nargs="+", default=[1, 2, 3, "averaged"])
    p.add_argument("--max-iter", type=int, default=60)
    p = sub.add_parser("lte")
    p.add_argument("--ny", type=int, default=10)
    p.add_argument("--nx", type=int, default=10)
    p.add_argument("--snr", type=_snr, nargs="+", default=[None, 1000.0, 300.0])
    p.add_argument("--modes", type=_mode, nargs="+", default=[1, 2, 3, "averaged"])
    p.add_argument("--max-iter", type=int, default=40)
    p.add_argument("--lines", choices=["small", "all"], default="small",
                   help="the 5 lines of the notebook's problem or all 18")
    p.add_argument("--grid", choices=["coarse", "fine"], default="coarse",
                   help="log τ grid: 24 points (−3.6…1.0) or 51 (−4…1)")
    p.add_argument("--step", type=float, default=0.02, help="wavelength step [Å]")
    p.add_argument("--out", default=None, help="netCDF prefix for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.what == "scaling":
        scaling(args.pixels, dense_max=args.dense_max)
        if args.engine:
            iteration_cost(args.engine)
    elif args.what == "proxy":
        proxy(args.pixels, args.snr, args.modes, args.max_iter)
    else:
        lte(args.ny, args.nx, args.snr, args.modes, args.max_iter, lines=args.lines,
            grid=args.grid, step=args.step, out=args.out)


if __name__ == "__main__":
    main()
