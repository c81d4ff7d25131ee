"""Throughput of the torch LTE engine vs Lightweaver LTE on the 4015-4017 Å window.

Work: N atmospheres (default 1000) × the 18 shipped lines × 501 wavelengths
(4015.0-4017.0 Å, air), Stokes I at disk centre. Atmospheres: FAL-C's
T(log τ500) on 51 points (log τ = -4 … 1) perturbed at four nodes (±300 K),
v_los (±1 km/s) and v_turb, put in hydrostatic equilibrium once by
:mod:`iris_lab.eos`; both codes then get the same heights and densities.

Lightweaver (detailed-static LTE, model atoms built from the same line list,
one thread) is timed on a subset (``--lightweaver``, default 4, after one
untimed warm-up run) and scaled to N; the script says so in its table. The
rms difference is measured on that subset with identical atomic data and
populations (see ``tests/test_lte_vs_lightweaver.py``).

Line profiles are evaluated only where a line's opacity can exceed 1e-4 of
the continuum (``--cutoff``, the engine's ``line_cutoff``; ``--cutoff 0``
evaluates every line on the whole grid); the rms difference to Lightweaver is
measured with the same setting.

On the CPU, spectra without gradients run the compiled kernels of
:mod:`iris_lab.synthesis.fused` (numba); ``--no-fused`` times the torch
kernels that autodiff uses.

``--iquv``: polarized Stokes IQUV instead (all Zeeman components of the 18
lines; per atmosphere a random field of 0-3 kG, inclination and azimuth,
constant with depth). Compiled kernels on the N atmospheres against the
torch kernels (``fused=False``, the autodiff path) on the first
``--torch-n`` of them, in the same run, with the largest difference of the
two relative to Stokes I; Lightweaver is not run.

``--iquv --coupled``: the same comparison on the coupled inversion's forward
model (:mod:`iris_lab.inversion.experiment`: lines 11-15, 28 wavelengths at
20 mÅ, 24 log τ500 depths, hydrostatic equilibrium in every call, no line
cutoff).

Run: ``OMP_NUM_THREADS=1 python benchmarks/lte_synthesis.py --threads 1 --chunk 8``
(``--iquv --n 200 --torch-n 24`` for the polarized comparison).
"""

from __future__ import annotations

import argparse
import resource
import time
import warnings

import numpy as np
import torch


def atmospheres(n: int, seed: int = 0, log_tau: np.ndarray | None = None):
    from iris_lab import eos
    from iris_lab.atmosphere import Atmosphere
    from iris_lab.nodes import NodeModel

    rng = np.random.default_rng(seed)
    if log_tau is None:
        log_tau = np.round(np.linspace(-4.0, 1.0, 51), 6)
    model = NodeModel({"temperature": [-3.0, -2.0, -1.0, 0.0], "v_los": [-1.0],
                       "v_turb": [-1.0]}, log_tau=log_tau)
    params = model.parameters_from(Atmosphere.reference("falc")).numpy()
    params = np.broadcast_to(params, (n, params.size)).copy()
    params[:, :4] += rng.uniform(-300.0, 300.0, (n, 4))
    params[:, 4] = rng.uniform(-1e5, 1e5, n)
    params[:, 5] = rng.uniform(0.0, 1.5e5, n)
    fields = model.interpolate(torch.tensor(params))
    he = eos.hydrostatic_equilibrium(fields["log_tau"], fields["temperature"],
                                     fields["v_turb"])
    return {"height": he["height"], "temperature": fields["temperature"],
            "v_los": fields["v_los"], "v_turb": fields["v_turb"], "n_e": he["n_e"],
            "n_h": he["n_h"], "log_tau": fields["log_tau"].expand(n, -1)}


def magnetic(fields: dict, seed: int = 1) -> dict:
    """``fields`` with a random B (0-3 kG), inclination and azimuth per atmosphere."""
    n, depth = fields["temperature"].shape
    rng = np.random.default_rng(seed)

    def column(low: float, high: float) -> torch.Tensor:
        return torch.tensor(rng.uniform(low, high, (n, 1))).expand(n, depth)

    return {**fields, "b_field": column(0.0, 3000.0), "inclination": column(0.0, np.pi),
            "azimuth": column(0.0, np.pi)}


