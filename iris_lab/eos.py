"""LTE equation of state and hydrostatic equilibrium on the log τ500 scale, in torch.

API summary
-----------
``abundances(overrides=None) -> dict[str, float]``
    Solar photospheric abundances log ε (Asplund et al. 2009), H = 12.
``element_data(symbol) -> ElementInfo``
    Z, mass [amu], log ε and ionisation energies [eV] of one element.
``partition_function(element, ion, temperature) -> Tensor``
    Kurucz partition function U(T) of stage ``ion`` (1 = neutral, 2, 3);
    ``partition_functions(species, temperature)`` for several at once.
``ionisation_fractions(element(s), temperature, n_e) -> Tensor (..., [E,] 3)``
    LTE (Saha) fractions of stages I, II, III at given T and n_e.
``solve_ionisation(temperature, p_gas, *, abundances=None, n_e_guess=None) -> dict``
    Electron density from charge conservation (H, H⁻, He and the metals with
    log ε ≥ 4.5 as electron donors) at given T and gas pressure; returns
    ``n_e, p_e, n_h, n_h_neutral, n_protons, n_hminus, n_he_neutral, rho, kappa500``.
``hydrostatic_equilibrium(log_tau, temperature, v_turb=None, *, abundances=None,
gravity=2.7398e4, p_top=None) -> dict``
    Integrates dp/dτ500 = g/κ500 (κ per gram) downwards from the top (loop over
    depth, vectorised over the leading batch dims) and returns tensors
    ``(..., depth)``: ``p_gas, p_turb, p_e, n_e, n_h, n_h_neutral, n_protons,
    n_hminus, n_he_neutral, rho, kappa500 [cm⁻¹], height [cm]`` (height = 0 at
    log τ500 = 0, increasing upwards).
``lte_level_populations(element, ion, e_low_ev, g_low, temperature, n_e, n_h) -> Tensor``
    LTE number density [cm⁻³] of a level (for line opacities).

Everything is float64 torch, batched over leading dims, differentiable (the
Newton solve for n_e is differentiated implicitly: the last Newton step is
taken with gradients, which gives the exact first derivative at convergence)
and runs on the device of its inputs. There is no data-dependent Python
control flow on tensor values, so the functions work under ``torch.func``
transforms (``vmap``, ``jacfwd``). Molecules (H₂, H₂⁺, CO …) are neglected:
below ~4000 K this overestimates n(H I) by ≲ 1-2 %.

Example
-------
>>> import torch
>>> from iris_lab.eos import hydrostatic_equilibrium
>>> log_tau = torch.linspace(-4.0, 1.0, 51, dtype=torch.float64)
>>> t = 5000.0 + 1500.0 * torch.clamp(log_tau + 1.0, min=0.0)
>>> out = hydrostatic_equilibrium(log_tau, t)
>>> out["p_gas"].shape
torch.Size([51])
>>> 5e4 < float(out["p_gas"][40]) < 2e5   # log τ = 0
True
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from iris_lab import opacity

K_BOLTZMANN = opacity.K_BOLTZMANN
EV = opacity.EV
AMU = 1.66053906660e-24
#: Solar surface gravity [cm s⁻²].
SOLAR_GRAVITY = 2.7398e4
#: Electron donors in the charge balance: H (with H⁻ and H⁺), He (I-III), C, N, O
#: and every metal with χ_I < 11 eV and log ε ≥ 4.9 (Asplund et al. 2009), the
#: metals with their first ionisation only. The elements left out (Ne, Ar, F, Cl,
#: P, Sc, V, Cu, Zn, … heavier) change n_e by < 3e-3 relative between 3000 and
#: 20 000 K; all elements count in the mass.
DONORS = ("H", "He", "C", "N", "O", "Na", "Mg", "Al", "Si", "S", "K", "Ca", "Ti", "Cr", "Mn",
          "Fe", "Co", "Ni")
_N_STAGES = 3
_LOG_T0 = 3.0
_DLOG_T = 0.01
_DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class ElementInfo:
    """Atomic data of one element (see ``iris_lab/data/elements.csv``)."""

    z: int
    symbol: str
    mass: float
    log_eps: float
    chi: tuple[float, float, float]


@functools.lru_cache(maxsize=1)
def _elements() -> dict[str, ElementInfo]:
    out = {}
    with open(_DATA / "elements.csv") as f:
        rows = [r for r in csv.reader(line for line in f if not line.startswith("#"))]
    for r in rows[1:]:
        chi = tuple(float(v) for v in r[4:7])
        out[r[1]] = ElementInfo(int(r[0]), r[1], float(r[2]), float(r[3]), chi)
    return out


@functools.lru_cache(maxsize=1)
def _pf_table() -> dict[tuple[int, int], np.ndarray]:
    out = {}
    with open(_DATA / "partition_functions.csv") as f:
        rows = [r for r in csv.reader(line for line in f if not line.startswith("#"))]
    for r in rows[1:]:
        out[(int(r[0]), int(r[1]))] = np.array([float(v) for v in r[2:]])
    return out


def _symbol(element: str | int) -> str:
    table = _elements()
    if isinstance(element, int | np.integer):
        for s, info in table.items():
            if info.z == int(element):
                return s
        raise ValueError(f"unknown element Z={element}")
    s = str(element).strip().capitalize()
    if s not in table:
        raise ValueError(f"unknown element {element!r}")
    return s


def element_data(element: str | int) -> ElementInfo:
    """Atomic data of an element given by symbol or atomic number.

    Example
    -------
    >>> element_data("Fe").z, round(element_data(26).chi[0], 2)
    (26, 7.9)
    """
    return _elements()[_symbol(element)]


def abundances(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Solar abundances log ε (H = 12; Asplund et al. 2009), optionally overridden.

    Example
    -------
    >>> a = abundances({"Fe": 7.45})
    >>> a["Fe"], a["H"], a["He"]
    (7.45, 12.0, 10.93)
    """
    out = {s: e.log_eps for s, e in _elements().items() if np.isfinite(e.log_eps)}
    for k, v in (overrides or {}).items():
        out[_symbol(k)] = float(v)
    return out


