"""Lightweaver LTE reference runs for the torch LTE engine (validation, benchmarks).

Helpers that run the same problem through Lightweaver (Osborne & Milić 2021)
with the *same atomic data* as :class:`~iris_lab.synthesis.lte.LTESynthesizer`:

- :func:`lightweaver_atmosphere` converts an :class:`~iris_lab.atmosphere.Atmosphere`
  with height and densities to a Lightweaver 1-D atmosphere (SI units);
- :func:`kurucz_model_atoms` builds Lightweaver model atoms (levels, lines with
  Kurucz-style damping) from a line list, one atom per species;
- :func:`line_data_from_atoms` reads the lines of Lightweaver atoms back into
  the line-list attributes the synthesizer needs, damping converted exactly;
- :func:`lightweaver_populations` makes the ``populations`` callable that feeds
  the synthesizer Lightweaver's LTE level populations (same partition sums);
- :func:`run_lightweaver` computes LTE (detailed-static) Stokes spectra.

Lightweaver is imported inside the functions (optional dependency).

Example
-------
>>> from iris_lab.atmosphere import Atmosphere
>>> from iris_lab.synthesis.lightweaver_lte import run_lightweaver
>>> import numpy as np
>>> stokes = run_lightweaver(Atmosphere.reference("falc"), ["Fe23"],
...                          np.linspace(6301.0, 6302.0, 20))   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

__all__ = [
    "lightweaver_atmosphere", "kurucz_model_atoms", "line_data_from_atoms",
    "lightweaver_populations", "run_lightweaver", "background_atoms",
]

_K_CGS = 1.380649e-16
_EV_CM = 8065.543937     # cm⁻¹ per eV


def background_atoms() -> list:
    """Lightweaver's standard background atoms (all but Fe), fresh instances."""
    from lightweaver.rh_atoms import (
        Al_atom,
        C_atom,
        CaII_atom,
        H_6_atom,
        He_9_atom,
        MgII_atom,
        N_atom,
        Na_atom,
        O_atom,
        S_atom,
        Si_atom,
    )

    return [H_6_atom(), C_atom(), O_atom(), Si_atom(), Al_atom(), CaII_atom(),
            He_9_atom(), MgII_atom(), N_atom(), Na_atom(), S_atom()]


def lightweaver_atmosphere(atmosphere: Any, index: tuple = ()) -> Any:
    """A Lightweaver 1-D atmosphere (geometric scale) from one pixel.

    ``atmosphere`` must carry ``height``, ``n_e`` and ``n_h``.
    """
    import lightweaver as lw

    atm = atmosphere[index] if index else atmosphere
    for name in ("height", "n_e", "n_h"):
        if getattr(atm, name) is None:
            raise ValueError(f"the atmosphere needs {name} for a Lightweaver run")
    out = lw.Atmosphere.make_1d(
        scale=lw.ScaleType.Geometric, depthScale=atm.height / 100.0,
        # Lightweaver's vlos is positive towards the observer (blueshift): flip the sign
        temperature=atm.temperature, vlos=-atm.v_los / 100.0, vturb=atm.v_turb / 100.0,
        ne=atm.n_e * 1e6, nHTot=atm.n_h * 1e6,
        B=atm.b_field * 1e-4, gammaB=atm.inclination, chiB=atm.azimuth)
    out.quadrature(3)
    return out


@dataclass(eq=False, repr=False)
class _KuruczBroadening:
    """A broadening of width ``10^log_gamma`` times a power of T and a density."""

    log_gamma: float
    line: Any = field(init=False, default=None)

    def setup(self, line):
        self.line = line


@dataclass(eq=False, repr=False)
class _KuruczVdw(_KuruczBroadening):
    """Γ_vdW = 10^log_gamma (T/10⁴)^0.3 n_H(ground) (Kurucz convention)."""

    def broaden(self, atmos, eqPops):
        n_h_ground = eqPops["H"][0, :] * 1e-6       # cm⁻³
        return 10.0 ** self.log_gamma * (atmos.temperature / 1e4) ** 0.3 * n_h_ground


