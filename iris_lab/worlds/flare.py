"""Beam-heated flare atmospheres on Radynversion's height grid.

A parametric stand-in for a RADYN flare grid (no radiation-hydrodynamics is
solved): a pre-flare FAL-C chromosphere under a 1–2.5 MK corona is heated by a
non-thermal electron beam, and the heating drives a documented chain of
scalings, evaluated at every time step of a sequence:

1. **Beam.** A power law above the cut-off ``E_c`` with spectral index ``δ``
   and total energy ``E_tot`` [erg cm⁻²], delivered with the F-CHROMA
   triangular 20 s pulse (peak flux ``E_tot / 10 s`` at t = 10 s). Parameters
   span the F-CHROMA/Radynversion ranges: ``E_tot`` 3×10¹⁰–10¹² erg cm⁻²
   (log-uniform), ``E_c`` 10–25 keV, ``δ`` 3–8 (uniform).
2. **Thick-target deposition** (Brown 1972; Emslie 1978; Hawley & Fisher
   1994): an electron loses ``dE/dN* = -K/E`` with ``K = 2π e⁴ Λ`` along the
   ionisation-weighted column ``N* = ∫ (x + (1 - x) Λ'/Λ) n_H dz``; integrating
   over the power law gives the heating per unit column
   ``q(N*) = ½ K (δ - 2) F E_c^(δ-2) (2 K N*)^(-δ/2) B(t; δ/2, ½)``,
   ``t = min(1, 2 K N* / E_c²)`` (``B`` the incomplete beta function), which
   integrates to the beam flux ``F`` (see :func:`beam_heating_per_column`).
3. **Chromospheric response.** Deposited energy per gram ``e`` accumulates and
   relaxes radiatively (time scale ``tau_rad`` ~ 1 s); temperature rises towards
   a hydrogen-ionisation plateau of ~10⁴ K,
   ``T = T0 + (T_pl - T0)(1 - exp(-e / e_pl))`` with ``e_pl = 2×10¹² erg g⁻¹``.
   Heating is isochoric: on flare time scales the chromosphere cannot readjust
   hydrostatically (the sound crossing time is minutes), so mass elements keep
   FAL-C's height and density and their pressure rises. Electron densities
   follow from FAL-C's ionisation degree rescaled by LTE Saha odds
   (:func:`iris_lab.worlds.chromosphere.rescaled_ionisation`).
4. **Transition region pushed down.** Where ``e`` exceeds what the layer can
   radiate, ``e_tr = 10¹³ sqrt(n_H / n_H,TR) erg g⁻¹`` (losses grow with
   density), the layer evaporates and joins the corona (Fisher 1989).
5. **Corona.** Apex temperature from conductive balance,
   ``T_apex = (3.5 f_c F L / κ0)^(2/7)`` (RTV-like, ``f_c = 0.1``), pressure
   from the evaporated column spread along the loop (capped by the RTV scaling
   law ``T = 1400 (p L)^(1/3)``), a ``T^(7/2)`` conductive profile above the TR.
6. **Flows.** **Evaporation upflows** above the TR, at a fraction of the coronal
   sound speed; **condensation downflows** below it, ``v ≈ 0.4 (F/ρ)^(1/3)``
   (Fisher 1989), decaying over ~150 km below the TR.

Every state is bounded: 3000 K ≤ T ≤ 5×10⁷ K, |v| ≤ 400 km/s above the TR
and ≤ 100 km/s below, positive densities. Consecutive steps of a sequence
(``dt`` apart) change smoothly, so they warm-start each other's NLTE solution.

Example
-------
>>> from iris_lab.worlds.flare import sample_flare_sequences
>>> atm, beam = sample_flare_sequences(2, 3, seed=0)
>>> atm.batch_shape, atm.n_depth, sorted(beam.data_vars)[:3]
((2, 3), 50, ['delta', 'e_cut', 'flux'])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iris_lab.atmosphere import Atmosphere
from iris_lab.worlds.chromosphere import (
    A_HE,
    A_METALS,
    AMU,
    GRAVITY,
    K_B,
    MASS_PER_H,
    _falc,
    _interp_rows,
    falc_column_mass,
    rescaled_ionisation,
)

ELECTRON_CHARGE = 4.80320e-10  # esu
KEV = 1.602176634e-9  # erg
#: Coulomb logarithms for a fully ionised and a neutral hydrogen target
#: (typical chromospheric values used in Hawley & Fisher 1994-style beam heating).
LAMBDA_IONISED = 20.0
LAMBDA_NEUTRAL = 7.0
#: Spitzer conductivity coefficient [erg s⁻¹ cm⁻¹ K⁻⁷ᐟ²].
KAPPA0 = 1.0e-6
#: Beam pulse: triangular, this long [s], peaking half way (F-CHROMA grid).
PULSE_DURATION = 20.0
#: Ranges of the beam parameters.
FLUX_RANGE = (3.0e10, 1.0e12)
E_CUT_RANGE = (10.0, 25.0)
DELTA_RANGE = (3.0, 8.0)

#: Bounds.
T_FLOOR = 3000.0
T_CEIL = 5.0e7
V_CORONA_MAX = 400.0e5
V_CHROMOSPHERE_MAX = 100.0e5
#: Energy per gram of the hydrogen-ionisation plateau [erg g⁻¹]
#: (ionising H costs 13.6 eV per 1.37 amu ≈ 1e13 erg g⁻¹).
E_PLATEAU = 2.0e12
#: Deposited energy per gram beyond which a layer at the pre-flare TR density can no
#: longer radiate and evaporates, joining the corona [erg g⁻¹]; denser layers radiate
#: more, so the threshold grows as sqrt(n_H / n_H(TR)).
E_TR = 1.0e13
#: e-folding height of the condensation downflow below the TR [cm].
CONDENSATION_DEPTH = 1.5e7
#: Fraction of the beam flux that ends in the corona by conduction/evaporation.
CORONAL_FRACTION = 0.1
#: Electrons per hydrogen nucleus of a fully ionised plasma (H, He, low-FIP metals).
Y_CORONA = 1.0 + 2.0 * A_HE + A_METALS
_N_FINE = 240


def flare_height_grid() -> np.ndarray:
    """Radynversion's 50-point height grid [cm], ordered top to bottom.

    45 points linear from -65 km to 3.5 Mm and 5 logarithmically spaced points
    up to 10.5 Mm (Osborne, Armstrong & Fletcher 2019, the grid of their
    training-set export). Returned **decreasing** (top first), the depth order
    of :class:`~iris_lab.atmosphere.Atmosphere`.

    Example
    -------
    >>> z = flare_height_grid()
    >>> z.shape, round(float(z[0]) / 1e8, 2), round(float(z[-1]) / 1e8, 3)
    ((50,), 10.5, -0.065)
    """
    linear = np.linspace(-6.5e6, 3.5e8, 45)
    expo = np.logspace(np.log10(3.5e8), np.log10(1.05e9), 6)[1:]
    return np.concatenate([linear, expo])[::-1].copy()


def beam_flux(time: np.ndarray, total_energy: np.ndarray) -> np.ndarray:
    """Triangular beam pulse [erg cm⁻² s⁻¹] at ``time`` [s] (broadcast).

    Example
    -------
    >>> float(beam_flux(10.0, 1e11))
    10000000000.0
    """
    t = np.asarray(time, dtype=float)
    peak = 2.0 * np.asarray(total_energy, dtype=float) / PULSE_DURATION
    return peak * np.clip(1.0 - np.abs(t - PULSE_DURATION / 2) / (PULSE_DURATION / 2), 0.0, 1.0)


def beam_heating_per_column(column: np.ndarray, flux: np.ndarray, e_cut_kev: np.ndarray,
                            delta: np.ndarray) -> np.ndarray:
    """Thick-target heating per unit effective column [erg s⁻¹] (per cm⁻² of N*).

    Parameters
    ----------
    column
        Ionisation-weighted hydrogen column ``N*`` [cm⁻²] (see module docstring).
    flux
        Beam energy flux [erg cm⁻² s⁻¹].
    e_cut_kev, delta
        Low-energy cut-off [keV] and spectral index (> 2) of the injected power law.

    Returns
    -------
    numpy.ndarray
        ``q(N*)``; ``∫ q dN*`` over all columns equals ``flux``.

    Example
    -------
    >>> n = np.logspace(14, 24, 2000)
    >>> q = beam_heating_per_column(n, 1e10, 20.0, 5.0)
    >>> bool(abs(np.trapezoid(q, n) / 1e10 - 1) < 0.02)
    True
    """
    from scipy.special import beta, betainc

    delta = np.asarray(delta, dtype=float)
    if np.any(delta <= 2.0):
        raise ValueError("the spectral index delta must be > 2 for a finite beam energy")
    k = 2.0 * np.pi * ELECTRON_CHARGE**4 * LAMBDA_IONISED
    e_c = np.asarray(e_cut_kev, dtype=float) * KEV
    a = 2.0 * k * np.maximum(np.asarray(column, dtype=float), 1.0)
    t = np.minimum(1.0, a / e_c**2)
    # (2 K N*)^(-δ/2) E_c^(δ-2) written as E_c^-2 (a / E_c²)^(-δ/2) to stay in range
    scaled = (a / e_c**2) ** (-0.5 * delta) / e_c**2
    b = betainc(0.5 * delta, 0.5, t) * beta(0.5 * delta, 0.5)
    return 0.5 * k * (delta - 2.0) * np.asarray(flux, dtype=float) * scaled * b


def _preflare(n_fine: int = _N_FINE) -> dict[str, np.ndarray]:
    """FAL-C below its transition region on a fine column-mass grid."""
    falc = _falc()
    log_m_falc = falc_column_mass(falc)
    keep = falc.temperature <= 2.0e4
    lm, t = log_m_falc[keep], falc.temperature[keep]
    grid = np.linspace(lm[0], lm[-1], n_fine)
    fields = {
        "log_m": grid,
        "temperature": np.exp(np.interp(grid, lm, np.log(t))),
        "y_e": np.exp(np.interp(grid, lm, np.log((falc.n_e / falc.n_h)[keep]))),
        "n_tot": np.exp(np.interp(grid, lm, np.log((falc.p_gas / (K_B * falc.temperature))[keep]))),
        "v_turb": np.interp(grid, lm, falc.v_turb[keep]),
        "log_tau": np.interp(grid, lm, falc.log_tau[keep]),
        "height": np.interp(grid, lm, falc.height[keep]),
        "n_h": np.exp(np.interp(grid, lm, np.log(falc.n_h[keep]))),
    }
    return fields


def _evolve(flux_total: np.ndarray, e_cut: np.ndarray, delta: np.ndarray,
            t_corona0: np.ndarray, tau_rad: np.ndarray, times: np.ndarray) -> dict[str, np.ndarray]:
    """Run the parametric flare model for a batch of sequences; arrays (B, S, 50)."""
    pre = _preflare()
    heights = flare_height_grid()
    top = heights[0]
    log_m = pre["log_m"]
    m = 10.0**log_m
    n_b, n_s = flux_total.shape[0], times.shape[0]
    mu_h = MASS_PER_H * AMU
    lam_ratio = LAMBDA_NEUTRAL / LAMBDA_IONISED
    m_tr0 = m[0]
    p_cor0 = GRAVITY * m_tr0

    energy = np.zeros((n_b, log_m.size))
    y_e = np.broadcast_to(pre["y_e"], (n_b, log_m.size)).copy()
    n_h = np.broadcast_to(pre["n_tot"] / (1.0 + A_HE + pre["y_e"]), (n_b, log_m.size)).copy()
    f_eff = np.zeros(n_b)
    out = {k: np.empty((n_b, n_s, heights.size)) for k in
           ("temperature", "n_e", "n_h", "v_los", "v_turb", "p_gas", "rho")}
    t_prev = 0.0
    sub = np.linspace(0.0, 1.0, 9)
    for s, t_now in enumerate(times):
        dt = t_now - t_prev
        f_mean = beam_flux(t_prev + sub[None, :] * dt, flux_total[:, None]).mean(1)
        # ionisation-weighted column from the current state: corona fully ionised
        x_h = np.clip(y_e - A_METALS, 0.0, 1.0)
        weight = x_h + (1.0 - x_h) * lam_ratio
        dn = 0.5 * (weight[:, 1:] + weight[:, :-1]) * np.diff(m) / mu_h
        column = m_tr0 / mu_h + np.concatenate([np.zeros((n_b, 1)), np.cumsum(dn, 1)], 1)
        q_col = beam_heating_per_column(column, f_mean[:, None], e_cut[:, None], delta[:, None])
        q_mass = q_col * weight / mu_h
        # deposited energy relaxes radiatively on the time scale tau_rad
        tau = tau_rad[:, None]
        energy = energy * np.exp(-dt / tau) + q_mass * tau * (1.0 - np.exp(-dt / tau))
        relax = 1.0 - np.exp(-dt / 10.0)
        f_eff = f_eff + (f_mean - f_eff) * relax

        # layers that cannot radiate the deposited energy evaporate
        threshold = E_TR * np.sqrt(pre["n_h"] / pre["n_h"][0])
        coronal = np.cumprod(energy >= threshold, axis=1).astype(bool)
        i_tr = np.minimum(coronal.sum(1), log_m.size - 8)  # keep a chromosphere
        m_tr = m[i_tr]

        plateau = np.minimum(1.0e4 * (1.0 + 0.3 * np.log10(1.0 + energy / E_PLATEAU)), 2.5e4)
        t0 = pre["temperature"]
        temp = t0 + np.maximum(plateau - t0, 0.0) * (1.0 - np.exp(-energy / E_PLATEAU))
        temp = np.maximum(temp, T_FLOOR)

        t_apex = (3.5 * CORONAL_FRACTION * f_eff * top / KAPPA0) ** (2.0 / 7.0)
        t_apex = np.clip(np.maximum(t_apex, t_corona0), 1.0e5, 3.0e7)
        p_rtv = (t_apex / 1400.0) ** 3 / top
        p_evap = (m_tr - m_tr0) / (mu_h * top) * (1.0 + A_HE + Y_CORONA) * K_B * t_apex
        p_cor = p_cor0 + np.minimum(p_rtv, p_evap)

        # isochoric heating: on flare time scales the chromosphere has no time to
        # readjust hydrostatically (sound crossing ~ minutes), so mass elements keep
        # their pre-flare height and density and their pressure rises
        n_h = np.broadcast_to(pre["n_h"], temp.shape)
        y_e = np.minimum(rescaled_ionisation(pre["y_e"], t0, pre["n_tot"], temp,
                                             pre["n_tot"]), 1.0 + A_METALS)
        p = n_h * (1.0 + A_HE + y_e) * K_B * temp
        rho = n_h * mu_h
        h = np.broadcast_to(pre["height"], temp.shape)
        h_tr = np.take_along_axis(h, i_tr[:, None], 1)[:, 0]

        # condensation below the TR, evaporation above it
        rho_tr = np.take_along_axis(rho, i_tr[:, None], 1)[:, 0]
        v_cond = np.minimum(0.4 * (f_eff / rho_tr) ** (1.0 / 3.0), V_CHROMOSPHERE_MAX)
        v_chrom = v_cond[:, None] * np.exp(-np.maximum(h_tr[:, None] - h, 0.0)
                                            / CONDENSATION_DEPTH)
        sound = np.sqrt(5.0 / 3.0 * (1.0 + A_HE + Y_CORONA) * K_B * t_apex / mu_h)
        v_evap = np.minimum(0.3 * sound * np.minimum(1.0, f_eff / 1.0e10) ** (1.0 / 3.0),
                            V_CORONA_MAX)

        # chromospheric part on the height grid (points below the TR, by height)
        below = heights[None, :] <= h_tr[:, None]
        hh = np.flip(h, 1)  # increasing height
        # clipped to the chromosphere's span: no extrapolation into the corona
        at = np.clip(heights[None, ::-1], hh[:, :1], hh[:, -1:])
        chrom = {}
        for name, arr in (("log_t", np.log(temp)), ("log_ne", np.log(y_e * n_h)),
                          ("log_nh", np.log(n_h)), ("v", v_chrom), ("vt", pre["v_turb"]),
                          ("log_p", np.log(p))):
            arr = np.broadcast_to(arr, h.shape)
            chrom[name] = _interp_rows(at, hh, np.flip(arr, 1))[:, ::-1]
        # corona: T^(7/2) conductive profile, isobaric at p_cor
        t_base = np.take_along_axis(temp, i_tr[:, None], 1)[:, 0]
        frac = np.clip((heights[None, :] - h_tr[:, None]) / (top - h_tr[:, None]), 0.0, 1.0)
        t_cor = (t_base[:, None] ** 3.5 + (t_apex[:, None] ** 3.5 - t_base[:, None] ** 3.5)
                 * frac) ** (2.0 / 7.0)
        n_h_cor = p_cor[:, None] / (K_B * t_cor * (1.0 + A_HE + Y_CORONA))
        shape = np.sqrt(1.0 - frac) * (1.0 - np.exp(-(heights[None, :] - h_tr[:, None]) / 3.0e7))
        v_cor = -v_evap[:, None] * np.clip(shape, 0.0, 1.0)

        temperature = np.where(below, np.exp(chrom["log_t"]), t_cor)
        out["temperature"][:, s] = np.clip(temperature, T_FLOOR, T_CEIL)
        out["n_h"][:, s] = np.where(below, np.exp(chrom["log_nh"]), n_h_cor)
        out["n_e"][:, s] = np.where(below, np.exp(chrom["log_ne"]), Y_CORONA * n_h_cor)
        out["v_los"][:, s] = np.where(below, np.clip(chrom["v"], 0.0, V_CHROMOSPHERE_MAX),
                                      np.clip(v_cor, -V_CORONA_MAX, 0.0))
        out["v_turb"][:, s] = np.where(below, chrom["vt"], pre["v_turb"][0])
        out["p_gas"][:, s] = np.where(below, np.exp(chrom["log_p"]),
                                      np.broadcast_to(p_cor[:, None], below.shape))
        out["rho"][:, s] = out["n_h"][:, s] * mu_h
        t_prev = t_now
    return out


def flare_atmospheres(flux: Any, e_cut: Any, delta: Any, times: Any, *,
                      t_corona0: Any = 1.5e6, tau_rad: Any = 1.0) -> Atmosphere:
    """Deterministic flare atmospheres for given beams at given times.

    Parameters
    ----------
    flux, e_cut, delta
        Total beam energy [erg cm⁻²], cut-off [keV] and spectral index, shape ``(n,)``
        (scalars broadcast).
    times
        Increasing times after beam onset [s], shape ``(n_steps,)``.
    t_corona0, tau_rad
        Pre-flare coronal temperature [K] and radiative relaxation time [s].

    Returns
    -------
    Atmosphere
        Batch ``(n, n_steps)`` on :func:`flare_height_grid`.

    Example
    -------
    >>> atm = flare_atmospheres(1e11, 20.0, 5.0, [5.0, 10.0])
    >>> atm.batch_shape
    (1, 2)
    """
    flux, e_cut, delta, t_corona0, tau_rad = (
        np.atleast_1d(np.asarray(a, dtype=float)) for a in (flux, e_cut, delta, t_corona0, tau_rad))
    flux, e_cut, delta, t_corona0, tau_rad = np.broadcast_arrays(
        flux, e_cut, delta, t_corona0, tau_rad)
    times = np.atleast_1d(np.asarray(times, dtype=float))
    if times.ndim != 1 or np.any(times <= 0) or np.any(np.diff(times) <= 0):
        raise ValueError("times must be positive and strictly increasing")
    if np.any(flux <= 0) or np.any(e_cut <= 0):
        raise ValueError("flux and e_cut must be > 0")
    if np.any(delta <= 2):
        raise ValueError("delta must be > 2")
    fields = _evolve(flux, e_cut, delta, t_corona0, tau_rad, times)
    height = np.broadcast_to(flare_height_grid(), fields["temperature"].shape)
    return Atmosphere(height=height, scale="height", **fields)


def sample_flare_sequences(n_sequences: int, n_steps: int, *, seed: int, dt: float = 1.0
                           ) -> tuple[Atmosphere, object]:
    """Seeded time sequences of beam-heated flare atmospheres.

    Parameters
    ----------
    n_sequences
        Number of independent flares (beam parameter sets).
    n_steps
        States per flare, at times ``dt, 2 dt, ..., n_steps dt`` [s] after the
        beam onset (the pulse lasts 20 s; later states cool).
    seed
        Seed of the random generator (same seed, same output).
    dt
        Time between consecutive states [s].

    Returns
    -------
    atmosphere, beam
        :class:`Atmosphere` with batch shape ``(n_sequences, n_steps)`` on
        :func:`flare_height_grid` (``height`` scale, top first): temperature,
        ``n_e``, ``n_h``, ``v_los`` (positive = downflow), ``v_turb``,
        ``p_gas``, ``rho``. ``beam`` is an ``xarray.Dataset`` over
        ``sequence`` with ``flux`` (total beam energy, erg cm⁻²), ``e_cut``
        [keV], ``delta``, ``t_corona0`` [K], ``tau_rad`` [s] and the ``time``
        [s] of each ``step``.

    Raises
    ------
    ValueError
        For non-positive counts or ``dt``.

    Example
    -------
    >>> atm, beam = sample_flare_sequences(3, 4, seed=1)
    >>> bool((atm.temperature > 0).all()), beam.sizes["sequence"]
    (True, 3)
    """
    import xarray as xr

    for name, value in (("n_sequences", n_sequences), ("n_steps", n_steps)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, not {value!r}")
    if not dt > 0:
        raise ValueError(f"dt must be > 0, not {dt!r}")
    rng = np.random.default_rng(seed)
    flux = np.exp(rng.uniform(*np.log(FLUX_RANGE), n_sequences))
    e_cut = rng.uniform(*E_CUT_RANGE, n_sequences)
    delta = rng.uniform(*DELTA_RANGE, n_sequences)
    t_corona0 = rng.uniform(1.0e6, 2.5e6, n_sequences)
    tau_rad = rng.uniform(0.5, 2.0, n_sequences)
    times = dt * np.arange(1, n_steps + 1)
    atmosphere = flare_atmospheres(flux, e_cut, delta, times, t_corona0=t_corona0,
                                   tau_rad=tau_rad)
    beam = xr.Dataset(
        {
            "flux": ("sequence", flux, {"units": "erg / cm2",
                                        "long_name": "total beam energy (20 s triangular pulse)"}),
            "e_cut": ("sequence", e_cut, {"units": "keV", "long_name": "low-energy cut-off"}),
            "delta": ("sequence", delta, {"units": "", "long_name": "beam spectral index"}),
            "t_corona0": ("sequence", t_corona0, {"units": "K",
                                                  "long_name": "pre-flare coronal temperature"}),
            "tau_rad": ("sequence", tau_rad, {"units": "s",
                                              "long_name": "chromospheric radiative relaxation"}),
        },
        coords={"time": ("step", times, {"units": "s", "long_name": "time after beam onset"})},
        attrs={"seed": int(seed), "generator": "iris_lab.worlds.flare.sample_flare_sequences"},
    )
    return atmosphere, beam