def _as64(x, device=None) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(torch.float64)
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def _pf_tensor(symbols: list[str], device) -> Tensor:
    """(n_elements, 3, n_T) table of log10 U; missing stages get U = 1."""
    table = _pf_table()
    n_t = len(next(iter(table.values())))
    out = np.zeros((len(symbols), _N_STAGES, n_t))
    for i, s in enumerate(symbols):
        z = _elements()[s].z
        for k in range(_N_STAGES):
            if (z, k + 1) in table:
                out[i, k] = table[(z, k + 1)]
    return torch.as_tensor(out, dtype=torch.float64, device=device)


def _interp_log_t(table: Tensor, temperature: Tensor) -> Tensor:
    """Catmull-Rom interpolation of ``table`` (..., n_T) on log10 T = 3 + 0.01 k.

    Returns (*temperature.shape, *table.shape[:-1]), contiguous.
    """
    n_t = table.shape[-1]
    u = (torch.log10(temperature.reshape(-1)) - _LOG_T0) / _DLOG_T
    u = torch.clamp(u, 1.0, n_t - 2.0 - 1e-9)
    i = torch.floor(u).detach().long()
    s = (u - i).unsqueeze(-1)
    p = table.reshape(-1, n_t).T  # (n_T, R)
    # Catmull-Rom cubic on each cell [k, k+1] in Horner form: c0 + s (c1 + s (c2 + s c3))
    p0, p1, p2, p3 = p[:-3], p[1:-2], p[2:-1], p[3:]
    coef = torch.stack([p1, 0.5 * (p2 - p0), p0 - 2.5 * p1 + 2.0 * p2 - 0.5 * p3,
                        0.5 * (p3 - p0) + 1.5 * (p1 - p2)], dim=0)  # (4, n_T - 3, R)
    c = coef[:, i - 1]  # (4, M, R)
    val = c[0] + s * (c[1] + s * (c[2] + s * c[3]))
    return val.reshape(tuple(temperature.shape) + tuple(table.shape[:-1]))


def partition_function(element: str | int, ion: int, temperature) -> Tensor:
    """Partition function U(T) of ``element`` in stage ``ion`` (1 = neutral).

    Kurucz's tables, cubic (Catmull-Rom) interpolation in log10 T, clamped to
    1023-39000 K.

    Example
    -------
    >>> import torch
    >>> round(float(partition_function("H", 1, torch.tensor(5000.0))), 6)
    2.0
    >>> 20 < float(partition_function("Fe", 1, torch.tensor(5000.0))) < 35
    True
    """
    return partition_functions([(element, ion)], temperature)[..., 0]


