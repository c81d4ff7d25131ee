"""Build the element tables used by :mod:`iris_lab.eos` and :mod:`iris_lab.atomic`.

Writes two CSV files into ``iris_lab/data/``:

``elements.csv``
    Z, symbol, atomic mass [amu], solar photospheric abundance log eps
    (Asplund, Grevesse, Sauval & Scott 2009, ARA&A 47, 481, as tabulated in
    Lightweaver 0.17.0) and the first three ionisation energies [eV] (from the
    Kurucz partition-function table distributed with RH / Lightweaver).

``partition_functions.csv``
    For every element and ionisation stage I-III: log10 of Kurucz's tabulated
    partition function (``pf_Kurucz.input``: Kurucz 1970, SAO Special Report
    309, as shipped with RH and Lightweaver) on the grid
    ``log10 T = 3.00, 3.01, ..., 4.60`` (1000-39811 K). :mod:`iris_lab.eos`
    interpolates it with cubic Hermite (Catmull-Rom) splines in log10 T, which
    keeps U smooth and differentiable.

Run ``python scripts/build_element_data.py`` (needs the ``nlte`` extra).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

N_T = 161  # log10 T = 3.00 ... 4.60
N_STAGES = 3
OUT = Path(__file__).resolve().parents[1] / "iris_lab" / "data"
J_PER_EV = 1.602176634e-19


def main() -> None:
    from lightweaver.atomic_table import DefaultAtomicAbundance, KuruczPfTable, PeriodicTable

    table = KuruczPfTable()
    t_grid = np.asarray(table.Tpf)
    log_t = np.log10(t_grid)
    if np.max(np.abs(log_t[:N_T] - (3.0 + 0.01 * np.arange(N_T)))) > 1e-3:
        raise RuntimeError("unexpected temperature grid in pf_Kurucz.input")

    element_rows = []
    pf_rows = []
    for z in range(1, 93):
        element = PeriodicTable[z]
        log_eps = float(np.log10(DefaultAtomicAbundance[element]) + 12.0)
        ion_pot = np.asarray(table.ionpot[z - 1]) / J_PER_EV
        ln_pf = np.asarray(table.pf[z - 1])
        chis = [float(ion_pot[k]) if k < len(ion_pot) and ion_pot[k] > 0 else np.nan
                for k in range(N_STAGES)]
        element_rows.append([z, element.name.strip().capitalize(), f"{element.mass:.4f}",
                             f"{log_eps:.3f}"] + [f"{c:.5f}" for c in chis])
        for stage in range(min(N_STAGES, ln_pf.shape[0])):
            log_u = ln_pf[stage, :N_T] / np.log(10.0)
            pf_rows.append([z, stage + 1] + [f"{v:.5f}" for v in log_u])

    with open(OUT / "elements.csv", "w", newline="") as f:
        f.write("# Z, symbol, mass [amu], log eps (Asplund et al. 2009), "
                "ionisation energies of stages I, II, III [eV] (Kurucz, via RH/Lightweaver)\n")
        w = csv.writer(f)
        w.writerow(["z", "symbol", "mass", "log_eps", "chi1", "chi2", "chi3"])
        w.writerows(element_rows)
    with open(OUT / "partition_functions.csv", "w", newline="") as f:
        f.write("# log10 U(T) of stages I-III on log10 T = 3.00 + 0.01 k, k = 0..160; "
                "Kurucz partition functions (pf_Kurucz.input as shipped with RH/Lightweaver)\n")
        w = csv.writer(f)
        w.writerow(["z", "stage"] + [f"t{k}" for k in range(N_T)])
        w.writerows(pf_rows)


if __name__ == "__main__":
    main()