@dataclass(eq=False, repr=False)
class _KuruczStark(_KuruczBroadening):
    """Γ_Stark = 10^log_gamma (T/10⁴)^(1/6) n_e."""

    def broaden(self, atmos, eqPops):
        return 10.0 ** self.log_gamma * (atmos.temperature / 1e4) ** (1.0 / 6.0) \
            * atmos.ne * 1e-6


def _make_broadener_classes():
    from lightweaver.broadening import StandardLineBroadener

    class KuruczVdw(_KuruczVdw, StandardLineBroadener):
        def __repr__(self):
            return f"KuruczVdw(log_gamma={self.log_gamma})"

    class KuruczStark(_KuruczStark, StandardLineBroadener):
        def __repr__(self):
            return f"KuruczStark(log_gamma={self.log_gamma})"

    return KuruczVdw, KuruczStark


def kurucz_model_atoms(line_list: Any, n_lambda: int = 101) -> list:
    """Lightweaver model atoms holding the lines of ``line_list`` (LTE use).

    One atom per element: the lower and upper levels of its lines (energies
    counted from the neutral ground state, g = 2J + 1), and the ground level of
    the next ionisation stage of each stage present; Voigt lines with the
    list's log(gf), radiative damping, Kurucz-scaled Stark and van der Waals
    damping (:class:`KuruczStark`-like broadeners defined here) and the list's
    effective Landé factor. Upper-level energies are set so that each line's
    vacuum wavelength equals ``wavelength_vacuum``.
    """
    from lightweaver.atomic_model import (
        AtomicLevel,
        AtomicModel,
        LinearCoreExpWings,
        LineType,
        VoigtLine,
    )
    from lightweaver.atomic_table import PeriodicTable
    from lightweaver.broadening import LineBroadening, RadiativeBroadening

    from iris_lab import eos

    kurucz_vdw, kurucz_stark = _make_broadener_classes()
    elements = [str(e) for e in np.asarray(line_list.element).tolist()]
    ions = [int(i) for i in np.asarray(line_list.ion).tolist()]
    g_eff = getattr(line_list, "g_eff", None)
    atoms = []
    for element in sorted(set(elements)):
        info = eos.element_data(element)
        chi_cm = np.concatenate([[0.0], np.cumsum(np.nan_to_num(info.chi) * _EV_CM)])
        index = [k for k in range(len(elements)) if elements[k] == element]
        entries: dict[tuple, tuple] = {}
        specs = []
        for k in index:
            stage = ions[k] - 1
            e_low = float(line_list.e_low[k]) * _EV_CM + chi_cm[stage]
            e_up = e_low + 1e8 / float(line_list.wavelength_vacuum[k])
            keys = []
            for energy, j in ((e_low, float(line_list.j_low[k])),
                              (e_up, float(line_list.j_up[k]))):
                key = (round(energy, 3), j, stage)
                entries.setdefault(key, (energy, int(round(2 * j + 1)), stage))
                keys.append(key)
            specs.append((k, keys[0], keys[1]))
        for stage in sorted({ions[k] - 1 for k in index}):
            key = (round(chi_cm[stage + 1], 3), 0.0, stage + 1)
            entries.setdefault(key, (chi_cm[stage + 1], 1, stage + 1))
        ordered = sorted(entries, key=lambda key: entries[key][0])
        position = {key: n for n, key in enumerate(ordered)}
        levels = [AtomicLevel(E=entries[key][0], g=entries[key][1],
                              label=f"{element} stage {entries[key][2] + 1} level {n}",
                              stage=entries[key][2])
                  for n, key in enumerate(ordered)]
        lines = []
        for k, low, up in specs:
            g_low = entries[low][1]
            broad = LineBroadening(
                natural=[RadiativeBroadening(10.0 ** float(line_list.log_gamma_rad[k]))],
                elastic=[kurucz_vdw(float(line_list.log_gamma_vdw[k])),
                         kurucz_stark(float(line_list.log_gamma_stark[k]))])
            lines.append(VoigtLine(
                j=position[up], i=position[low], f=10.0 ** float(line_list.log_gf[k]) / g_low,
                type=LineType.CRD,
                quadrature=LinearCoreExpWings(qCore=1.5, qWing=5, Nlambda=n_lambda),
                broadening=broad,
                gLandeEff=None if g_eff is None else float(np.asarray(g_eff)[k])))
        atoms.append(AtomicModel(element=PeriodicTable[element], levels=levels, lines=lines,
                                 continua=[], collisions=[]))
    return atoms