def run_iquv(args, lines, wavelengths, fields, cutoff) -> None:
    """Stokes IQUV: compiled kernels vs the torch kernels in the same run."""
    from iris_lab.synthesis.lte import LTESynthesizer

    names = ("height", "temperature", "v_los", "v_turb", "n_e", "n_h", "b_field",
             "inclination", "azimuth")
    if args.coupled:       # log τ scale: hydrostatic equilibrium inside every call
        names = ("log_tau", *names[1:4], *names[6:])
    fields = {k: v for k, v in magnetic(fields).items() if k in names}
    n_torch = min(args.torch_n, args.n)
    rows = {}
    spectra = {}
    for label, fused, n in (("compiled (numba)", True, args.n),
                            ("torch kernels (fused=False)", False, n_torch)):
        synth = LTESynthesizer(lines, wavelengths, line_cutoff=cutoff, fused=fused)
        with torch.no_grad():
            synth.stokes({k: v[:2] for k, v in fields.items()})    # warm-up (and compile)
            start, cpu = time.perf_counter(), time.process_time()
            out = [synth.stokes({k: v[i:min(i + args.chunk, n)] for k, v in fields.items()})
                   for i in range(0, n, args.chunk)]
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        spectra[fused] = torch.cat(out)[:n_torch]
        rows[label] = (n, wall, cpu)
    ref = spectra[False]
    diff = float(((spectra[True] - ref).abs() / ref[..., :1, :].abs()).max())
    n_comp = sum(len(c) for c in synth._components)
    depth = fields["temperature"].shape[-1]
    scale = "log tau (hydrostatic equilibrium per call)" if args.coupled else "heights"
    print(f"LTE synthesis, Stokes IQUV, {len(lines)} lines ({n_comp} Zeeman components) x "
          f"{wavelengths.size} wavelengths, {depth} depths on {scale}, B 0-3 kG, torch threads "
          f"{args.threads}, chunks of {args.chunk}, line cutoff "
          f"{'none' if cutoff is None else cutoff}")
    print("| kernels | atmospheres | spectra/s | CPU s per spectrum |")
    print("|---|---|---|---|")
    for label, (n, wall, cpu) in rows.items():
        print(f"| {label} | {n} | {n / wall:.1f} | {cpu / n:.4f} |")
    (n_c, wall_c, cpu_c), (n_t, wall_t, cpu_t) = rows.values()
    print(f"compiled / torch: {(n_c / wall_c) / (n_t / wall_t):.1f}x spectra/s, "
          f"{(cpu_t / n_t) / (cpu_c / n_c):.1f}x CPU time per spectrum")
    print(f"max |compiled - torch| / I over IQUV ({n_torch} atmospheres): {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--lightweaver", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cutoff", type=float, default=1e-4,
                        help="line_cutoff of the engine (0: every line on the whole grid)")
    parser.add_argument("--no-fused", action="store_true",
                        help="torch kernels only (no numba kernels of iris_lab.synthesis.fused)")
    parser.add_argument("--iquv", action="store_true",
                        help="polarized Stokes IQUV: compiled vs torch kernels (no Lightweaver)")
    parser.add_argument("--torch-n", type=int, default=24,
                        help="atmospheres timed with the torch kernels in --iquv mode")
    parser.add_argument("--coupled", action="store_true",
                        help="with --iquv: the coupled inversion's forward model (5 lines, "
                             "20 mÅ grid, 24 log τ depths, no line cutoff)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from iris_lab.atmosphere import Atmosphere
    from iris_lab.atomic import LineList
    from iris_lab.synthesis import lightweaver_lte as lwl
    from iris_lab.synthesis.lte import LTESynthesizer

    lines = LineList.shipped("4015_4017")
    wavelengths = np.linspace(4015.0, 4017.0, 501)
    cutoff = args.cutoff or None
    if args.iquv and args.coupled:
        from iris_lab.inversion import experiment

        lines = lines.select(list(experiment.SMALL_LINES))
        wavelengths = experiment.window_wavelengths(lines.wavelength_air)
        fields = atmospheres(args.n, log_tau=experiment.small_log_tau())
        run_iquv(args, lines, wavelengths, fields, None)
        return
    fields = atmospheres(args.n)
    if args.iquv:
        run_iquv(args, lines, wavelengths, fields, cutoff)
        return
    synth = LTESynthesizer(lines, wavelengths, device=args.device, polarized=False,
                           line_cutoff=cutoff, fused=not args.no_fused)
    names = ("height", "temperature", "v_los", "v_turb", "n_e", "n_h")
    dev = {k: fields[k].to(args.device) for k in names}

    with torch.no_grad():
        synth.stokes({k: v[:2] for k, v in dev.items()})          # warm-up (and compile)
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, args.n, args.chunk):
            synth.stokes({k: v[i:i + args.chunk] for k, v in dev.items()})
        if args.device != "cpu":
            torch.cuda.synchronize()
        ours_s = time.perf_counter() - start
        ours_cpu = time.process_time() - cpu
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    # Lightweaver on a subset, same heights and densities, same atomic data
    atoms = lwl.kurucz_model_atoms(lines)
    subset = Atmosphere(**{k: fields[k][: args.lightweaver + 1].numpy()
                           for k in (*names, "log_tau")}, scale="height")
    lwl.run_lightweaver(subset[0], atoms, wavelengths, stokes=False)   # warm-up
    rms, lw_s, lw_cpu = [], 0.0, 0.0
    for i in range(1, args.lightweaver + 1):
        start, cpu = time.perf_counter(), time.process_time()
        ref = lwl.run_lightweaver(subset[i], lwl.kurucz_model_atoms(lines), wavelengths,
                                  stokes=False)
        lw_s += time.perf_counter() - start
        lw_cpu += time.process_time() - cpu
        data = lwl.line_data_from_atoms(ref["atoms"])
        pops = lwl.lightweaver_populations(ref["eq_pops"], data, ref["atoms"],
                                           subset[i].temperature)
        same = LTESynthesizer(data, wavelengths, populations=pops, polarized=False,
                              line_cutoff=cutoff, fused=not args.no_fused)
        with torch.no_grad():
            ours = same.stokes({k: torch.as_tensor(getattr(subset[i], k)) for k in names})
        a = ours[0].numpy() / ours[0].numpy().max()
        b = ref["stokes"][0] / ref["stokes"][0].max()
        rms.append(np.sqrt(np.mean((a - b) ** 2)))
    lw_per = lw_s / args.lightweaver

    ours_rate = args.n / ours_s
    lw_rate = 1.0 / lw_per
    print(f"LTE synthesis, {args.n} atmospheres x {len(lines)} lines x {wavelengths.size} "
          f"wavelengths (Stokes I, 51 depths), device {args.device}, "
          f"torch threads {args.threads}, chunks of {args.chunk}, line cutoff "
          f"{'none' if cutoff is None else cutoff}, kernels "
          f"{'fused (numba)' if synth._fused(dev['temperature']) else 'torch'}")
    print("| code | spectra/s | time for N | per core (spectra/s) | peak RSS |")
    print("|---|---|---|---|---|")
    print(f"| iris_lab LTESynthesizer | {ours_rate:.1f} | {ours_s:.1f} s | "
          f"{ours_rate / args.threads:.1f} | {peak_mb:.0f} MB |")
    print(f"| Lightweaver 0.17 LTE (1 thread; {args.lightweaver} atmospheres timed, "
          f"scaled to N) | {lw_rate:.2f} | {lw_per * args.n:.0f} s | {lw_rate:.2f} | - |")
    print(f"ratio (ours / Lightweaver): {ours_rate / lw_rate:.1f}x total, "
          f"{ours_rate / args.threads / lw_rate:.1f}x per core")
    ours_per, lw_per_cpu = ours_cpu / args.n, lw_cpu / args.lightweaver
    print(f"CPU seconds per spectrum: ours {ours_per:.3f}, Lightweaver {lw_per_cpu:.3f} "
          f"(ratio {lw_per_cpu / ours_per:.1f}x; robust to other load on the machine)")
    print(f"rms |I/I_max ours - Lightweaver| (same atomic data, {args.lightweaver} "
          f"atmospheres): mean {np.mean(rms):.4f}, max {np.max(rms):.4f}")


if __name__ == "__main__":
    main()
