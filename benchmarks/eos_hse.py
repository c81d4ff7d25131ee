"""Equation of state and hydrostatic equilibrium: iris_lab.eos vs Lightweaver's Wittmann EOS.

Work: 1000 atmospheres × 71 depth points (log τ500 = -6 … 1, FAL-C temperatures
perturbed by 5 % per atmosphere).

Rows (same run, same machine, CPU time of this process, torch on 1 thread):
- n_e from (T, p_gas) at all 71 000 points: ours (batched torch) vs Lightweaver's
  Wittmann EOS (``pe_from_pg``, one point per call, timed on a subset and scaled);
- hydrostatic equilibrium (EOS + κ500 + HSE integration + heights) for the 1000
  atmospheres: ours, and its cost per atmosphere;
- the agreement of the two EOSs (max |Δn_e|/n_e) so that the ratio compares like
  with like.

Run: ``OMP_NUM_THREADS=1 python benchmarks/eos_hse.py [--atmospheres 1000]``
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atmospheres", type=int, default=1000)
    parser.add_argument("--reference-points", type=int, default=1000,
                        help="points timed with the per-point reference EOS")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    from lightweaver.atomic_table import DefaultAtomicAbundance, PeriodicTable
    from lightweaver.wittmann import Wittmann

    from iris_lab import eos
    from iris_lab.atmosphere import Atmosphere

    falc = Atmosphere.reference("falc")
    log_tau = torch.linspace(-6.0, 1.0, 71, dtype=torch.float64)
    t_ref = torch.tensor(np.interp(log_tau.numpy(), falc.log_tau, falc.temperature))
    gen = torch.Generator().manual_seed(1)
    temp = t_ref * (1.0 + 0.05 * torch.randn(args.atmospheres, 1, generator=gen,
                                             dtype=torch.float64))
    n_points = temp.numel()

    # HSE first (it also gives realistic pressures for the EOS comparison)
    eos.hydrostatic_equilibrium(log_tau, temp[:2])  # load tables
    c0 = time.process_time()
    hse = eos.hydrostatic_equilibrium(log_tau, temp)
    t_hse = time.process_time() - c0
    p_gas = hse["p_gas"]

    c0 = time.process_time()
    ours = eos.solve_ionisation(temp, p_gas)["n_e"]
    t_ours = time.process_time() - c0

    witt = Wittmann(abund_init=np.array([DefaultAtomicAbundance[e]
                                         for e in PeriodicTable.elements]))
    idx = np.random.default_rng(2).choice(n_points, args.reference_points, replace=False)
    tf, pf = temp.reshape(-1).numpy()[idx], p_gas.reshape(-1).numpy()[idx]
    witt.pe_from_pg(float(tf[0]), float(pf[0]))  # numba compilation outside the timing
    c0 = time.process_time()
    pe = np.array([witt.pe_from_pg(float(a), float(b)) for a, b in zip(tf, pf, strict=True)])
    t_ref_sub = time.process_time() - c0
    t_ref_all = t_ref_sub * n_points / len(idx)
    ne_ref = pe / (1.380649e-16 * tf)
    dev = float(np.max(np.abs(ours.reshape(-1).numpy()[idx] / ne_ref - 1.0)))

    print(f"{args.atmospheres} atmospheres × 71 depths = {n_points} points, CPU time, 1 thread")
    print("| task | iris_lab.eos [s] | Lightweaver Wittmann [s] | ratio | max |Δn_e|/n_e |")
    print("|---|---|---|---|---|")
    print(f"| n_e(T, p_gas), all points | {t_ours:.3f} | {t_ref_all:.1f} "
          f"(scaled from {len(idx)} points) | {t_ref_all / t_ours:.0f}× | {dev:.1e} |")
    print(f"| hydrostatic equilibrium + κ500 + height | {t_hse:.3f} | — | — | — |")
    print(f"| per atmosphere (HSE) | {1e3 * t_hse / args.atmospheres:.2f} ms | — | — | — |")


if __name__ == "__main__":
    main()