def partition_functions(species: Sequence[tuple[str | int, int]], temperature) -> Tensor:
    """Partition functions of several ``(element, ion)`` species in one
    interpolation, shape ``(..., n_species)``.

    Example
    -------
    >>> import torch
    >>> partition_functions([("H", 1), ("Fe", 2)], torch.ones(4) * 5000.0).shape
    torch.Size([4, 2])
    """
    t = _as64(temperature)
    ions = [int(ion) for _, ion in species]
    if any(ion not in (1, 2, 3) for ion in ions):
        raise ValueError(f"ion stages must be 1, 2 or 3, got {ions}")
    table = _pf_tensor([_symbol(element) for element, _ in species], t.device)  # (S, 3, n_T)
    rows = table[torch.arange(len(ions)), torch.tensor(ions) - 1]
    return 10.0 ** _interp_log_t(rows, t)


@functools.lru_cache(maxsize=16)
def _saha_table(symbols: tuple[str, ...], full: bool) -> tuple[np.ndarray, np.ndarray]:
    """ln(2 U_{k+1}/U_k) on the log T grid and the matching ionisation energies.

    Rows: [H⁻→H I: ln(2 U_H I / U_H⁻)], [H I→II], then for the other elements
    I→II and II→III (``full``) — or, for the EOS (``full=False``, symbols[1] = He),
    He I→II, He II→III and I→II only of the metals (their second ionisation
    changes n_e by < 1e-4 relative below 2·10⁴ K, where H dominates anyway).
    Missing stages get χ = +inf (S = 0).
    """
    table = _pf_table()
    n_t = len(next(iter(table.values())))
    ln10 = math.log(10.0)
    rows, chis = [], []

    def log_u(z: int, stage: int) -> np.ndarray:
        return table.get((z, stage), np.zeros(n_t)) * ln10

    u_h = log_u(1, 1)
    rows += [math.log(2.0) + u_h, math.log(2.0) + log_u(1, 2) - u_h]
    chis += [opacity.CHI_HMINUS, _elements()["H"].chi[0]]
    for n, sym in enumerate(symbols[1:]):
        info = _elements()[sym]
        for k in (1, 2) if (full or n == 0) else (1,):
            ok = (info.z, k + 1) in table and np.isfinite(info.chi[k - 1])
            rows.append(math.log(2.0) + log_u(info.z, k + 1) - log_u(info.z, k))
            chis.append(info.chi[k - 1] if ok else np.inf)
    return np.array(rows), np.array(chis)


def _saha_factors(symbols: list[str], t: Tensor, full: bool = True) -> dict[str, Tensor]:
    """Saha factors S = n_{k+1} n_e / n_k [cm⁻³] at T (shape (...)).

    ``symbols[0]`` must be H. Returns contiguous tensors ``s_h`` (H I→II) and
    ``s_hm`` = n(H I) n_e / n(H⁻) (...); with ``full`` also ``s1``, ``s2``
    (..., E-1) for I→II and II→III of the other elements, else (symbols[1] =
    He) ``s_he1``, ``s_he2`` (...) and ``s1`` (..., E-2) for the metals.
    """
    if symbols[0] != "H" or (not full and symbols[1] != "He"):
        raise ValueError("the first elements must be H (and He)")
    rows, chis = _saha_table(tuple(symbols), full)
    dev = t.device
    ln_ratio = _interp_log_t(torch.as_tensor(rows, dtype=torch.float64, device=dev), t)
    chi = torch.as_tensor(np.nan_to_num(chis, posinf=1e4), dtype=torch.float64, device=dev)
    ln_ct = (math.log(opacity.SAHA_CONST) + 1.5 * torch.log(t)).unsqueeze(-1)
    s = torch.exp(ln_ratio + ln_ct - chi / (K_BOLTZMANN / EV * t).unsqueeze(-1))  # (..., R)
    out = {"s_h": s[..., 1].contiguous(), "s_hm": s[..., 0].contiguous()}
    if full:
        metals = s[..., 2:].reshape(*t.shape, -1, 2)
        out.update(s1=metals[..., 0].contiguous(), s2=metals[..., 1].contiguous())
    else:
        out.update(s_he1=s[..., 2].contiguous(), s_he2=s[..., 3].contiguous(),
                   s1=s[..., 4:].contiguous())
    return out


