"""Chromospheric model-atmosphere families for the Mg II h&k database.

Six families — ``quiet``, ``coronal_hole``, ``plage``, ``flare``, ``penumbra``
and ``umbra`` — are built by perturbing the FAL-C model (Fontenla, Avrett &
Loeser 1993, shipped as ``Atmosphere.reference("falc")``) on its own depth
grid, in three steps:

1. **Family template.** A mean temperature change at the seven temperature
   nodes, and a shift of the transition region (TR) in column mass. The shapes
   follow published semi-empirical models, scaled as stated in
   :data:`FAMILIES`: FAL-A-like for coronal holes, FAL-F/P-like for network
   and plage (Fontenla et al. 1993), Maltby et al. (1986) model M for the
   umbra, an intermediate penumbra (Ding & Fang 1989 style), and the
   F1/F2-like heated chromosphere of Machado et al. (1980) for flares.
2. **Node perturbations.** Random perturbations at the nodes used by the
   IRIS² inversions (Sainz Dalda et al. 2019, ApJL 875, L18): 7 in
   temperature, 4 in ``v_los`` and 4 in ``v_turb``, interpolated in log τ500
   by monotone cubic (PCHIP) splines.
3. **Hydrostatic equilibrium on the column-mass scale.** ``p_gas + ρ v_turb²/2
   = g m`` (turbulent pressure as in the FAL models); the
   total hydrogen density follows from the ideal gas, ``p = (n_H (1 + A_He) +
   n_e) k T``, with an electron density estimated from FAL-C's (NLTE)
   ionisation degree rescaled by the LTE Saha odds of the new temperature and
   density. Heights follow from ``dh = -dm / ρ`` with ``h = 0`` at τ500 = 1.
   ``log_tau`` is FAL-C's τ500 at the same grid point, shifted with the
   column mass (τ500 ∝ m; approximate: the NLTE synthesis recomputes it).

The TR shift moves the depth grid with the feature (a smooth warp of
log column mass that fades out between the TR and the temperature minimum), so
every member keeps FAL-C's resolution of the steep TR.

Atmospheres are physically bounded: T ≥ 3000 K, |v_los| ≤ 40 km/s,
0 ≤ v_turb ≤ 20 km/s, strictly monotonic depth scales, positive densities.
Members of a family are ordered as a greedy nearest-neighbour chain in node
space, so consecutive atmospheres are similar (warm starts of NLTE solves).

Example
-------
>>> from iris_lab.worlds.chromosphere import sample_mgii_atmospheres
>>> atm, family = sample_mgii_atmospheres(12, seed=1)
>>> atm.batch_shape, sorted(set(family)) == sorted(FAMILY_NAMES)
((12,), True)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from iris_lab.atmosphere import Atmosphere

#: Solar surface gravity [cm s⁻²].
GRAVITY = 2.7398e4
#: Boltzmann constant [erg K⁻¹] and atomic mass unit [g].
K_B = 1.380649e-16
AMU = 1.66053907e-24
#: Helium abundance by number relative to H (Asplund et al. 2009).
A_HE = 0.0851
#: Low-FIP electron donors (Mg, Si, Fe, Na, Ca, Al, Ni) by number relative to H
#: (Asplund et al. 2009), lumped into one species with an ionisation energy of 7.8 eV.
A_METALS = 1.12e-4
CHI_METALS_EV = 7.8
#: Mean mass per hydrogen nucleus [amu] (Asplund et al. 2009 abundances, as in Lightweaver).
MASS_PER_H = 1.3669

#: Node positions in log τ500 (7 temperature, 4 v_los, 4 v_turb nodes).
T_NODES = np.array([-7.0, -6.0, -5.0, -4.0, -3.0, -1.5, 0.0])
V_NODES = np.array([-6.5, -5.0, -3.5, -1.5])
VTURB_NODES = np.array([-6.5, -5.0, -3.5, -1.5])

#: Physical bounds applied to every member.
T_MIN = 3000.0
V_LOS_MAX = 40.0e5
V_TURB_MAX = 20.0e5

_KM = 1.0e5
_EV_K = 11604.518  # K per eV


@dataclasses.dataclass(frozen=True)
class Family:
    """Recipe of one atmosphere family (temperatures in K, velocities in km/s).

    Attributes
    ----------
    name, description, source
        Label, one-line description and the published model it imitates.
    delta_t
        Mean temperature change at :data:`T_NODES` [K].
    t_spread
        Relative (1σ) random temperature perturbation at each node.
    tr_shift
        Uniform range of the TR shift in log10 column mass (> 0: deeper, higher
        TR pressure).
    v_mean, v_spread
        Mean and 1σ of ``v_los`` at :data:`V_NODES` [km/s] (positive = downflow).
    vturb_scale, vturb_spread
        Uniform range of a global factor on FAL-C's ``v_turb`` and the 1σ of a
        log-normal factor per :data:`VTURB_NODES` node.
    """

    name: str
    description: str
    source: str
    delta_t: tuple[float, ...]
    t_spread: tuple[float, ...]
    tr_shift: tuple[float, float]
    v_mean: tuple[float, ...]
    v_spread: tuple[float, ...]
    vturb_scale: tuple[float, float]
    vturb_spread: float


_QUIET_SPREAD = (0.08, 0.07, 0.06, 0.05, 0.04, 0.025, 0.015)

#: The six families, in chain order (neighbouring families are alike).
FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("coronal_hole", "cooler, lower-pressure chromosphere of a coronal hole",
           "FAL-A-like (Fontenla et al. 1993, faint cell interior), TR at lower pressure",
           (-700.0, -600.0, -400.0, -250.0, -120.0, -30.0, 0.0), _QUIET_SPREAD,
           (-0.45, -0.1), (-2.0, -1.0, 0.0, 0.0), (4.0, 3.0, 1.5, 0.5), (0.8, 1.0), 0.25),
    Family("quiet", "quiet-Sun internetwork and network around FAL-C",
           "FAL-C (Fontenla, Avrett & Loeser 1993)",
           (0.0,) * 7, _QUIET_SPREAD,
           (-0.15, 0.15), (0.0, 0.0, 0.0, 0.0), (5.0, 3.5, 1.5, 0.5), (0.85, 1.15), 0.25),
    Family("plage", "network/plage: hotter, denser chromosphere, TR at higher pressure",
           "FAL-F / FAL-P-like (Fontenla et al. 1993): +0.5-1.5 kK chromosphere, "
           "TR column mass x2-6",
           (1300.0, 1150.0, 900.0, 600.0, 300.0, 80.0, 0.0), _QUIET_SPREAD,
           (0.3, 0.8), (3.0, 1.5, 0.5, 0.0), (5.0, 3.5, 1.5, 0.5), (1.0, 1.3), 0.25),
    Family("flare", "flare-like: strongly heated chromosphere, TR pushed deep, downflows",
           "F1/F2-like (Machado et al. 1980): +2-4 kK chromosphere, TR column mass x6-40",
           (3200.0, 2800.0, 2200.0, 1300.0, 500.0, 100.0, 0.0),
           (0.12, 0.10, 0.09, 0.07, 0.05, 0.03, 0.015),
           (0.8, 1.6), (12.0, 6.0, 1.0, 0.0), (12.0, 8.0, 4.0, 1.0), (1.1, 1.6), 0.3),
    Family("penumbra", "penumbra-like: cooler photosphere and temperature minimum",
           "intermediate between FAL-C and Maltby M (Ding & Fang 1989 style): "
           "T(tau=1) lower by ~1 kK",
           (-200.0, -250.0, -350.0, -500.0, -550.0, -750.0, -1000.0), _QUIET_SPREAD,
           (0.0, 0.5), (0.0, 1.0, 1.0, 0.5), (5.0, 3.5, 2.0, 1.0), (0.9, 1.2), 0.25),
    Family("umbra", "sunspot umbra: cool photosphere, low-lying chromosphere",
           "Maltby et al. (1986) model M shape: T(tau=1) ~ 4.2 kK, T_min ~ 3.4 kK",
           (-350.0, -450.0, -650.0, -950.0, -1050.0, -1350.0, -2200.0), _QUIET_SPREAD,
           (0.0, 0.6), (0.0, 0.5, 0.5, 0.0), (5.0, 3.0, 1.5, 0.5), (0.8, 1.1), 0.25),
)}
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)


# -- equation of state -------------------------------------------------------------
def saha_phi_hydrogen(temperature: np.ndarray) -> np.ndarray:
    """Saha factor n_p n_e / n_HI [cm⁻³] of hydrogen in LTE (U_HI = 2, U_HII = 1)."""
    t = np.asarray(temperature, dtype=float)
    return 2.4147e15 * t**1.5 * np.exp(-13.598 * _EV_K / t)


def lte_electron_density(temperature: np.ndarray, p_gas: np.ndarray) -> np.ndarray:
    """LTE electron density [cm⁻³] from H and a lumped low-FIP metal, by bisection.

    Solves ``n_e = n_H (x_H + A_m x_m)`` with ``n_H = (p / kT - n_e) / (1 + A_He)``
    and Saha ionisation fractions, vectorised over any shape.

    Example
    -------
    >>> float(lte_electron_density(6000.0, 1.0e5)) > 1e12
    True
    """
    t = np.asarray(temperature, dtype=float)
    n_tot = np.asarray(p_gas, dtype=float) / (K_B * t)
    phi_h = saha_phi_hydrogen(t)
    phi_m = 2.4147e15 * t**1.5 * np.exp(-CHI_METALS_EV * _EV_K / t)
    lo = np.log(np.maximum(n_tot * 1e-14, 1e-30))
    hi = np.log(n_tot * 0.55)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        n_e = np.exp(mid)
        n_h = (n_tot - n_e) / (1.0 + A_HE)
        excess = n_e - n_h * (phi_h / (n_e + phi_h) + A_METALS * phi_m / (n_e + phi_m))
        lo = np.where(excess < 0, mid, lo)
        hi = np.where(excess < 0, hi, mid)
    return np.exp(0.5 * (lo + hi))


def rescaled_ionisation(y_ref: np.ndarray, t_ref: np.ndarray, n_ref: np.ndarray,
                        temperature: np.ndarray, n_tot: np.ndarray) -> np.ndarray:
    """Electrons per H nucleus, rescaling a reference (NLTE) ionisation degree.

    The hydrogen ionisation odds ``x / (1 - x)`` of the reference are multiplied
    by the LTE scaling of weakly ionised hydrogen, ``sqrt(Φ_H(T) / n)``, between
    the reference state ``(t_ref, n_ref)`` and the new one; metals are taken as
    fully ionised. Where the reference is hotter than 10⁴ K (TR, corona) the
    reference degree is kept, blending to it by 2×10⁴ K.
    """
    x_ref = np.clip(y_ref - A_METALS, 1e-12, 1.0 - 1e-9)
    odds = x_ref / (1.0 - x_ref)
    log_scale = 0.5 * (np.log(saha_phi_hydrogen(temperature)) - np.log(saha_phi_hydrogen(t_ref))
                       - np.log(n_tot) + np.log(n_ref))
    odds_new = odds * np.exp(np.clip(log_scale, -30.0, 30.0))
    y_new = odds_new / (1.0 + odds_new) + A_METALS
    weight = tr_weight(t_ref)
    return weight * y_new + (1.0 - weight) * y_ref


def tr_weight(t_ref: np.ndarray) -> np.ndarray:
    """1 below 10⁴ K, 0 above 2×10⁴ K, linear in log T between (perturbation weight)."""
    return np.clip(np.log(2.0e4 / np.asarray(t_ref)) / np.log(2.0), 0.0, 1.0)


def hydrostatic_column(log_m: np.ndarray, temperature: np.ndarray, y_e: np.ndarray,
                       log_tau: np.ndarray | None = None,
                       v_turb: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Densities and heights of a column in hydrostatic equilibrium.

    Parameters
    ----------
    log_m
        log10 column mass [g cm⁻²], shape ``(..., depth)``, increasing with depth.
    temperature
        Temperature [K], same shape.
    y_e
        Electrons per hydrogen nucleus, same shape.
    log_tau
        If given, heights are zero where it crosses 0 (else at the bottom).
    v_turb
        Microturbulence [cm/s]; its pressure ``ρ v_turb² / 2`` shares the
        weight of the column, as in the FAL models: ``p_gas + ρ v_t²/2 = g m``.

    Returns
    -------
    dict
        ``p_gas`` [dyn cm⁻²], ``n_h``, ``n_e`` [cm⁻³], ``rho`` [g cm⁻³]
        and ``height`` [cm] from ``dh = -dm / ρ`` (trapezoidal in ln m).
    """
    m = 10.0**log_m
    turbulent = 0.0 if v_turb is None else (
        0.5 * np.asarray(v_turb) ** 2 * MASS_PER_H * AMU / (K_B * temperature * (1.0 + A_HE + y_e)))
    p_gas = GRAVITY * m / (1.0 + turbulent)
    n_h = p_gas / (K_B * temperature * (1.0 + A_HE + y_e))
    rho = n_h * MASS_PER_H * AMU
    # trapezoid in ln m: dh = -m / rho d(ln m)
    integrand = m / rho
    dlnm = np.diff(np.log(m), axis=-1)
    steps = 0.5 * (integrand[..., 1:] + integrand[..., :-1]) * dlnm
    depth_below_top = np.concatenate([np.zeros_like(m[..., :1]), np.cumsum(steps, axis=-1)],
                                     axis=-1)
    height = -depth_below_top
    if log_tau is not None:
        zero = _interp_rows(np.zeros(height.shape[:-1] + (1,)), log_tau, height)[..., 0]
        height = height - zero[..., None]
    else:
        height = height - height[..., -1:]
    return {"p_gas": p_gas, "n_h": n_h, "n_e": y_e * n_h, "rho": rho, "height": height}


