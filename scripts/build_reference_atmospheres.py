"""Build ``iris_lab/data/falc.nc``: the FAL-C reference atmosphere.

Source: Fontenla, Avrett & Loeser (1993, ApJ 406, 319) model C, as tabulated
in Lightweaver 0.17.0 (``lightweaver.fal.Falc82``: column mass, T, n_e, n_H,
v, v_turb; heights from its hydrostatic column-mass conversion). log τ500 is
integrated here from Lightweaver's full LTE background opacity (continuum
absorption + scattering) at 500 nm, with the top point extrapolated linearly
in log τ. p_gas and ρ follow from the ideal gas with Lightweaver's default
abundance set (total abundance per H atom and mean mass per H atom).

Run: ``python scripts/build_reference_atmospheres.py`` (a few seconds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

K_BOLTZMANN = 1.380649e-16  # erg / K
AMU = 1.66053906660e-24  # g


def build_falc() -> dict[str, np.ndarray]:
    import lightweaver as lw
    from lightweaver.fal import Falc82
    from lightweaver.rh_atoms import CaII_atom, H_6_atom

    atmos = Falc82()
    atmos.quadrature(5)
    radiative_set = lw.RadiativeSet([H_6_atom(), CaII_atom()])
    radiative_set.set_active("H")
    spectrum = radiative_set.compute_wavelength_grid(extraWavelengths=np.array([500.0]))
    populations = radiative_set.compute_eq_pops(atmos)
    context = lw.Context(atmos, spectrum, populations, Nthreads=1)
    index = int(np.argmin(np.abs(spectrum.wavelength - 500.0)))
    chi = np.asarray(context.background.chi)[index]  # 1/m
    height_m = np.asarray(atmos.height)
    tau = np.concatenate(
        [[0.0], np.cumsum(0.5 * (chi[1:] + chi[:-1]) * -np.diff(height_m))])
    log_tau = np.log10(tau[1:])
    log_tau = np.concatenate([[2 * log_tau[0] - log_tau[1]], log_tau])

    abundance = lw.DefaultAtomicAbundance
    n_h = np.asarray(atmos.nHTot) * 1e-6  # cm^-3
    n_e = np.asarray(atmos.ne) * 1e-6
    temperature = np.asarray(atmos.temperature)
    return {
        "height": height_m * 100.0,
        "log_tau": log_tau,
        "temperature": temperature,
        "v_los": np.asarray(atmos.vlos) * 100.0,
        "v_turb": np.asarray(atmos.vturb) * 100.0,
        "n_e": n_e,
        "n_h": n_h,
        "p_gas": (n_h * abundance.totalAbundance + n_e) * K_BOLTZMANN * temperature,
        # avgMass is the mean mass per atom (all elements), so per H atom it is Σ A ⟨m⟩
        "rho": n_h * abundance.totalAbundance * abundance.avgMass * AMU,
    }


def main() -> None:
    from iris_lab.atmosphere import Atmosphere

    out = Path(__file__).resolve().parents[1] / "iris_lab" / "data" / "falc.nc"
    falc = Atmosphere(**build_falc(), scale="height")
    dataset = falc.to_dataset()
    dataset.attrs.update(
        title="FAL-C (Fontenla, Avrett & Loeser 1993, model C)",
        source="lightweaver.fal.Falc82 (Lightweaver 0.17.0); log_tau500 from its LTE "
               "background opacity at 500 nm; p_gas, rho from the ideal gas",
        builder="scripts/build_reference_atmospheres.py",
    )
    dataset.to_netcdf(out, engine="h5netcdf")
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