def _charge_moments(sf: dict[str, Tensor], inv_ne: Tensor, n_e: Tensor, mix: _Mix):
    """Σ ε <charge> and Σ ε Var(charge) over H (H⁻, H I, H II), He (I, II, III) and
    the metals (I, II), plus the pieces needed for the populations."""
    r1 = sf["s1"] * inv_ne.unsqueeze(-1)
    f = r1 / (1.0 + r1)
    q = f @ mix.eps_m
    var = (f - f * f) @ mix.eps_m
    a1 = sf["s_he1"] * inv_ne
    a12 = a1 * sf["s_he2"] * inv_ne
    inv_den_he = 1.0 / (1.0 + a1 + a12)
    mean_he = (a1 + 2.0 * a12) * inv_den_he
    second_he = (a1 + 4.0 * a12) * inv_den_he
    r_p = sf["s_h"] * inv_ne
    r_m = n_e / sf["s_hm"]  # H⁻ / H I
    inv_den_h = 1.0 / (1.0 + r_p + r_m)
    mean_h = (r_p - r_m) * inv_den_h
    second_h = (r_p + r_m) * inv_den_h
    q = q + mean_h + mix.eps_he * mean_he
    var = var + second_h - mean_h * mean_h + mix.eps_he * (second_he - mean_he * mean_he)
    return q, var, (r_p, r_m, inv_den_h, inv_den_he)


def ionisation_fractions(element: str | int | Sequence[str | int], temperature,
                         n_e) -> Tensor:
    """LTE fractions of stages I, II, III of ``element`` at T [K] and n_e [cm⁻³].

    Returns (..., 3), summing to 1 (for H: H I, H II and 0; H⁻, < 1e-7 of H I
    in the photosphere, is counted in H I here); for a sequence of elements
    (..., n_elements, 3), from one interpolation of the Saha factors.

    Example
    -------
    >>> import torch
    >>> f = ionisation_fractions("Fe", torch.tensor(5800.0), torch.tensor(1e13))
    >>> 0.8 < float(f[1]) < 1.0
    True
    >>> ionisation_fractions(["H", "Fe", "Ti"], torch.tensor(5800.0), torch.tensor(1e13)).shape
    torch.Size([3, 3])
    """
    t = _as64(temperature)
    ne = _as64(n_e, t.device)
    _check("temperature", t)
    _check("n_e", ne)
    many = not isinstance(element, (str, int))
    symbols = [_symbol(e) for e in (element if many else [element])]
    metals = list(dict.fromkeys(s for s in symbols if s != "H"))
    sf = _saha_factors(["H", *(metals or ["H"])], t)      # at least one metal row
    ne_ = ne.unsqueeze(-1)
    r1_h = (sf["s_h"] / ne).unsqueeze(-1)
    r1 = torch.cat([r1_h, sf["s1"][..., :len(metals)] / ne_], -1)          # (..., 1 + M)
    r12 = torch.cat([torch.zeros_like(r1_h),
                     r1[..., 1:] * sf["s2"][..., :len(metals)] / ne_], -1)
    pick = [0 if s == "H" else 1 + metals.index(s) for s in symbols]
    r1, r12 = r1[..., pick], r12[..., pick]
    den = 1.0 + r1 + r12
    out = torch.stack([1.0 / den, r1 / den, r12 / den], dim=-1)              # (..., E, 3)
    return out if many else out[..., 0, :]


def _check(name: str, x: Tensor) -> None:
    """Value checks (skipped inside torch.func transforms, where they cannot run)."""
    try:
        bad_nan = bool(torch.isnan(x).any())
    except RuntimeError:            # vmap / functorch: data-dependent control flow
        return
    if bad_nan:
        raise ValueError(f"{name} contains NaN")
    if (x <= 0).any():
        raise ValueError(f"{name} must be > 0 everywhere (min {float(x.min()):.3g})")


class _Mix:
    """Per-call element mixture: donors, abundances and mass per H nucleus."""

    def __init__(self, abund: Mapping[str, float] | None, device):
        ab = abundances(abund)
        donors = list(DONORS)
        self.symbols = donors
        self.eps = torch.tensor([10.0 ** (ab[s] - 12.0) for s in donors], dtype=torch.float64,
                                device=device)
        self.eps_sum = float(sum(10.0 ** (v - 12.0) for v in ab.values()))
        self.mass_per_h = AMU * float(sum(10.0 ** (v - 12.0) * _elements()[s].mass
                                          for s, v in ab.items()))
        self.q_max = float((self.eps * 2.0).sum() - self.eps[0])
        self.eps_he = float(self.eps[1])
        self.eps_m = self.eps[2:].contiguous()