def _interp_rows(x_new: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise linear interpolation with linear extrapolation (batched, x increasing).

    ``x_new (..., k)``, ``x (..., n)`` and ``y (..., n)`` broadcast over leading dims.
    """
    x_new, x, y = (np.asarray(a, dtype=float) for a in (x_new, x, y))
    lead = np.broadcast_shapes(x_new.shape[:-1], x.shape[:-1], y.shape[:-1])
    x_new = np.broadcast_to(x_new, lead + x_new.shape[-1:])
    x = np.broadcast_to(x, lead + x.shape[-1:])
    y = np.broadcast_to(y, lead + y.shape[-1:])
    idx = np.sum(x[..., None, :] < x_new[..., :, None], axis=-1)
    idx = np.clip(idx, 1, x.shape[-1] - 1)
    x0, x1 = np.take_along_axis(x, idx - 1, -1), np.take_along_axis(x, idx, -1)
    y0, y1 = np.take_along_axis(y, idx - 1, -1), np.take_along_axis(y, idx, -1)
    return y0 + (y1 - y0) * (x_new - x0) / (x1 - x0)


# -- reference --------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _falc() -> Atmosphere:
    """FAL-C, read once per process (treated as read-only)."""
    return Atmosphere.reference("falc")


def falc_column_mass(falc: Atmosphere | None = None) -> np.ndarray:
    """log10 column mass [g cm⁻²] of FAL-C: p_top / g plus ∫ρ dh (monotonic)."""
    falc = falc if falc is not None else _falc()
    top = falc.p_gas[0] / GRAVITY
    dh = -np.diff(falc.height)
    m = top + np.concatenate([[0.0], np.cumsum(0.5 * (falc.rho[1:] + falc.rho[:-1]) * dh)])
    return np.log10(m)


def _pchip_rows(nodes: np.ndarray, values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """PCHIP through ``values (..., n_nodes)`` at ``nodes``, evaluated at ``x`` (depth,);
    constant beyond the end nodes."""
    from scipy.interpolate import PchipInterpolator

    xc = np.clip(x, nodes[0], nodes[-1])
    return PchipInterpolator(nodes, values, axis=-1)(xc)


def _warp(log_m: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Shift log m by ``shift`` above the TR, fading (cosine) to 0 at log m = -1."""
    top, bottom = -4.6, -1.0
    s = np.clip((log_m - top) / (bottom - top), 0.0, 1.0)
    weight = 0.5 * (1.0 + np.cos(np.pi * s))
    return log_m + shift[..., None] * weight


def build_atmospheres(delta_t_nodes: np.ndarray, t_rel_nodes: np.ndarray, tr_shift: np.ndarray,
                      v_nodes: np.ndarray, vturb_log_nodes: np.ndarray,
                      vturb_scale: np.ndarray) -> Atmosphere:
    """Turn node parameters into bounded, hydrostatic atmospheres on FAL-C's grid.

    Parameters
    ----------
    delta_t_nodes
        Additive temperature change [K] at :data:`T_NODES`, shape ``(n, 7)``.
    t_rel_nodes
        Relative temperature perturbation at :data:`T_NODES`, shape ``(n, 7)``.
    tr_shift
        TR shift in log10 column mass, shape ``(n,)``.
    v_nodes
        ``v_los`` [cm/s] at :data:`V_NODES`, shape ``(n, 4)``.
    vturb_log_nodes
        ln of the factor on FAL-C's ``v_turb`` at :data:`VTURB_NODES`, ``(n, 4)``.
    vturb_scale
        Global factor on FAL-C's ``v_turb``, shape ``(n,)``.

    Returns
    -------
    Atmosphere
        Batch ``(n,)`` on FAL-C's 82 depth points, ``scale="height"``.
    """
    falc = _falc()
    log_m_ref = falc_column_mass(falc)
    log_tau_ref = falc.log_tau
    t_ref = falc.temperature
    weight = tr_weight(t_ref)

    delta_t = _pchip_rows(T_NODES, delta_t_nodes, log_tau_ref)
    t_rel = _pchip_rows(T_NODES, t_rel_nodes, log_tau_ref)
    temperature = t_ref + weight * ((t_ref + delta_t) * (1.0 + t_rel) - t_ref)
    temperature = np.maximum(temperature, T_MIN)

    log_m = _warp(log_m_ref, np.asarray(tr_shift, dtype=float))
    # τ500 taken proportional to column mass under the shift, kept strictly increasing
    shifted = log_tau_ref + (log_m - log_m_ref)
    step = np.maximum(np.diff(shifted, axis=-1), 0.2 * np.diff(log_tau_ref))
    log_tau = shifted[..., -1:] - np.flip(np.cumsum(np.flip(step, -1), -1), -1)
    log_tau = np.concatenate([log_tau, shifted[..., -1:]], axis=-1)

    y_ref = falc.n_e / falc.n_h
    n_ref = falc.p_gas / (K_B * t_ref)
    n_tot = GRAVITY * 10.0**log_m / (K_B * temperature)
    y_e = rescaled_ionisation(y_ref, t_ref, n_ref, temperature, n_tot)
    v_los = np.clip(_pchip_rows(V_NODES, v_nodes, log_tau_ref), -V_LOS_MAX, V_LOS_MAX)
    factor = np.exp(_pchip_rows(VTURB_NODES, vturb_log_nodes, log_tau_ref))
    v_turb = np.clip(falc.v_turb * vturb_scale[..., None] * factor, 0.0, V_TURB_MAX)
    column = hydrostatic_column(log_m, temperature, y_e, log_tau, v_turb)
    return Atmosphere(temperature=temperature, height=column["height"], log_tau=log_tau,
                      v_los=v_los, v_turb=v_turb, n_e=column["n_e"], n_h=column["n_h"],
                      p_gas=column["p_gas"], rho=column["rho"], scale="height")


def _draw_family(family: Family, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    spread = np.asarray(family.t_spread)
    t_rel = np.clip(rng.standard_normal((n, 7)), -2.5, 2.5) * spread
    # a common chromospheric offset on top of node-wise noise keeps profiles coherent
    t_rel += np.clip(rng.standard_normal((n, 1)), -2.5, 2.5) * spread * 0.5
    delta_t = np.broadcast_to(np.asarray(family.delta_t), (n, 7)) * rng.uniform(0.6, 1.4, (n, 1))
    tr_shift = rng.uniform(*family.tr_shift, n)
    v = (np.asarray(family.v_mean)
         + np.clip(rng.standard_normal((n, 4)), -2.5, 2.5) * np.asarray(family.v_spread)) * _KM
    vt_log = np.clip(rng.standard_normal((n, 4)), -2.5, 2.5) * family.vturb_spread
    vt_scale = rng.uniform(*family.vturb_scale, n)
    return {"delta_t_nodes": delta_t, "t_rel_nodes": t_rel, "tr_shift": tr_shift,
            "v_nodes": v, "vturb_log_nodes": vt_log, "vturb_scale": vt_scale}


def _chain_order(features: np.ndarray) -> np.ndarray:
    """Greedy nearest-neighbour chain (Euclidean in ``features``), starting from the
    member nearest the mean."""
    n = features.shape[0]
    if n <= 2:
        return np.arange(n)
    z = features - features.mean(0)
    order = np.empty(n, dtype=int)
    free = np.ones(n, dtype=bool)
    current = int(np.argmin(np.einsum("ij,ij->i", z, z)))
    for k in range(n):
        order[k] = current
        free[current] = False
        if k == n - 1:
            break
        d = np.einsum("ij,ij->i", z - z[current], z - z[current])
        d[~free] = np.inf
        current = int(np.argmin(d))
    return order


def _features(atm: Atmosphere) -> np.ndarray:
    """What a warm start cares about: log T where lines form, flows, turbulence."""
    chromosphere = slice(24, 70)  # FAL-C points from the TR base to the photosphere
    return np.concatenate([np.log(atm.temperature[:, chromosphere]) / 0.02,
                           atm.v_los[:, chromosphere][:, ::4] / 2.0e5,
                           atm.v_turb[:, chromosphere][:, ::4] / 2.0e5], axis=1)


def sample_mgii_parameters(n: int, *, seed: int,
                           families: Sequence[str] | None = None
                           ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Draw node parameters of ``n`` atmospheres (see :func:`sample_mgii_atmospheres`).

    Returns
    -------
    params, family
        Arrays accepted by :func:`build_atmospheres` (in chain order) and the
        family label of each member.
    """
    if not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n must be a positive integer, not {n!r}")
    names = list(FAMILY_NAMES) if families is None else list(families)
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise ValueError(f"unknown families {unknown}; choose from {list(FAMILY_NAMES)}")
    names = [f for f in FAMILY_NAMES if f in names]  # chain order, no duplicates
    counts = [len(c) for c in np.array_split(np.arange(n), len(names))]
    rng = np.random.default_rng(seed)
    blocks, labels = [], []
    for name, count in zip(names, counts, strict=True):
        if count == 0:
            continue
        params = _draw_family(FAMILIES[name], count, rng)
        order = _chain_order(_features(build_atmospheres(**params)))
        blocks.append({k: v[order] for k, v in params.items()})
        labels.append(np.full(count, name, dtype="<U12"))
    joined = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    return joined, np.concatenate(labels)


def sample_mgii_atmospheres(n: int, *, seed: int, families: Sequence[str] | None = None
                            ) -> tuple[Atmosphere, np.ndarray]:
    """Seeded chromospheric atmospheres for the Mg II h&k database.

    Parameters
    ----------
    n
        Number of atmospheres, split evenly over the requested families.
    seed
        Seed of the random generator: the same seed gives the same atmospheres.
    families
        Subset of :data:`FAMILY_NAMES`; all six by default.

    Returns
    -------
    atmosphere, family
        An :class:`Atmosphere` with batch shape ``(n,)`` on FAL-C's 82 depth
        points (``height`` scale; ``log_tau``, T, ``v_los``, ``v_turb``,
        ``n_e`` (initial guess), ``n_h``, ``p_gas``, ``rho``), and the family
        label of each member. Families come in the order of
        :data:`FAMILY_NAMES`; within one, members form a nearest-neighbour chain.

    Raises
    ------
    ValueError
        For ``n < 1`` or an unknown family.

    Example
    -------
    >>> atm, fam = sample_mgii_atmospheres(4, seed=0, families=["umbra"])
    >>> bool(atm.temperature.min() >= T_MIN), list(fam) == ["umbra"] * 4
    (True, True)
    """
    params, labels = sample_mgii_parameters(n, seed=seed, families=families)
    return build_atmospheres(**params), labels


def family_template(name: str) -> Atmosphere:
    """The unperturbed member of a family (mean node values, mid TR shift).

    Example
    -------
    >>> float(family_template("umbra").temperature[-20]) < 5000.0
    True
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose from {list(FAMILY_NAMES)}")
    fam = FAMILIES[name]
    atm = build_atmospheres(
        delta_t_nodes=np.asarray(fam.delta_t)[None], t_rel_nodes=np.zeros((1, 7)),
        tr_shift=np.array([np.mean(fam.tr_shift)]),
        v_nodes=np.asarray(fam.v_mean)[None] * _KM, vturb_log_nodes=np.zeros((1, 4)),
        vturb_scale=np.array([np.mean(fam.vturb_scale)]))
    return atm[0]
