"""NLTE synthesis of chromospheric lines with Lightweaver.

Two problems are set up (Osborne & Milić 2021, ApJ 917, 14 — Lightweaver):

``"mgii"``
    Mg II h & k (279.64 / 280.35 nm vacuum) with partial frequency
    redistribution (angle-averaged PRD, Leenaarts et al. 2012); H, Ca II and
    Mg II active, the 10-level + continuum Mg II model atom of Leenaarts et al.
    (2013) (``"full"``) or the 3-level + continuum h&k atom (``"hk"``). The
    emergent intensity is computed on 2790–2810 Å (vacuum).
``"halpha_ca8542"``
    Hα and Ca II 854.2 nm in complete redistribution with H (6 levels) and
    Ca II (5 levels + continuum) active. Windows of ±2.5 Å around each line
    centre; line centres are taken from the model atoms (vacuum) and also
    given in air in the attributes.

Lightweaver is imported only inside the functions of this module. A solve
never raises on a numerical failure: it comes back with ``converged=False``
and a message, so a batch carries on.

The depth scale of an :class:`~iris_lab.atmosphere.Atmosphere` (height, or
log τ500) is passed to Lightweaver as is; the densities are either taken as
given, or (``electrons="lte"``) n_e is iterated to LTE charge balance, or
(``electrons="nlte"``) charge is conserved during the NLTE iteration; with
``hydrostatic=True`` the model is put into hydrostatic equilibrium by
Lightweaver's equation of state on the τ500 scale. log τ500 is recomputed from
the solved context's background opacity at 500 nm (integrated in height), so
the model can be put onto the 39-point log τ grid of the IRIS² database.

Lightweaver keeps state between the contexts of one process: a Mg II PRD
solve of FAL-C that converges in a fresh process diverged after an Hα /
Ca II 8542 solve in the same process (Lightweaver 0.17.0). Solve one problem
kind per process; :func:`iris_lab.builder.run_isolated` runs each build chunk
in a fresh interpreter.

Example
-------
>>> from iris_lab.atmosphere import Atmosphere
>>> from iris_lab.synthesis.nlte import NLTESynthesizer
>>> synth = NLTESynthesizer("halpha_ca8542")            # doctest: +SKIP
>>> sol = synth.solve(Atmosphere.reference("falc"))     # doctest: +SKIP
>>> sol.converged, sol.spectra["ca8542"].dims           # doctest: +SKIP
(True, ('wavelength',))
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from iris_lab.atmosphere import Atmosphere

Problem = Literal["mgii", "halpha_ca8542"]

#: Mg II synthesis window [Å, vacuum].
MGII_WINDOW_AA = (2790.0, 2810.0)
#: Half width of the Hα and Ca II 8542 synthesis windows [Å].
VISIBLE_HALF_WINDOW_AA = 2.5
#: Line centres in air [Å] (NIST), for reference in attributes.
HALPHA_AIR_AA = 6562.80
CA8542_AIR_AA = 8542.09
#: Continuum points next to Hα and Ca II 8542 [Å, vacuum] (35–38 Å from the lines).
CONTINUUM_AA = (6600.0, 8580.0)
#: 39-point log τ500 grid of the IRIS² database.
IRIS2_LOG_TAU = np.round(np.linspace(-7.0, 0.6, 39), 2)

INTENSITY_UNITS = "erg / (s cm2 sr Angstrom)"
_C_AA = 2.99792458e18  # speed of light [Å / s]


def air_to_vacuum(wavelength_air_aa: np.ndarray | float) -> np.ndarray:
    """Air → vacuum wavelength [Å] (Ciddor 1996 refractive index, as in IAU).

    Example
    -------
    >>> round(float(air_to_vacuum(8542.09)), 2)
    8544.44
    """
    wl = np.asarray(wavelength_air_aa, dtype=float)
    sigma2 = (1e4 / wl) ** 2
    n = 1.0 + 0.0000834254 + 0.02406147 / (130.0 - sigma2) + 0.00015998 / (38.9 - sigma2)
    return wl * n


@dataclasses.dataclass
class NLTESolution:
    """Result of one NLTE solve.

    Attributes
    ----------
    spectra
        Emergent intensity per window (``"mgii"`` or ``"halpha"``,
        ``"ca8542"``, and ``"continuum"`` at :data:`CONTINUUM_AA`),
        ``xarray.DataArray`` with dim ``wavelength`` (vacuum Å) and coordinate
        ``offset`` (Å from line centre) for the visible lines; attrs ``units``,
        ``mu``.
    converged
        True when the statistical-equilibrium iteration met its tolerances.
    iterations, seconds
        Iterations taken and wall time of the solve.
    message
        Why a solve failed ("" when it converged).
    log_tau500
        log10 τ500 on the atmosphere's depth points, integrated from the
        background opacity at 500 nm (top point extrapolated).
    populations
        Converged populations of the active species (for warm starts).
    n_e
        Electron density used / found [cm⁻³] (differs from the input with
        ``electrons="lte"`` or ``"nlte"``).
    """

    spectra: dict[str, Any]
    converged: bool
    iterations: int
    seconds: float
    message: str
    log_tau500: np.ndarray | None
    populations: dict[str, np.ndarray] | None
    n_e: np.ndarray | None
    height: np.ndarray | None = None


def _si_to_cgs_lambda(intensity_si: np.ndarray, wavelength_aa: np.ndarray) -> np.ndarray:
    """W m⁻² Hz⁻¹ sr⁻¹ → erg s⁻¹ cm⁻² Å⁻¹ sr⁻¹."""
    return intensity_si * 1e3 * _C_AA / wavelength_aa**2


class NLTESynthesizer:
    """Lightweaver NLTE synthesis of Mg II h&k or Hα + Ca II 8542.

    Parameters
    ----------
    problem
        ``"mgii"`` or ``"halpha_ca8542"``.
    prd
        Angle-averaged PRD for the PRD lines (Mg II h&k, Lyα/β); ignored
        (CRD) for ``"halpha_ca8542"``.
    n_rays
        Gauss–Legendre rays in μ for the statistical equilibrium.
    mu
        μ of the emergent spectrum (1 = disk centre).
    mgii_atom
        ``"full"`` (10 levels + continuum) or ``"hk"`` (3 + continuum).
    electrons
        ``"given"`` (use the atmosphere's n_e), ``"lte"`` (LTE charge
        balance from T, n_H) or ``"nlte"`` (charge conservation in the NLTE
        iteration).
    hydrostatic
        Recompute the densities in hydrostatic equilibrium on the τ500 scale
        with Lightweaver's equation of state (top pressure from ``p_gas`` if
        set).
    max_iter, j_tol, pops_tol
        Iteration limit and tolerances of the statistical equilibrium (a solve
        that hits ``max_iter`` is flagged not converged).
    ng
        Ng acceleration of the populations (order 3, period 5, delay 15):
        ~3× faster for CRD problems; with PRD it made the FAL-C Mg II
        iteration oscillate (not converged in 400 iterations), so keep it off
        with ``prd=True``.
    step_aa
        Sampling of the output spectra [Å].
    t_max
        If given, the depth points above the last point (from the top) hotter
        than ``t_max`` are left out of the radiative transfer: the optically
        thin corona of flare models, whose MK temperatures make the
        statistical-equilibrium matrices singular, contributes nothing
        measurable to Hα and Ca II 8542. ``log_tau500`` is NaN there.
    retry
        A failed solve is retried from a cold (LTE) start and then with 5 rays
        (Lightweaver's matrices occasionally become singular for steep flare
        transition regions with few rays or a distant warm start); the
        retries are named in ``message``.

    Example
    -------
    >>> synth = NLTESynthesizer("mgii", prd=False, n_rays=3)
    >>> synth.setup_name
    'mgii-crd-full-3rays'
    """

    def __init__(self, problem: Problem = "mgii", *, prd: bool = True, n_rays: int = 5,
                 mu: float = 1.0, mgii_atom: Literal["full", "hk"] = "full",
                 electrons: Literal["given", "lte", "nlte"] = "given",
                 hydrostatic: bool = False, max_iter: int = 400, j_tol: float = 5e-3,
                 pops_tol: float = 1e-3, ng: bool = True, step_aa: float = 0.01,
                 t_max: float | None = None, retry: bool = True) -> None:
        if problem not in ("mgii", "halpha_ca8542"):
            raise ValueError(f"problem must be 'mgii' or 'halpha_ca8542', not {problem!r}")
        if mgii_atom not in ("full", "hk"):
            raise ValueError(f"mgii_atom must be 'full' or 'hk', not {mgii_atom!r}")
        if electrons not in ("given", "lte", "nlte"):
            raise ValueError(f"electrons must be 'given', 'lte' or 'nlte', not {electrons!r}")
        if not 0.0 < mu <= 1.0:
            raise ValueError(f"mu must be in (0, 1], not {mu}")
        if n_rays < 1:
            raise ValueError("n_rays must be >= 1")
        self.problem = problem
        self.prd = bool(prd) and problem == "mgii"
        self.n_rays = int(n_rays)
        self.mu = float(mu)
        self.mgii_atom = mgii_atom
        self.electrons = electrons
        self.hydrostatic = bool(hydrostatic)
        self.max_iter = int(max_iter)
        self.j_tol = float(j_tol)
        self.pops_tol = float(pops_tol)
        self.ng = bool(ng)
        self.step_aa = float(step_aa)
        self.t_max = None if t_max is None else float(t_max)
        self.retry = bool(retry)

    # -- description ------------------------------------------------------
    @property
    def setup_name(self) -> str:
        """Short label of the numerical setup."""
        if self.problem == "mgii":
            return (f"mgii-{'prd' if self.prd else 'crd'}-{self.mgii_atom}-"
                    f"{self.n_rays}rays")
        return f"halpha_ca8542-crd-{self.n_rays}rays"

    @property
    def active_elements(self) -> tuple[str, ...]:
        return ("H", "Ca", "Mg") if self.problem == "mgii" else ("H", "Ca")

    def provenance(self) -> dict[str, str]:
        """Attributes describing the setup (for file provenance)."""
        import lightweaver as lw

        atoms = {"mgii": f"H_6, CaII, {'MgII (10+1)' if self.mgii_atom == 'full' else 'MgII_hk'}",
                 "halpha_ca8542": "H_6, CaII"}[self.problem]
        return {
            "synthesis": "Lightweaver NLTE (Osborne & Milic 2021)",
            "lightweaver_version": str(lw.__version__),
            "setup": self.setup_name,
            "active_atoms": atoms + " (rh_atoms); passive: He_9, C, N, O, Na, Al, Si, S, Fe",
            "prd": "angle-averaged PRD" if self.prd else "CRD",
            "n_rays": str(self.n_rays),
            "mu": str(self.mu),
            "electrons": self.electrons,
            "hydrostatic": str(self.hydrostatic),
            "tolerances": f"JTol={self.j_tol}, popsTol={self.pops_tol}, max_iter={self.max_iter}"
                          f", ng={self.ng}",
            "t_max": "none" if self.t_max is None else
                     f"points above the last one hotter than {self.t_max:g} K left out",
        }

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (to rebuild the synthesizer on a worker)."""
        return {"problem": self.problem, "prd": self.prd, "n_rays": self.n_rays,
                "mu": self.mu, "mgii_atom": self.mgii_atom, "electrons": self.electrons,
                "hydrostatic": self.hydrostatic, "max_iter": self.max_iter,
                "j_tol": self.j_tol, "pops_tol": self.pops_tol, "ng": self.ng,
                "step_aa": self.step_aa, "t_max": self.t_max, "retry": self.retry}

    # -- Lightweaver set-up ---------------------------------------------------
    def _radiative_set(self):
        import lightweaver as lw
        from lightweaver import rh_atoms as ra

        mg = ra.MgII_atom() if self.mgii_atom == "full" else ra.MgII_hk_PRD_atom()
        atoms = [ra.H_6_atom(), ra.CaII_atom(), mg, ra.He_9_atom(), ra.C_atom(),
                 ra.N_atom(), ra.O_atom(), ra.Na_atom(), ra.Al_atom(), ra.Si_atom(),
                 ra.S_atom(), ra.Fe_atom()]
        rad_set = lw.RadiativeSet(atoms)
        rad_set.set_active(*self.active_elements)
        return rad_set

    def _lw_atmosphere(self, atm: Atmosphere):
        import lightweaver as lw

        kwargs: dict[str, Any] = {
            "temperature": atm.temperature.copy(),
            # Lightweaver's 1D vz/vlos is positive upwards (towards the
            # observer, blueshift); ours is positive = redshift.
            "vlos": -atm.v_los * 1e-2,
            "vturb": atm.v_turb * 1e-2,
        }
        if self.hydrostatic:
            if atm.log_tau is None:
                raise ValueError("hydrostatic=True needs log_tau in the atmosphere")
            if atm.p_gas is not None:
                kwargs["Ptop"] = float(atm.p_gas[0]) * 0.1
            return lw.Atmosphere.make_1d(scale=lw.ScaleType.Tau500,
                                         depthScale=10.0 ** atm.log_tau, **kwargs)
        if atm.n_h is None:
            raise ValueError("n_h is needed (or use hydrostatic=True)")
        kwargs["nHTot"] = atm.n_h * 1e6
        kwargs["ne"] = (atm.n_e if atm.n_e is not None else 0.5 * atm.n_h) * 1e6
        if atm.height is not None:
            return lw.Atmosphere.make_1d(scale=lw.ScaleType.Geometric,
                                         depthScale=atm.height * 1e-2, **kwargs)
        return lw.Atmosphere.make_1d(scale=lw.ScaleType.Tau500,
                                     depthScale=10.0 ** atm.log_tau, **kwargs)

    def _windows_nm(self, rad_set) -> dict[str, tuple[np.ndarray, float]]:
        """Output wavelength grids [nm vacuum] and line centres [nm vacuum]."""
        if self.problem == "mgii":
            lo, hi = MGII_WINDOW_AA
            n = int(round((hi - lo) / self.step_aa)) + 1
            return {"mgii": (np.linspace(lo, hi, n) / 10.0, 279.6354)}
        h = rad_set["H"]
        ca = rad_set["Ca"]
        halpha = [line for line in h.lines if (line.j, line.i) == (2, 1)][0].lambda0
        ca8542 = min((line.lambda0 for line in ca.lines), key=lambda x: abs(x - 854.4))
        half = VISIBLE_HALF_WINDOW_AA / 10.0
        n = int(round(2 * VISIBLE_HALF_WINDOW_AA / self.step_aa)) + 1
        return {"halpha": (np.linspace(halpha - half, halpha + half, n), halpha),
                "ca8542": (np.linspace(ca8542 - half, ca8542 + half, n), ca8542)}

    # -- solve ------------------------------------------------------------------
    def solve(self, atmosphere: Atmosphere, *, warm_start: NLTESolution | None = None,
              quiet: bool = True) -> NLTESolution:
        """Solve statistical equilibrium and compute the emergent spectra.

        Parameters
        ----------
        atmosphere
            One atmosphere (no batch dims).
        warm_start
            A converged solution of a similar atmosphere on the same number of
            depth points: its populations start the iteration.

        Returns
        -------
        NLTESolution
            ``converged=False`` with a ``message`` when the solve fails (no
            exception for numerical failures).

        Raises
        ------
        ValueError
            When ``atmosphere`` has batch dimensions or lacks what the chosen
            options need.
        """
        if atmosphere.batch_shape:
            raise ValueError("solve() takes one atmosphere; use synthesize() for a batch")
        start = time.perf_counter()
        attempts = [(warm_start, self.n_rays)]
        if self.retry:
            if warm_start is not None:
                attempts.append((None, self.n_rays))
            if self.n_rays < 5:
                attempts.append((None, 5))
        messages = []
        for number, (start_from, n_rays) in enumerate(attempts):
            sol = self._attempt(atmosphere, start_from, n_rays, start)
            if sol.converged:
                if number:
                    sol.message = f"converged on retry {number} ({'; '.join(messages)})"
                return sol
            messages.append(sol.message)
        sol.message = "; ".join(messages)
        return sol

    def _attempt(self, atmosphere: Atmosphere, warm_start: NLTESolution | None, n_rays: int,
                 start: float) -> NLTESolution:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return self._solve(atmosphere, warm_start, start, n_rays)
        except ValueError as err:
            if "needs" in str(err) or "is needed" in str(err):
                raise
            return self._failed(f"{type(err).__name__}: {err}", start)
        except Exception as err:  # noqa: BLE001 - Lightweaver raises many kinds
            return self._failed(f"{type(err).__name__}: {err}", start)

    def _failed(self, message: str, start: float) -> NLTESolution:
        return NLTESolution(spectra={}, converged=False, iterations=-1,
                            seconds=time.perf_counter() - start, message=message,
                            log_tau500=None, populations=None, n_e=None)

    def _top_index(self, atm: Atmosphere) -> int:
        if self.t_max is None:
            return 0
        hot = np.flatnonzero(atm.temperature > self.t_max)
        top = int(hot[-1]) + 1 if hot.size else 0
        if atm.n_depth - top < 10:
            raise ValueError(f"fewer than 10 depth points are cooler than t_max={self.t_max:g} K")
        return top

    def _solve(self, full: Atmosphere, warm_start: NLTESolution | None,
               start: float, n_rays: int) -> NLTESolution:
        import lightweaver as lw

        top = self._top_index(full)
        atm = full if top == 0 else Atmosphere(
            **{k: v[top:] for k, v in full.fields().items()}, scale=full.scale)
        rad_set = self._radiative_set()
        lw_atmos = self._lw_atmosphere(atm)
        lw_atmos.quadrature(n_rays)
        spect = rad_set.compute_wavelength_grid(extraWavelengths=np.array([500.0]))
        starting = None
        if (warm_start is not None and warm_start.converged and warm_start.populations
                and all(p.shape[-1] == atm.n_depth for p in warm_start.populations.values())):
            starting = {lw.PeriodicTable[k]: v.copy() for k, v in warm_start.populations.items()}
        if self.electrons == "lte":
            eq_pops = rad_set.iterate_lte_ne_eq_pops(lw_atmos, nlteStartingPops=starting)
        else:
            eq_pops = rad_set.compute_eq_pops(lw_atmos, nlteStartingPops=starting)
        ng = lw.NgOptions(Norder=3, Nperiod=5, Ndelay=15) if self.ng else None
        ctx = lw.Context(lw_atmos, spect, eq_pops, ngOptions=ng, Nthreads=1,
                         conserveCharge=self.electrons == "nlte")
        iterations, updates = lw.iterate_ctx_se(
            ctx, prd=self.prd, NmaxIter=self.max_iter, JTol=self.j_tol,
            popsTol=self.pops_tol, quiet=True, returnFinalConvergence=True)
        converged = iterations < self.max_iter - 1 and all(
            u.dJMax < self.j_tol and u.dPopsMax < self.pops_tol for u in updates[:2])
        message = "" if converged else (
            f"not converged after {iterations + 1} iterations "
            f"(dJ={updates[0].dJMax:.2e}, dPops={updates[1].dPopsMax:.2e})")

        spectra = {}
        if self.problem == "halpha_ca8542":
            wl_nm = np.asarray(CONTINUUM_AA) / 10.0
            intensity = np.asarray(ctx.compute_rays(wl_nm, [self.mu])).reshape(wl_nm.size, -1)
            spectra["continuum"] = self._data_array(
                "continuum", wl_nm * 10.0, np.nan,
                _si_to_cgs_lambda(intensity[:, 0], wl_nm * 10.0))
        for name, (wl_nm, centre_nm) in self._windows_nm(rad_set).items():
            intensity = np.asarray(ctx.compute_rays(wl_nm, [self.mu]))
            intensity = intensity.reshape(wl_nm.size, -1)[:, 0]
            wl_aa = wl_nm * 10.0
            spectra[name] = self._data_array(name, wl_aa, centre_nm * 10.0,
                                             _si_to_cgs_lambda(intensity, wl_aa))
        populations = {e: np.array(ctx.eqPops[e]) for e in self.active_elements}
        bad = [n for n, s in spectra.items() if not np.all(np.isfinite(s.values))]
        bad += [e for e, p in populations.items() if not np.all(np.isfinite(p))]
        if bad:
            converged, message = False, f"non-finite values in {', '.join(bad)}"

        log_tau = self._log_tau500(ctx, spect, lw_atmos)
        n_e = np.asarray(lw_atmos.ne) * 1e-6
        height = np.asarray(lw_atmos.height) * 100.0
        if top:
            pad = np.full(top, np.nan)
            log_tau = np.concatenate([pad, log_tau])
            n_e = np.concatenate([full.n_e[:top] if full.n_e is not None else pad, n_e])
            height = np.concatenate([full.height[:top] if full.height is not None else pad,
                                     height])
        return NLTESolution(
            spectra=spectra, converged=bool(converged), iterations=int(iterations) + 1,
            seconds=time.perf_counter() - start, message=message, log_tau500=log_tau,
            populations=populations if converged else None, n_e=n_e, height=height)

    def _data_array(self, name: str, wl_aa: np.ndarray, centre_aa: float, values: np.ndarray):
        import xarray as xr

        coords: dict[str, Any] = {"wavelength": ("wavelength", wl_aa,
                                                 {"units": "Angstrom", "medium": "vacuum"})}
        attrs = {"units": INTENSITY_UNITS, "mu": self.mu, "line_centre_vacuum": centre_aa,
                 "setup": self.setup_name}
        if name == "continuum":
            attrs.pop("line_centre_vacuum")
            attrs["long_name"] = "continuum intensity near Halpha and Ca II 8542"
        elif name != "mgii":
            coords["offset"] = ("wavelength", np.round(wl_aa - centre_aa, 6),
                                {"units": "Angstrom", "long_name": "offset from line centre"})
            attrs["line_centre_air"] = HALPHA_AIR_AA if name == "halpha" else CA8542_AIR_AA
        return xr.DataArray(values, dims=("wavelength",), coords=coords, name=name,
                            attrs=attrs)

    @staticmethod
    def _log_tau500(ctx, spect, lw_atmos) -> np.ndarray:
        index = int(np.argmin(np.abs(np.asarray(spect.wavelength) - 500.0)))
        chi = np.asarray(ctx.background.chi)[index]  # 1/m
        height = np.asarray(lw_atmos.height)
        tau = np.concatenate([[0.0], np.cumsum(0.5 * (chi[1:] + chi[:-1]) * -np.diff(height))])
        log_tau = np.log10(np.maximum(tau[1:], 1e-30))
        return np.concatenate([[2 * log_tau[0] - log_tau[1]], log_tau])

    # -- batches -----------------------------------------------------------------
    def synthesize(self, atmospheres: Atmosphere, *, warm_chain: bool = True,
                   progress: bool = False) -> Any:
        """Solve a batch (flattened) in order, warm-starting along the chain.

        Returns
        -------
        xarray.Dataset
            dims ``entry`` and one wavelength dim per window (``wavelength``
            for Mg II, ``wl_halpha``/``wl_ca8542`` for the visible lines);
            ``converged(entry)``, ``iterations(entry)``, ``message(entry)``,
            ``log_tau500(entry, depth)``; failed entries are NaN and flagged.

        Example
        -------
        >>> ds = NLTESynthesizer("halpha_ca8542").synthesize(atms)  # doctest: +SKIP
        """
        import xarray as xr
        from tqdm.auto import tqdm

        flat = atmospheres.reshape(-1) if atmospheres.batch_shape else \
            atmospheres.broadcast_to((1,))
        n = flat.batch_shape[0]
        solutions: list[NLTESolution] = []
        previous: NLTESolution | None = None
        for i in tqdm(range(n), disable=not progress, desc=self.setup_name):
            sol = self.solve(flat[i], warm_start=previous if warm_chain else None)
            solutions.append(sol)
            if sol.converged:
                previous = sol
        template = next((s for s in solutions if s.converged), None)
        data_vars: dict[str, Any] = {
            "converged": ("entry", np.array([s.converged for s in solutions])),
            "iterations": ("entry", np.array([s.iterations for s in solutions])),
            "seconds": ("entry", np.array([s.seconds for s in solutions]), {"units": "s"}),
            "message": ("entry", np.array([s.message for s in solutions], dtype=object)),
        }
        log_tau = np.full((n, flat.n_depth), np.nan)
        for i, s in enumerate(solutions):
            if s.log_tau500 is not None:
                log_tau[i] = s.log_tau500
        data_vars["log_tau500"] = (("entry", "depth"), log_tau)
        coords: dict[str, Any] = {}
        if template is not None:
            for name, da in template.spectra.items():
                dim = "wavelength" if name == "mgii" else f"wl_{name}"
                values = np.full((n, da.size), np.nan)
                for i, s in enumerate(solutions):
                    if s.converged:
                        values[i] = s.spectra[name].values
                data_vars[name] = (("entry", dim), values, dict(da.attrs))
                coords[dim] = (dim, da["wavelength"].values, {"units": "Angstrom",
                                                            "medium": "vacuum"})
        return xr.Dataset(data_vars, coords=coords, attrs=self.provenance())