def _newton_ne(sf: dict[str, Tensor], n_tot: Tensor, mix: _Mix, x0: Tensor,
               n_iter: int) -> Tensor:
    """Solve n_e = n_H(n_e) Σ ε_k <charge>_k for x = ln n_e (fixed iteration count).

    Newton on h(x) = x - ln n_H(x) - ln Q(x); h' ≥ 1, so steps are bounded.
    """
    def residual(x, sf_, n_tot_):
        n_e = torch.exp(x)
        q, var, _ = _charge_moments(sf_, torch.exp(-x), n_e, mix)
        q = torch.clamp(q, min=1e-30)
        dq = -var
        n_h = torch.clamp(n_tot_ - n_e, min=1e-300) / mix.eps_sum
        h = x - torch.log(n_h) - torch.log(q)
        dh = 1.0 + n_e / (mix.eps_sum * n_h) - dq / q
        return h, dh

    ln_tot = torch.log(n_tot.detach())
    x_hi = ln_tot + math.log(mix.q_max / (mix.eps_sum + mix.q_max)) - 1e-9
    x_lo = ln_tot - 60.0
    x = torch.minimum(torch.maximum(x0.detach(), x_lo), x_hi)
    with torch.no_grad():
        sf_d, n_d = {k: v.detach() for k, v in sf.items()}, n_tot.detach()
        for _ in range(n_iter):
            h, dh = residual(x, sf_d, n_d)
            x = torch.minimum(torch.maximum(x - torch.clamp(h / dh, -3.0, 3.0), x_lo), x_hi)
    # one Newton step with gradients: exact first derivatives at convergence
    h, dh = residual(x, sf, n_tot)
    return x - h / dh.detach()


def _state_from_ne(x: Tensor, sf: dict[str, Tensor], t: Tensor, n_tot: Tensor, mix: _Mix,
                   coef500: dict[str, Tensor]) -> dict[str, Tensor]:
    n_e = torch.exp(x)
    _, _, (r_p, r_m, inv_den_h, inv_den_he) = _charge_moments(sf, torch.exp(-x), n_e, mix)
    n_h = (n_tot - n_e) / mix.eps_sum
    n_h_neutral = n_h * inv_den_h
    out = {
        "n_e": n_e,
        "p_e": n_e * K_BOLTZMANN * t,
        "n_h": n_h,
        "n_hminus": n_h_neutral * r_m,
        "n_h_neutral": n_h_neutral,
        "n_protons": n_h_neutral * r_p,
        "rho": n_h * mix.mass_per_h,
    }
    out["n_he_neutral"] = n_h * mix.eps_he * inv_den_he
    out["kappa500"] = opacity.combine_opacity(coef500, n_e, out["n_h_neutral"],
                                              out["n_protons"], out["n_he_neutral"])[..., 0]
    return out


def _coef500(t: Tensor) -> dict[str, Tensor]:
    return opacity.opacity_coefficients(torch.tensor([5000.0], dtype=torch.float64,
                                                     device=t.device), t)


def _initial_x(t: Tensor, n_tot: Tensor) -> Tensor:
    # metals (ε ~ 1e-4) ionised below ~7000 K, hydrogen above: a smooth guess
    frac = 1e-4 + 0.5 * torch.sigmoid((t - 8000.0) / 800.0)
    return torch.log(n_tot * frac)


def solve_ionisation(temperature, p_gas, *, abundances: Mapping[str, float] | None = None,
                     n_e_guess: Tensor | None = None, n_iter: int = 12,
                     validate: bool = True) -> dict[str, Tensor]:
    """LTE ionisation equilibrium and charge conservation at given T and p_gas.

    Parameters
    ----------
    temperature, p_gas : Tensor (...)
        Temperature [K] and gas pressure [dyn cm⁻²].
    abundances : mapping, optional
        log ε overrides of the Asplund et al. (2009) mixture.
    n_e_guess : Tensor, optional
        Starting electron density.
    n_iter : int
        Newton iterations on ln n_e (8 converge from the default guess to
        machine precision for 2000-100 000 K and 1e-3-1e6 dyn cm⁻²).
    validate : bool
        Check the inputs (set False inside ``torch.func.vmap``).

    Returns
    -------
    dict of tensors (...): ``n_e, p_e, n_h`` (all hydrogen nuclei), ``n_hminus,
    n_h_neutral, n_protons, n_he_neutral, rho, kappa500`` [cm⁻¹ at 5000 Å].

    Example
    -------
    >>> import torch
    >>> s = solve_ionisation(torch.tensor(6000.0), torch.tensor(1e5))
    >>> 1e13 < float(s["n_e"]) < 1e14
    True
    """
    t = _as64(temperature)
    p = _as64(p_gas, t.device)
    if validate:
        _check("temperature", t)
        _check("p_gas", p)
    t, p = torch.broadcast_tensors(t, p)
    mix = _Mix(abundances, t.device)
    sf = _saha_factors(mix.symbols, t, full=False)
    n_tot = p / (K_BOLTZMANN * t)
    x0 = _initial_x(t, n_tot) if n_e_guess is None else torch.log(_as64(n_e_guess, t.device))
    x = _newton_ne(sf, n_tot, mix, x0.expand_as(t), n_iter)
    return _state_from_ne(x, sf, t, n_tot, mix, _coef500(t))