def line_data_from_atoms(atoms: Sequence[Any], lines: Sequence[Any] | None = None,
                         ) -> SimpleNamespace:
    """Line-list attributes (vacuum λ) of Lightweaver lines, damping converted exactly.

    Radiative Γ is copied; Unsöld van der Waals (∝ T^0.3 n_H,ground) and
    quadratic Stark (∝ T^(1/6) n_e) cross-sections become Kurucz-style
    ``log Γ`` at 10⁴ K per particle in CGS; Landé factors from LS coupling.
    """
    from lightweaver.broadening import QuadraticStarkBroadening, RadiativeBroadening, VdwUnsold
    from lightweaver.zeeman import lande_factor

    chosen = []
    for atom in atoms:
        for line in atom.lines:
            if lines is None or line in lines:
                chosen.append((atom, line))
    rows: dict[str, list] = {k: [] for k in (
        "element", "ion", "wavelength_vacuum", "wavelength_air", "log_gf", "e_low",
        "j_low", "j_up", "lande_low", "lande_up", "log_gamma_rad", "log_gamma_stark",
        "log_gamma_vdw", "abo_sigma", "abo_alpha", "mass", "lower_level")}
    for atom, line in chosen:
        import lightweaver as lw

        lo, up = line.iLevel, line.jLevel
        rows["element"].append(atom.element.name)
        rows["ion"].append(lo.stage + 1)
        rows["wavelength_vacuum"].append(line.lambda0 * 10.0)
        rows["wavelength_air"].append(float(lw.vac_to_air(np.array([line.lambda0]))[0]) * 10)
        rows["log_gf"].append(math.log10(lo.g * line.f))
        rows["e_low"].append(lo.E / _EV_CM)
        rows["j_low"].append(float(lo.J) if lo.J is not None else (lo.g - 1) / 2)
        rows["j_up"].append(float(up.J) if up.J is not None else (up.g - 1) / 2)
        ls = lo.lsCoupling and up.lsCoupling
        rows["lande_low"].append(lande_factor(lo.J, lo.L, lo.S) if ls else 0.0)
        rows["lande_up"].append(lande_factor(up.J, up.L, up.S) if ls else 0.0)
        gam_rad, gam_stark, gam_vdw = 0.0, 0.0, 0.0
        for b in line.broadening.natural + line.broadening.elastic:
            if isinstance(b, RadiativeBroadening):
                gam_rad += b.gamma
            elif isinstance(b, QuadraticStarkBroadening):
                gam_stark += b.cStark23 * (b.C * 1e4) ** (1.0 / 6.0) * b.Cm * 1e6
            elif isinstance(b, VdwUnsold):
                he = 10.0 ** (10.93 - 12.0)
                cross = 8.08 * (b.vals[0] * b.vRel35H + b.vals[1] * he * b.vRel35He) * b.C625
                gam_vdw += cross * 1e4**0.3 * 1e6
            elif isinstance(b, _KuruczVdw):
                gam_vdw += 10.0 ** b.log_gamma
            elif isinstance(b, _KuruczStark):
                gam_stark += 10.0 ** b.log_gamma
            else:
                raise ValueError(f"no conversion for broadening {b!r}")
        rows["log_gamma_rad"].append(math.log10(gam_rad) if gam_rad > 0 else -99.0)
        rows["log_gamma_stark"].append(math.log10(gam_stark) if gam_stark > 0 else -99.0)
        rows["log_gamma_vdw"].append(math.log10(gam_vdw) if gam_vdw > 0 else -99.0)
        rows["abo_sigma"].append(0.0)
        rows["abo_alpha"].append(0.0)
        rows["mass"].append(atom.element.mass)
        rows["lower_level"].append(line.i)
    data = {k: np.asarray(v) for k, v in rows.items()}

    class _Lines(SimpleNamespace):
        def __len__(self) -> int:
            return len(self.log_gf)

    return _Lines(**data)