def to_log_tau_grid(atmosphere: Atmosphere, log_tau500: np.ndarray,
                    grid: Sequence[float] | np.ndarray = IRIS2_LOG_TAU) -> dict[str, np.ndarray]:
    """Interpolate a (single) model onto a log τ500 grid.

    Temperatures and velocities are interpolated linearly in log τ, densities
    and pressures linearly in their logarithm. Grid points above the top of
    the model take the top value (flagged by ``extrapolated``).

    Returns
    -------
    dict
        ``temperature``, ``v_los``, ``v_turb``, ``n_e``, ``p_gas``, ``rho``
        (those set), each on ``grid``, plus ``extrapolated`` (bool per point).

    Example
    -------
    >>> falc = Atmosphere.reference("falc")
    >>> m = to_log_tau_grid(falc, falc.log_tau)
    >>> m["temperature"].shape
    (39,)
    """
    grid = np.asarray(grid, dtype=float)
    x = np.asarray(log_tau500, dtype=float)
    if x.shape != (atmosphere.n_depth,) or not np.all(np.isfinite(x)):
        raise ValueError("log_tau500 must be finite with one value per depth point")
    order = np.argsort(x)
    x = x[order]
    keep = np.concatenate([[True], np.diff(x) > 0])
    out: dict[str, np.ndarray] = {}
    for name in ("temperature", "v_los", "v_turb", "n_e", "p_gas", "rho"):
        value = getattr(atmosphere, name)
        if value is None:
            continue
        y = np.asarray(value, dtype=float)[order][keep]
        if name in ("n_e", "p_gas", "rho"):
            out[name] = 10.0 ** np.interp(grid, x[keep], np.log10(np.maximum(y, 1e-300)))
        else:
            out[name] = np.interp(grid, x[keep], y)
    out["extrapolated"] = (grid < x[keep][0]) | (grid > x[keep][-1])
    return out