def hydrostatic_equilibrium(
    log_tau,
    temperature,
    v_turb=None,
    *,
    abundances: Mapping[str, float] | None = None,
    gravity: float = SOLAR_GRAVITY,
    p_top=None,
    n_iter_top: int = 12,
    n_iter_depth: int = 2,
    n_corrector: int = 1,
    max_step: float | None = 0.1,
    validate: bool = True,
) -> dict[str, Tensor]:
    """Hydrostatic equilibrium on the log τ500 scale.

    Integrates d p_tot / d τ500 = g / (κ500 / ρ) with p_tot = p_gas + ½ ρ v_turb²
    from the top of the grid down (trapezoidal predictor-corrector in ln p on
    the given log τ grid; a Python loop over depth, vectorised over the batch),
    solving the LTE EOS at every point, then integrates dz = -dτ / κ500 for the
    geometrical height (z = 0 at log τ500 = 0, or at the deepest point when
    the grid does not reach 0).

    Parameters
    ----------
    log_tau : Tensor (depth,) or (..., depth)
        log10 τ500, strictly increasing (top first).
    temperature : Tensor (..., depth)
        Temperature [K].
    v_turb : Tensor (..., depth), optional
        Microturbulent velocity [cm s⁻¹] for the turbulent pressure ½ ρ v².
    abundances : mapping, optional
        log ε overrides.
    gravity : float
        Surface gravity [cm s⁻²] (solar 2.7398e4).
    p_top : Tensor (...), optional
        Total pressure at the top point; by default the value for a constant
        κ500/ρ above it, p = g τ_top / (κ500/ρ).
    n_iter_top, n_iter_depth, n_corrector : int
        Iteration counts (top boundary fixed point; Newton steps for n_e per
        EOS call, warm-started from the previous call; trapezoidal corrector
        passes).
    max_step : float or None
        Largest integration step in log τ; coarser grids are sub-divided
        internally (T, v_turb² linear in log τ). None integrates on the given
        grid only (needed inside ``torch.func.vmap``).
    validate : bool
        Check the inputs (set False inside ``torch.func.vmap``).

    Returns
    -------
    dict of tensors (..., depth): ``p_gas, p_turb, p_e, n_e, n_h, n_h_neutral,
    n_protons, n_hminus, n_he_neutral, rho, kappa500, height, log_tau``.

    Raises
    ------
    ValueError
        NaN in the inputs, T ≤ 0, or log τ not strictly increasing.

    Example
    -------
    >>> import torch
    >>> lt = torch.linspace(-3.0, 1.0, 41, dtype=torch.float64)
    >>> t = torch.full((2, 41), 5500.0, dtype=torch.float64)
    >>> hydrostatic_equilibrium(lt, t)["height"].shape
    torch.Size([2, 41])
    """
    t = _as64(temperature)
    lt = _as64(log_tau, t.device)
    vt = None if v_turb is None else _as64(v_turb, t.device)
    if validate:
        _check("temperature", t)
        if torch.isnan(lt).any():
            raise ValueError("log_tau contains NaN")
        if vt is not None and torch.isnan(vt).any():
            raise ValueError("v_turb contains NaN")
        if lt.shape[-1] != t.shape[-1]:
            raise ValueError(f"log_tau has {lt.shape[-1]} depth points, "
                             f"temperature {t.shape[-1]}")
        if lt.shape[-1] < 2:
            raise ValueError("need at least two depth points")
        if (torch.diff(lt, dim=-1) <= 0).any():
            raise ValueError("log_tau must be strictly increasing (top of the atmosphere first)")
    batch = torch.broadcast_shapes(lt.shape[:-1], t.shape[:-1])
    if vt is not None:
        batch = torch.broadcast_shapes(batch, vt.shape[:-1])
    n_d = t.shape[-1]
    t = t.expand(*batch, n_d)
    lt = lt.expand(*batch, n_d)
    vt2 = torch.zeros_like(t) if vt is None else vt.expand(*batch, n_d) ** 2
    lt_in = lt
    if max_step is not None:
        # sub-steps, the same count for the whole batch, so that no step exceeds
        # max_step in log τ; T and v_turb² are interpolated linearly in log τ
        dl_max = torch.diff(lt.detach(), dim=-1).reshape(-1, n_d - 1).max(0).values
        n_sub = torch.clamp(torch.ceil(dl_max / max_step - 1e-6), min=1).long().tolist()
        idx0, frac, keep = [], [], []
        for i, m in enumerate(n_sub):
            keep.append(len(idx0))
            idx0 += [i] * m
            frac += [k / m for k in range(m)]
        keep.append(len(idx0))
        idx0.append(n_d - 2)
        frac.append(1.0)
        i0 = torch.tensor(idx0, device=t.device)
        w = torch.tensor(frac, dtype=torch.float64, device=t.device)

        def refine(a: Tensor) -> Tensor:
            return a[..., i0] * (1.0 - w) + a[..., i0 + 1] * w

        t, lt, vt2 = refine(t), refine(lt), refine(vt2)
        keep_idx = torch.tensor(keep, device=t.device)
    n_d = t.shape[-1]

    mix = _Mix(abundances, t.device)
    # depth-major copies so that every depth slice is contiguous
    t_dm = t.movedim(-1, 0).contiguous()  # (D, ...)
    sf_all = _saha_factors(mix.symbols, t_dm, full=False)  # (D, ..., E-2) / (D, ...)
    coef_all = _coef500(t_dm)  # (D, ..., 1) each
    ln10 = math.log(10.0)
    tau = 10.0**lt
    tau_dm = tau.movedim(-1, 0).contiguous()
    vt2_dm = vt2.movedim(-1, 0).contiguous()

    def evaluate(i: int, ln_p: Tensor, x_rel: Tensor, y_e: Tensor, n_iter: int):
        """EOS at depth i for total pressure exp(ln_p); x_rel = ln(n_e/n_tot) and
        y_e = n_e / n_H are warm starts."""
        ti = t_dm[i]
        # p_gas from p_tot: ρ / p_gas = m_H / (kT (Σε + n_e/n_H))
        beta = 0.5 * vt2_dm[i] * mix.mass_per_h / (K_BOLTZMANN * ti * (mix.eps_sum + y_e))
        p_gas = torch.exp(ln_p) / (1.0 + beta)
        n_tot = p_gas / (K_BOLTZMANN * ti)
        ln_tot = torch.log(n_tot)
        sf_i = {k: v[i] for k, v in sf_all.items()}
        x = _newton_ne(sf_i, n_tot, mix, x_rel + ln_tot, n_iter)
        st = _state_from_ne(x, sf_i, ti, n_tot, mix, {k: v[i] for k, v in coef_all.items()})
        st["p_gas"] = p_gas
        st["p_turb"] = p_gas * beta
        deriv = gravity * tau_dm[i] * ln10 * st["rho"] / (st["kappa500"] * torch.exp(ln_p))
        return st, deriv, (x - ln_tot).detach(), (st["n_e"] / st["n_h"]).detach()

    # top boundary: p = g τ ρ / κ500 (constant κ500/ρ above the top point)
    t0 = t[..., 0]
    if p_top is not None:
        p0 = _as64(p_top, t.device).expand(batch)
        if validate:
            _check("p_top", p0)
        ln_p = torch.log(p0)
    else:
        ln_p = torch.log(gravity * tau_dm[0] / 0.1)
    with torch.no_grad():
        st0 = solve_ionisation(t0.detach(), torch.exp(ln_p).detach(), abundances=abundances,
                               validate=False)
    x_rel = torch.log(st0["n_e"] / (st0["n_e"] + st0["n_h"] * mix.eps_sum))
    y_e = st0["n_e"] / st0["n_h"]
    if p_top is None:
        for _ in range(n_iter_top):
            st, deriv, x_rel, y_e = evaluate(0, ln_p, x_rel, y_e, n_iter_depth)
            # fixed point ln p = ln(g τ ρ/κ); κ/ρ ∝ p^~0.5, so under-relax by 2/3
            target = torch.log(gravity * tau_dm[0] * st["rho"] / st["kappa500"])
            ln_p = ln_p + (2.0 / 3.0) * (target - ln_p)
    st, deriv, x_rel, y_e = evaluate(0, ln_p, x_rel, y_e, n_iter_depth)
    states = [st]
    deriv_prev, h_prev = deriv, None
    for i in range(1, n_d):
        h = lt[..., i] - lt[..., i - 1]
        if h_prev is None:  # first step: Euler predictor
            ln_p_new = ln_p + h * deriv
        else:  # variable-step Adams-Bashforth 2 predictor
            ln_p_new = ln_p + h * (deriv + 0.5 * h / h_prev * (deriv - deriv_prev))
        st_n, d_n, x_n, y_n = evaluate(i, ln_p_new, x_rel, y_e, n_iter_depth)
        for _ in range(n_corrector if h_prev is not None else max(n_corrector, 1)):
            ln_p_new = ln_p + 0.5 * h * (deriv + d_n)  # trapezoidal corrector
            st_n, d_n, x_n, y_n = evaluate(i, ln_p_new, x_n, y_n, n_iter_depth)
        deriv_prev, h_prev = deriv, h
        ln_p, deriv, x_rel, y_e = ln_p_new, d_n, x_n, y_n
        states.append(st_n)

    out = {k: torch.stack([s[k] for s in states], dim=-1) for k in states[0]}
    # height: dz/dlogτ = -τ ln10 / κ500, trapezoid, z = 0 at log τ = 0
    integrand = tau * ln10 / out["kappa500"]
    dz = -0.5 * (integrand[..., 1:] + integrand[..., :-1]) * torch.diff(lt, dim=-1)
    z = torch.cat([torch.zeros_like(dz[..., :1]), torch.cumsum(dz, dim=-1)], dim=-1)
    j = torch.clamp((lt < 0).sum(-1, keepdim=True), 1, n_d - 1)
    l0, l1 = torch.gather(lt, -1, j - 1), torch.gather(lt, -1, j)
    z0, z1 = torch.gather(z, -1, j - 1), torch.gather(z, -1, j)
    w = torch.clamp((0.0 - l0) / (l1 - l0), max=1.0)
    out["height"] = z - (z0 + w * (z1 - z0))
    if max_step is not None:
        out = {k: v[..., keep_idx] for k, v in out.items()}
    out["log_tau"] = lt_in
    return out