def lightweaver_populations(eq_pops: Any, line_data: Any, atoms: Sequence[Any],
                            temperature: np.ndarray):
    """``populations`` callable returning Lightweaver's LTE N/U per species.

    N/U of a species is read off the LTE population of the lower level of its
    first line: ``n_l / (g_l exp(-E_l / kT))`` (cm⁻³), i.e. Lightweaver's own
    partition sum over the model atom's levels.
    """
    table = {}
    for atom in atoms:
        for k, element in enumerate(np.asarray(line_data.element).tolist()):
            if element != atom.element.name:
                continue
            lo = atom.levels[int(line_data.lower_level[k])]
            n_low = eq_pops.atomicPops[atom.element.name].nStar[int(line_data.lower_level[k])]
            boltz = lo.g * np.exp(-line_data.e_low[k] * 1.602176634e-12
                                  / (_K_CGS * temperature))
            table[(element, int(line_data.ion[k]))] = n_low * 1e-6 / boltz

    def populations(species, t, n_e, n_h):
        rows = [torch.as_tensor(table[s], dtype=t.dtype, device=t.device) for s in species]
        return torch.stack(rows, dim=-2).expand(*t.shape[:-1], len(species), t.shape[-1])

    return populations


def run_lightweaver(
    atmosphere: Any,
    atoms: Sequence[Any] | str,
    wavelengths_aa: np.ndarray,
    *,
    medium: str = "air",
    mu: float = 1.0,
    stokes: bool = True,
    scattering_iterations: int = 0,
) -> dict[str, Any]:
    """LTE (detailed-static) spectrum of one pixel with Lightweaver.

    Parameters
    ----------
    atmosphere
        One-pixel :class:`~iris_lab.atmosphere.Atmosphere` with height, n_e, n_h.
    atoms
        Model atoms to treat in LTE (detailed static) or ``"Fe23"`` for
        Lightweaver's own 23-level Fe I/II model.
    wavelengths_aa
        Wavelengths [Å] in ``medium`` (converted to vacuum for Lightweaver).
    scattering_iterations
        Formal solutions iterating the background-scattering J (0: J from the
        first formal solution only).

    Returns
    -------
    dict
        ``stokes`` (4 or 1, n_wavelength) in erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹, plus
        ``context``, ``eq_pops``, ``atoms``.
    """
    import lightweaver as lw

    if isinstance(atoms, str):
        if atoms != "Fe23":
            raise ValueError(f"unknown Lightweaver atom set {atoms!r}")
        from lightweaver.rh_atoms import Fe23_atom

        atoms = [Fe23_atom()]
    lw_atmos = lightweaver_atmosphere(atmosphere)
    lw_atmos.rays([mu])
    names = {a.element.name for a in atoms}
    radiative = [a for a in background_atoms() if a.element.name not in names] + list(atoms)
    rset = lw.RadiativeSet(radiative)
    for name in names:
        rset.set_detailed_static(name)
    spect = rset.compute_wavelength_grid()
    eq_pops = rset.compute_eq_pops(lw_atmos)
    ctx = lw.Context(lw_atmos, spect, eq_pops, Nthreads=1, conserveCharge=False)
    for _ in range(max(1, scattering_iterations)):
        ctx.formal_sol_gamma_matrices()
    wl = np.asarray(wavelengths_aa, dtype=np.float64)
    wl_vac_nm = lw.air_to_vac(wl / 10.0) if medium == "air" else wl / 10.0
    result = ctx.compute_rays(np.ascontiguousarray(wl_vac_nm), [mu], stokes=stokes)
    result = np.atleast_2d(result)
    # SI W m⁻² Hz⁻¹ sr⁻¹ → erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹
    lam_cm = wl_vac_nm * 1e-7
    result = result * 1e3 * 2.99792458e10 / lam_cm**2 * 1e-8
    return {"stokes": result, "context": ctx, "eq_pops": eq_pops, "atoms": atoms,
            "lightweaver_atmosphere": lw_atmos}