def lte_level_populations(element: str | int, ion: int, e_low_ev, g_low, temperature, n_e,
                          n_h, *, abundances: Mapping[str, float] | None = None) -> Tensor:
    """LTE number density [cm⁻³] of a level of ``element`` in stage ``ion``.

    ``n = ε n_H f_ion(T, n_e) g exp(-E/kT) / U_ion(T)``.

    Parameters
    ----------
    element : str or int
    ion : int
        1 = neutral, 2 = singly ionised, 3.
    e_low_ev, g_low : float or Tensor
        Excitation energy [eV] and statistical weight 2J+1 of the level;
        a Tensor (n_lines,) broadcasts as a trailing axis only if the caller
        arranges the shapes (they simply broadcast with ``temperature``).
    temperature, n_e, n_h : Tensor (...)
        Temperature [K], electron and total hydrogen density [cm⁻³].

    Example
    -------
    >>> import torch
    >>> n = lte_level_populations("Fe", 1, 2.2, 5, torch.tensor(5000.0),
    ...                           torch.tensor(1e12), torch.tensor(1e17))
    >>> float(n) > 0
    True
    """
    t = _as64(temperature)
    s = _symbol(element)
    eps = 10.0 ** (abundances_value(s, abundances) - 12.0)
    frac = ionisation_fractions(s, t, n_e)[..., ion - 1]
    u = partition_function(s, ion, t)
    boltz = _as64(g_low, t.device) * torch.exp(-_as64(e_low_ev, t.device) * EV / (K_BOLTZMANN * t))
    return eps * _as64(n_h, t.device) * frac * boltz / u


def abundances_value(element: str | int, overrides: Mapping[str, float] | None = None) -> float:
    """log ε of one element (Asplund et al. 2009 unless overridden).

    Example
    -------
    >>> abundances_value("Fe")
    7.5
    """
    s = _symbol(element)
    if overrides:
        for k, v in overrides.items():
            if _symbol(k) == s:
                return float(v)
    return _elements()[s].log_eps
