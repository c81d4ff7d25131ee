"""Batched, differentiable LTE synthesis of polarized spectral lines in torch.

:class:`LTESynthesizer` turns stratified atmospheres ``(..., depth)`` into the
emergent Stokes vector ``(..., 4, wavelength)`` of a list of blended lines:

1. densities: given (``n_e``, ``n_h``), or from hydrostatic equilibrium on the
   log τ500 scale (:func:`iris_lab.eos.hydrostatic_equilibrium`);
2. continuum: H⁻, H, Thomson and Rayleigh opacity (:mod:`iris_lab.opacity`),
   scattering counted as absorption (LTE source function ``S = B``);
3. lines: LTE (Saha–Boltzmann) lower-level populations with stimulated
   emission, Doppler width from temperature and microturbulence, damping
   ``Γ = Γ_rad + Γ_Stark + Γ_vdW`` from ``LineList.damping`` (else
   Kurucz-style ``log Γ`` at 10⁴ K scaled as T^(1/6) n_e and T^0.3 n_HI, or
   Anstee–Barklem–O'Mara σ/α), Voigt and
   Faraday–Voigt profiles (:mod:`iris_lab.synthesis.profiles`) per Zeeman
   component, the polarized propagation matrix (Landi Degl'Innocenti &
   Landolfi 2004, eqs. 9.32);
4. the DELO-Bézier formal solver (:mod:`iris_lab.synthesis.formal`) at any μ.

Spectra without gradients on the CPU (Stokes I and the polarized IQUV) run
compiled (numba) kernels for the line opacities (propagation matrix) and the
formal solvers (:mod:`iris_lab.synthesis.fused`, same arithmetic); everything
else, and every derivative, is torch.

Everything is float64 torch with no data-dependent control flow inside the
synthesis, so ``torch.func.jacfwd`` / ``vmap`` give response functions to the
atmosphere and to per-line ``log_gf_offset`` and ``dlambda``
(:meth:`LTESynthesizer.response_functions` batches ``torch.func.jvp``).

Intensities are absolute, erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹ (divide by
:meth:`LTESynthesizer.continuum_intensity` of FAL-C to normalise like
Hinode/SP data to the quiet-Sun continuum).

Example
-------
>>> import torch
>>> from iris_lab.atomic import LineList
>>> from iris_lab.synthesis.lte import LTESynthesizer
>>> from iris_lab.atmosphere import Atmosphere
>>> lines = LineList.shipped("fe6301_6302")
>>> synth = LTESynthesizer(lines, torch.linspace(6300.8, 6303.2, 121))
>>> spectra = synth.synthesize(Atmosphere.reference("falc"))
>>> spectra.dims
('stokes', 'wavelength')
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from iris_lab.synthesis.formal import bezier_intensity, delo_bezier
from iris_lab.synthesis.profiles import voigt_faraday

__all__ = ["LTESynthesizer", "continuum_intensity", "planck_lambda"]

C_LIGHT = 2.99792458e10
H_PLANCK = 6.62607015e-27
K_BOLTZMANN = 1.380649e-16
AMU = 1.66053906660e-24
EV = 1.602176634e-12
M_ELECTRON = 9.1093837015e-28
E_CHARGE = 4.80320471e-10
#: π e² / (m_e c) [cm² s⁻¹]
CLASSICAL_CROSS_SECTION = math.pi * E_CHARGE**2 / (M_ELECTRON * C_LIGHT)
#: Zeeman splitting Δλ_B = LARMOR_AA λ0² B with λ0 in Å, B in G → Å
LARMOR_AA = E_CHARGE / (4.0 * math.pi * M_ELECTRON * C_LIGHT**2) * 1e-8
A0_CM = 5.29177210903e-9
M_HYDROGEN_AMU = 1.00784

STOKES = ("I", "Q", "U", "V")
INTENSITY_UNITS = "erg / (s cm2 sr Angstrom)"
_FIELDS_REQUIRED = ("temperature",)
_FIELDS_OPTIONAL = ("v_los", "v_turb", "b_field", "inclination", "azimuth")


def planck_lambda(wavelength_aa: Tensor, temperature: Tensor) -> Tensor:
    """Planck function B_λ [erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹] (broadcast).

    Example
    -------
    >>> import torch
    >>> b = planck_lambda(torch.tensor(5000.0, dtype=torch.float64),
    ...                   torch.tensor(5800.0, dtype=torch.float64))
    >>> 2.6e6 < float(b) < 2.8e6
    True
    """
    lam = wavelength_aa * 1e-8
    x = H_PLANCK * C_LIGHT / (lam * K_BOLTZMANN * temperature)
    return 2.0 * H_PLANCK * C_LIGHT**2 / lam**5 / torch.expm1(x) * 1e-8


def _is_transformed(x: Tensor) -> bool:
    """True inside torch.func transforms (where value checks cannot run)."""
    try:
        bool(torch.isfinite(x.reshape(-1)[:1]).all())
    except RuntimeError:
        return True
    return False


def _default_populations(
    species: Sequence[tuple[str, int]], temperature: Tensor, n_e: Tensor, n_h: Tensor,
    abundances: Mapping[str, float] | None,
) -> Tensor:
    """N(stage)/U(stage) [cm⁻³] per species, shape (..., n_species, depth).

    Ionisation fractions and partition functions of all species come from
    one interpolation each (:func:`iris_lab.eos.ionisation_fractions`,
    :func:`iris_lab.eos.partition_functions`).
    """
    from iris_lab import eos

    fractions = eos.ionisation_fractions([e for e, _ in species], temperature, n_e)
    stage = torch.tensor([ion - 1 for _, ion in species], device=fractions.device)
    fraction = torch.gather(fractions, -1, stage.expand(*fractions.shape[:-1])[..., None])
    partition = eos.partition_functions(species, temperature)                 # (..., D, S)
    eps = torch.tensor([10.0 ** (eos.abundances_value(e, abundances) - 12.0) for e, _ in species],
                       dtype=partition.dtype, device=partition.device)
    return (eps * n_h.unsqueeze(-1) * fraction[..., 0] / partition).transpose(-1, -2)


def _default_continuum(
    wavelength_aa: Tensor, temperature: Tensor, n_e: Tensor, n_h_neutral: Tensor,
    n_protons: Tensor | None,
) -> Tensor:
    """Continuum extinction κ [cm⁻¹], shape (..., depth, wavelength)."""
    from iris_lab import opacity

    return opacity.continuum_opacity(wavelength_aa, temperature, n_e, n_h_neutral,
                                     n_protons=n_protons)


def continuum_intensity(
    wavelengths_aa: Tensor | np.ndarray | Sequence[float],
    fields: Mapping[str, Any] | None = None,
    *,
    mu: float = 1.0,
    continuum: Callable[..., Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Emergent continuum intensity [erg s⁻¹ cm⁻² sr⁻¹ Å⁻¹], shape (..., wavelength).

    Same physics as :class:`LTESynthesizer` without lines; ``fields`` as in
    :meth:`LTESynthesizer.stokes`, FAL-C (its heights and densities) when
    omitted.

    Example
    -------
    >>> import torch
    >>> ic = continuum_intensity(torch.tensor([5000.0], dtype=torch.float64))
    >>> 4.0e6 < float(ic[0]) < 4.4e6
    True
    """
    if fields is None:
        from iris_lab.atmosphere import Atmosphere

        falc = Atmosphere.reference("falc")
        fields = {n: falc.fields()[n] for n in ("height", "temperature", "n_e", "n_h")}
    engine = LTESynthesizer.__new__(LTESynthesizer)
    engine.device = torch.device(device)
    engine.dtype = torch.float64
    engine.wavelengths = torch.as_tensor(np.asarray(wavelengths_aa, dtype=np.float64)
                                         if not isinstance(wavelengths_aa, Tensor)
                                         else wavelengths_aa.detach().cpu().double()
                                         ).to(engine.device)
    if engine.wavelengths.ndim != 1:
        raise ValueError("wavelengths_aa must be 1-D [Å]")
    if not 0.0 < float(mu) <= 1.0:
        raise ValueError(f"mu must lie in (0, 1], not {mu}")
    engine.mu = float(mu)
    engine._continuum = continuum
    engine._continuum_nodes = None
    engine.abundances = None
    p = engine.propagation(fields, lines=False)
    return bezier_intensity(p["tau"], p["planck"])


#: Continuum opacity nodes at most this far apart [Å]; between them ln κ is
#: linear in λ (error < 1e-6 of κ above 2500 Å: the second derivative of
#: ln κ is ~ 1/λ², tested in tests/test_lte.py).
CONTINUUM_NODE_SPACING_AA = 2.0
#: Bound-free edges (H I Lyman … Brackett, H⁻ threshold) [Å]: a grid that
#: spans one gets the continuum at every wavelength.
_CONTINUUM_EDGES_AA = (911.8, 3646.0, 8204.0, 14584.0, 16419.0)


def _continuum_nodes(grid: np.ndarray, device: torch.device):
    """Nodes and interpolation indices/weights for the continuum opacity, or
    ``None`` when the grid is not denser than the nodes or spans an edge."""
    low, high = float(grid.min()), float(grid.max())
    n_nodes = int(math.ceil((high - low) / CONTINUUM_NODE_SPACING_AA)) + 1
    if grid.size <= 2 * n_nodes or any(low <= e <= high for e in _CONTINUUM_EDGES_AA):
        return None
    nodes = np.linspace(low, high, n_nodes)
    hi = np.clip(np.searchsorted(nodes, grid, side="right"), 1, n_nodes - 1)
    lo = hi - 1
    weight = (grid - nodes[lo]) / (nodes[hi] - nodes[lo])
    as_t = functools.partial(torch.as_tensor, device=device)
    return (as_t(nodes, dtype=torch.float64), as_t(lo), as_t(hi),
            as_t(weight, dtype=torch.float64))


def _place(values: Tensor, j0: int, j1: int, n: int) -> Tensor:
    """``values`` (..., j1 − j0, D) zero-padded to (..., n, D) along wavelength."""
    if j0 == 0 and j1 == n:
        return values
    return torch.nn.functional.pad(values, (0, 0, j0, n - j1))


class LTESynthesizer:
    """Polarized LTE synthesis of a line list on a wavelength grid.

    Parameters
    ----------
    line_list
        :class:`iris_lab.atomic.LineList` (or any object with its per-line
        arrays: ``element, ion, wavelength_air, wavelength_vacuum, log_gf,
        e_low, j_low, j_up, lande_low, lande_up, log_gamma_rad,
        log_gamma_stark, log_gamma_vdw, abo_sigma, abo_alpha, mass``).
    wavelengths_aa
        Wavelength grid [Å], 1-D, in the medium ``medium``.
    mu
        Cosine of the heliocentric angle, 0 < μ ≤ 1.
    device
        Torch device of every tensor made here.
    medium
        ``"air"`` (default, visible lines) or ``"vacuum"``: which rest
        wavelengths of the line list the grid refers to.
    populations
        Optional callable ``(species, temperature, n_e, n_h) -> N/U``
        (…, n_species, depth) replacing the default Saha–Boltzmann
        populations of :mod:`iris_lab.eos` (e.g. to use another code's
        partition functions in a comparison).
    continuum
        Optional callable ``(wavelength_aa, temperature, n_e, n_h_neutral,
        n_protons) -> κ`` (…, depth, wavelength) [cm⁻¹] replacing
        :func:`iris_lab.opacity.continuum_opacity`.
    abundances
        Overrides of log ε per element (Asplund et al. 2009 otherwise).
    n_terms
        Terms of the Faddeeva expansion (24: < 3e-5 relative error).
    polarized
        ``False`` for field-free Stokes I only (one unsplit profile per line,
        scalar formal solver; Q = U = V = 0 returned), several times faster.
    line_cutoff
        Evaluate each line's profile only over the wavelengths where its
        opacity can exceed ``line_cutoff`` × the continuum opacity at some
        depth of some atmosphere of the call: the window is estimated per
        call from the line-centre opacity, the Doppler core and the Lorentz
        wings (``κ_l ≈ κ_0 a / (√π v²)``), plus Doppler and Zeeman shifts.
        ``None`` (the default) evaluates every line on the whole grid. With
        ``1e-4`` the 4015–4017 Å spectra change by < 1e-4 of the continuum
        (tested) at about half the cost; the window moves with the
        atmosphere, so use ``None`` for finite-difference derivatives.
    fused
        Use the compiled (numba) kernels of :mod:`iris_lab.synthesis.fused`
        for Stokes I and IQUV where no derivative is wanted (CPU float64, no
        ``requires_grad``, outside ``torch.func`` transforms, no forward-AD
        tangent); same result as torch to rounding.
        Ignored without numba; ``False`` always runs torch.

    Raises
    ------
    ValueError
        If the grid is not 1-D, finite and increasing, holds none of the
        lines, μ is outside (0, 1], or a line has non-finite data.

    Example
    -------
    >>> import torch
    >>> from iris_lab.atomic import LineList
    >>> synth = LTESynthesizer(LineList.shipped("fe6301_6302"),
    ...                        torch.linspace(6301.0, 6303.0, 50))
    >>> synth.n_lines
    2
    """

    def __init__(
        self,
        line_list: Any,
        wavelengths_aa: Tensor | np.ndarray | Sequence[float],
        mu: float = 1.0,
        device: str | torch.device = "cpu",
        *,
        medium: str = "air",
        populations: Callable[..., Tensor] | None = None,
        continuum: Callable[..., Tensor] | None = None,
        abundances: Mapping[str, float] | None = None,
        n_terms: int = 24,
        polarized: bool = True,
        line_cutoff: float | None = None,
        fused: bool = True,
    ) -> None:
        self.device = torch.device(device)
        self.fused = bool(fused)
        self.polarized = bool(polarized)
        self.dtype = torch.float64
        grid = torch.as_tensor(np.asarray(wavelengths_aa, dtype=np.float64)
                               if not isinstance(wavelengths_aa, Tensor)
                               else wavelengths_aa.detach().cpu().to(torch.float64))
        if grid.ndim != 1 or grid.numel() < 1:
            raise ValueError("wavelengths_aa must be a non-empty 1-D grid [Å]")
        if not torch.all(torch.isfinite(grid)) or torch.any(grid <= 0):
            raise ValueError("wavelengths_aa must be finite and positive [Å]")
        if grid.numel() > 1 and torch.any(torch.diff(grid) <= 0):
            raise ValueError("wavelengths_aa must be strictly increasing")
        if not 0.0 < float(mu) <= 1.0:
            raise ValueError(f"mu must lie in (0, 1], not {mu}")
        if medium not in ("air", "vacuum"):
            raise ValueError(f"medium must be 'air' or 'vacuum', not {medium!r}")
        self.mu = float(mu)
        self.medium = medium
        self.n_terms = int(n_terms)
        self.abundances = dict(abundances) if abundances else None
        self._populations = populations
        self._continuum = continuum
        self.line_list = line_list
        self.wavelengths = grid.to(self.device)

        def array(name: str, default: float | None = None) -> np.ndarray:
            value = getattr(line_list, name, None)
            if value is None:
                if default is None:
                    raise ValueError(f"the line list has no {name!r}")
                return np.full(len(line_list), default)
            return np.asarray(value, dtype=np.float64)

        n_lines = len(line_list)
        if n_lines == 0:
            raise ValueError("the line list is empty")
        lam0 = array("wavelength_air" if medium == "air" else "wavelength_vacuum")
        numeric = {
            "wavelength": lam0, "log_gf": array("log_gf"), "e_low": array("e_low"),
            "mass": array("mass"), "log_gamma_rad": array("log_gamma_rad", 0.0),
            "log_gamma_stark": array("log_gamma_stark", -99.0),
            "log_gamma_vdw": array("log_gamma_vdw", -99.0),
            "abo_sigma": np.nan_to_num(array("abo_sigma", 0.0), nan=0.0),
            "abo_alpha": np.nan_to_num(array("abo_alpha", 0.0), nan=0.0),
        }
        for name, values in numeric.items():
            bad = np.flatnonzero(~np.isfinite(values))
            if bad.size:
                raise ValueError(f"line list: {name} is not finite for line(s) {bad.tolist()}")
        if np.any(lam0 <= 0) or np.any(numeric["mass"] <= 0):
            raise ValueError("line list: wavelengths and masses must be positive")
        low, high = float(grid.min()), float(grid.max())
        margin = 1.0
        inside = (lam0 >= low - margin) & (lam0 <= high + margin)
        if not np.any(inside):
            raise ValueError(
                f"the wavelength grid [{low:.3f}, {high:.3f}] Å ({medium}) contains none of "
                f"the {n_lines} lines ({lam0.min():.3f}-{lam0.max():.3f} Å)")

        elements = [str(e) for e in np.asarray(line_list.element).tolist()]
        ions = [int(i) for i in np.asarray(line_list.ion).tolist()]
        self.species = sorted(set(zip(elements, ions, strict=True)))
        self._species_index = torch.tensor(
            [self.species.index(s) for s in zip(elements, ions, strict=True)],
            device=self.device)

        self._components = self._zeeman(line_list)
        #: largest |Zeeman shift| of each line's components [Δλ_B], for the windows
        self._widest_shift = torch.tensor(
            [max((abs(c[1]) for c in comps), default=0.0) for comps in self._components],
            dtype=torch.float64, device=self.device)
        self._continuum_nodes = _continuum_nodes(grid.numpy(), self.device)
        if line_cutoff is not None and not 0.0 < float(line_cutoff) < 1.0:
            raise ValueError(f"line_cutoff must lie in (0, 1), not {line_cutoff}")
        self.line_cutoff = None if line_cutoff is None else float(line_cutoff)
        self._grid_cpu = grid.numpy().copy()
        t = self._tensor
        self._lam0 = t(lam0)
        self._log_gf = t(numeric["log_gf"])
        self._e_low = t(numeric["e_low"])
        self._mass = t(numeric["mass"])
        self._gamma_rad = t(10.0 ** numeric["log_gamma_rad"])
        self._gamma_stark = t(10.0 ** numeric["log_gamma_stark"])
        self._gamma_vdw = t(10.0 ** numeric["log_gamma_vdw"])
        self._abo_sigma = t(numeric["abo_sigma"])
        self._abo_alpha = t(numeric["abo_alpha"])
        self._use_abo = t((numeric["abo_sigma"] > 0).astype(float))

    # ------------------------------------------------------------------
    def _tensor(self, value: Any) -> Tensor:
        return torch.as_tensor(np.asarray(value), dtype=self.dtype, device=self.device)

    @staticmethod
    def _zeeman(line_list: Any) -> list[list[tuple[int, float, float]]]:
        """Per line, its Zeeman components ``(group, shift [Δλ_B], strength)``.

        Groups 0, 1, 2 are σ_b, π, σ_r; the pattern is the line list's own
        (:meth:`iris_lab.atomic.LineList.zeeman_pattern`) or, for plain
        objects with per-line arrays, :func:`iris_lab.atomic.zeeman_pattern`
        (lines without Landé factors are unsplit).
        """
        from iris_lab.atomic import zeeman_pattern

        method = getattr(line_list, "zeeman_pattern", None)
        pattern = method() if callable(method) else zeeman_pattern(
            line_list.j_low, line_list.j_up, line_list.lande_low, line_list.lande_up)
        groups = ("sigma_b", "pi", "sigma_r")
        n_lines = np.asarray(pattern["pi"]["shift"]).shape[0]
        out: list[list[tuple[int, float, float]]] = [[] for _ in range(n_lines)]
        for p, name in enumerate(groups):
            g = pattern[name]
            shift, strength = np.asarray(g["shift"], float), np.asarray(g["strength"], float)
            mask = np.asarray(g["mask"], bool) & (strength > 0)
            if not np.all(np.isfinite(shift[mask])):
                bad = sorted({int(k) for k in np.nonzero(~np.isfinite(shift) & mask)[0]})
                raise ValueError(f"line list: Zeeman shifts are not finite for line(s) {bad}")
            for k, c in zip(*np.nonzero(mask), strict=True):
                out[k].append((p, float(shift[k, c]), float(strength[k, c])))
        return out

    @property
    def n_lines(self) -> int:
        """Number of lines."""
        return int(self._lam0.shape[0])

    @property
    def n_wavelength(self) -> int:
        """Number of wavelengths."""
        return int(self.wavelengths.shape[0])

    # ------------------------------------------------------------------
    def _prepare(self, fields: Mapping[str, Any]) -> dict[str, Tensor]:
        if "temperature" not in fields:
            raise ValueError("fields needs 'temperature' (..., depth) [K]")
        if "log_tau" not in fields and "height" not in fields:
            raise ValueError("fields needs a depth scale: 'log_tau' or 'height'")
        out: dict[str, Tensor] = {}
        for name, value in fields.items():
            if value is None:
                continue
            out[name] = torch.as_tensor(value, dtype=self.dtype, device=self.device) \
                if not isinstance(value, Tensor) else value.to(self.dtype).to(self.device)
        shape = torch.broadcast_shapes(*(v.shape for v in out.values()))
        if len(shape) == 0:
            raise ValueError("fields must have a depth axis (shape (..., depth))")
        if shape[-1] < 3:
            raise ValueError(f"at least 3 depth points are needed, got {shape[-1]}")
        for name in _FIELDS_OPTIONAL:
            out.setdefault(name, torch.zeros((), dtype=self.dtype, device=self.device))
        out = {n: torch.broadcast_to(v, shape) for n, v in out.items()}
        if not _is_transformed(out["temperature"]):
            for name, value in out.items():
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"fields[{name!r}] contains NaN or infinite values")
            if bool((out["temperature"] <= 0).any()):
                raise ValueError("fields['temperature'] must be > 0 K everywhere")
            for name in ("n_e", "n_h", "v_turb", "b_field"):
                if name in out and bool((out[name] < 0).any()):
                    raise ValueError(f"fields[{name!r}] must be non-negative")
            scale = "height" if self._geometric(out) else "log_tau"
            step = torch.diff(out[scale], dim=-1)
            if not bool((step > 0).all() if scale == "log_tau" else (step < 0).all()):
                order = "increasing" if scale == "log_tau" else "decreasing"
                raise ValueError(f"fields[{scale!r}] must be strictly {order} along depth")
        return out

    def _fused(self, *tensors: Tensor) -> bool:
        """Whether the compiled kernels (:mod:`iris_lab.synthesis.fused`) replace
        torch here: enabled, and no derivative wanted through ``tensors``."""
        if not self.fused:
            return False
        from iris_lab.synthesis import fused

        return fused.usable(*tensors)

    @staticmethod
    def _geometric(fields: Mapping[str, Tensor]) -> bool:
        return "height" in fields and "n_e" in fields and "n_h" in fields

    def _state(self, f: dict[str, Tensor]) -> dict[str, Tensor]:
        """Densities: given ones, else hydrostatic equilibrium on log τ500."""
        from iris_lab import eos

        t = f["temperature"]
        if "n_e" in f and "n_h" in f:
            n_e, n_h = f["n_e"], f["n_h"]
            h_fractions = eos.ionisation_fractions("H", t, n_e)
            state = {"n_e": n_e, "n_h": n_h, "n_h_neutral": n_h * h_fractions[..., 0],
                     "n_protons": n_h * h_fractions[..., 1]}
            if not self._geometric(f):
                from iris_lab import opacity

                state["kappa500"] = opacity.kappa_500(t, n_e, state["n_h_neutral"],
                                                      n_protons=state["n_protons"])
            return state
        names = ("n_e", "n_h", "n_h_neutral", "n_protons", "kappa500")
        columns = (f["log_tau"], t, f["v_turb"])
        if t.dim() > 1 and self._fused(*columns):
            # no derivative wanted: atmospheres that share (log τ, T, v_turb),
            # e.g. the finite-difference Jacobian columns of other parameters,
            # share one hydrostatic equilibrium (each row's is independent)
            depth = t.shape[-1]
            rows = torch.cat([x.reshape(-1, depth) for x in columns], dim=-1)
            unique, inverse = torch.unique(rows, dim=0, return_inverse=True)
            if unique.shape[0] < rows.shape[0]:
                he = eos.hydrostatic_equilibrium(
                    unique[:, :depth], unique[:, depth:2 * depth], unique[:, 2 * depth:],
                    abundances=self.abundances)
                return {k: torch.broadcast_to(he[k], unique.shape[:1] + (depth,))[inverse]
                        .reshape(t.shape) for k in names}
        he = eos.hydrostatic_equilibrium(f["log_tau"], t, f["v_turb"],
                                          abundances=self.abundances)
        return {k: torch.broadcast_to(he[k], t.shape) for k in names}

    def _continuum_kappa(self, f: dict[str, Tensor], state: dict[str, Tensor]) -> Tensor:
        """Continuum κ (..., λ, D): the default opacities at a few wavelengths,
        interpolated linearly in (λ, ln κ); a given ``continuum`` at every λ."""
        args = (f["temperature"], state["n_e"], state["n_h_neutral"], state.get("n_protons"))
        if self._continuum is not None:
            return self._continuum(self.wavelengths, *args).transpose(-1, -2)
        if self._continuum_nodes is None:
            return _default_continuum(self.wavelengths, *args).transpose(-1, -2)
        nodes, lo, hi, weight = self._continuum_nodes
        log_kappa = torch.log(_default_continuum(nodes, *args))   # (..., D, K)
        kappa = torch.exp(log_kappa[..., lo] * (1.0 - weight) + log_kappa[..., hi] * weight)
        return kappa.transpose(-1, -2)

    def _damping(self, t: Tensor, n_e: Tensor, n_h_neutral: Tensor, lam0_cm: Tensor,
                 doppler_cm: Tensor) -> Tensor:
        widths = getattr(self.line_list, "damping", None)
        if callable(widths):
            # the line list's own damping recipe (iris_lab.atomic.LineList.damping)
            gamma = widths(t, n_e, n_h_neutral)["total"].transpose(-1, -2)
            return gamma * lam0_cm**2 / (4.0 * math.pi * C_LIGHT * doppler_cm)
        t_l = t.unsqueeze(-2)
        gamma = (self._gamma_rad[:, None]
                 + self._gamma_stark[:, None] * n_e.unsqueeze(-2) * (t_l / 1e4) ** (1.0 / 6.0)
                 + self._gamma_vdw[:, None] * n_h_neutral.unsqueeze(-2) * (t_l / 1e4) ** 0.3)
        # Anstee, Barklem & O'Mara: Γ = (4/π)^{α/2} Γ((4-α)/2) v̄ σ(v̄) n_H,
        # σ(v) = σ0 a0² (v / 1e6 cm/s)^-α with v̄ the mean relative speed
        alpha = self._abo_alpha[:, None]
        mu_red = 1.0 / (1.0 / M_HYDROGEN_AMU + 1.0 / self._mass[:, None]) * AMU
        vbar = torch.sqrt(8.0 * K_BOLTZMANN * t_l / (math.pi * mu_red))
        sigma = self._abo_sigma[:, None] * A0_CM**2 * (vbar / 1e6) ** (-alpha)
        gamma_fn = torch.exp(torch.lgamma((4.0 - alpha) / 2.0))
        abo = ((4.0 / math.pi) ** (alpha / 2.0) * gamma_fn * vbar * sigma
               * n_h_neutral.unsqueeze(-2))
        vdw_kurucz = self._gamma_vdw[:, None] * n_h_neutral.unsqueeze(-2) * (t_l / 1e4) ** 0.3
        gamma = gamma + self._use_abo[:, None] * (abo - vdw_kurucz)
        return gamma * lam0_cm**2 / (4.0 * math.pi * C_LIGHT * doppler_cm)

    def propagation(
        self,
        fields: Mapping[str, Any],
        *,
        log_gf_offset: Tensor | None = None,
        dlambda: Tensor | None = None,
        lines: bool = True,
    ) -> dict[str, Tensor]:
        """Propagation-matrix elements and the optical-depth scale.

        Returns a dict with ``eta_i`` (..., wavelength, depth) [cm⁻¹ or per
        unit τ500], the six ratios ``eta_q, eta_u, eta_v, rho_q, rho_u, rho_v``
        to ``eta_i``, ``tau`` along the ray and ``planck``.
        """
        f = self._prepare(fields)
        state = self._state(f)
        t = f["temperature"]
        lam = self.wavelengths[:, None]                          # (λ, 1)
        eta_c = self._continuum_kappa(f, state)                  # (..., λ, D)
        zero = torch.zeros_like(eta_c)
        eta = {"i": eta_c, "q": zero, "u": zero, "v": zero}
        rho = {"q": zero, "u": zero, "v": zero}
        if lines:
            eta, rho = self._line_terms(f, state, log_gf_offset, dlambda, eta_c)
        planck = planck_lambda(lam, t.unsqueeze(-2))            # (..., λ, D)
        if self._geometric(f):
            z = f["height"].unsqueeze(-2)
            dz = z[..., :-1] - z[..., 1:]
            mid = 0.5 * (eta["i"][..., 1:] + eta["i"][..., :-1]) * dz
            tau = torch.cat([torch.zeros_like(mid[..., :1]), torch.cumsum(mid, -1)], -1)
        else:
            log_tau = f["log_tau"].unsqueeze(-2)
            ratio = eta["i"] / state["kappa500"].unsqueeze(-2)
            integrand = ratio * 10.0 ** log_tau * math.log(10.0)
            mid = 0.5 * (integrand[..., 1:] + integrand[..., :-1]) * torch.diff(log_tau, dim=-1)
            tau = torch.cat([ratio[..., :1] * 10.0 ** log_tau[..., :1],
                             ratio[..., :1] * 10.0 ** log_tau[..., :1] + torch.cumsum(mid, -1)],
                            -1)
        tau = tau / self.mu
        inv = 1.0 / eta["i"]
        return {
            "eta_i": eta["i"], "eta_q": eta["q"] * inv, "eta_u": eta["u"] * inv,
            "eta_v": eta["v"] * inv, "rho_q": rho["q"] * inv, "rho_u": rho["u"] * inv,
            "rho_v": rho["v"] * inv, "tau": tau, "planck": planck,
        }

    def _line_windows(self, strength: Tensor, damping: Tensor, doppler: Tensor,
                      centre: Tensor, larmor: Tensor | None, eta_c: Tensor
                      ) -> list[tuple[int, int]]:
        """Per line, the grid slice ``[j0, j1)`` where its profile is evaluated."""
        n = self.n_wavelength
        if self.line_cutoff is None:
            return [(0, n)] * self.n_lines
        with torch.no_grad():
            kappa_c = eta_c.detach().amin(-2).unsqueeze(-2)                  # (..., 1, D)
            ratio = strength.detach() / (self.line_cutoff * kappa_c)        # (..., L, D)
            lorentz = torch.sqrt(ratio * damping.detach() / math.sqrt(math.pi))
            gauss = torch.sqrt(torch.log(ratio.clamp(min=1.0)))
            half = doppler.detach() * torch.maximum(lorentz, gauss)
            if larmor is not None:
                half = half + (larmor.detach().abs() * self._widest_shift[:, None]
                               ) * doppler.detach()
            lo = (centre.detach() - half).reshape(-1, *half.shape[-2:]).amin(0).amin(-1)
            hi = (centre.detach() + half).reshape(-1, *half.shape[-2:]).amax(0).amax(-1)
        j0 = np.searchsorted(self._grid_cpu, lo.cpu().numpy(), side="left")
        j1 = np.searchsorted(self._grid_cpu, hi.cpu().numpy(), side="right")
        return [(int(a), int(b)) for a, b in zip(j0, j1, strict=True)]

    def _line_terms(self, f, state, log_gf_offset, dlambda, eta_c):
        t = f["temperature"]
        batch = t.shape[:-1]
        lam0 = self._lam0.expand(*batch, self.n_lines)
        if dlambda is not None:
            lam0 = lam0 + torch.as_tensor(dlambda, dtype=self.dtype, device=self.device)
        log_gf = self._log_gf.expand(*batch, self.n_lines)
        if log_gf_offset is not None:
            log_gf = log_gf + torch.as_tensor(log_gf_offset, dtype=self.dtype,
                                              device=self.device)
        lam0 = lam0.unsqueeze(-1)                                # (..., L, 1)
        t_l = t.unsqueeze(-2)                                    # (..., 1, D)
        v_thermal2 = 2.0 * K_BOLTZMANN * t_l / (self._mass[:, None] * AMU)
        doppler = lam0 / C_LIGHT * torch.sqrt(v_thermal2 + f["v_turb"].unsqueeze(-2) ** 2)
        lam0_cm, doppler_cm = lam0 * 1e-8, doppler * 1e-8
        damping = self._damping(t, state["n_e"], state["n_h_neutral"], lam0_cm, doppler_cm)

        populations = (self._populations or (
            lambda s, tt, ne, nh: _default_populations(s, tt, ne, nh, self.abundances)))(
            self.species, t, state["n_e"], state["n_h"])
        n_over_u = populations[..., self._species_index, :]      # (..., L, D)
        stimulated = -torch.expm1(-H_PLANCK * C_LIGHT / (lam0_cm * K_BOLTZMANN * t_l))
        delta_nu = C_LIGHT * doppler_cm / lam0_cm**2
        strength = (CLASSICAL_CROSS_SECTION * n_over_u * 10.0 ** log_gf.unsqueeze(-1)
                    * torch.exp(-self._e_low[:, None] * EV / (K_BOLTZMANN * t_l))
                    * stimulated / (delta_nu * math.sqrt(math.pi)))   # (..., L, D)
        centre = lam0 * (1.0 + f["v_los"].unsqueeze(-2) / C_LIGHT)   # (..., L, D)
        inv_doppler = 1.0 / doppler
        larmor = None
        if self.polarized:
            larmor = LARMOR_AA * lam0**2 * f["b_field"].unsqueeze(-2) * inv_doppler  # (..., L, D)
        windows = self._line_windows(strength, damping, doppler, centre, larmor, eta_c)

        # One line at a time (a loop over the few lines, not over pixels):
        # the arrays (..., λ, D) stay cache-sized, which is several times
        # faster on CPU than one (..., L, λ, D) array, and each line is
        # evaluated only inside its window.
        n_lambda = self.n_wavelength
        if not self.polarized:
            if self._fused(eta_c, centre, inv_doppler, damping, strength):
                from iris_lab.synthesis import fused

                e_i = fused.add_lines(eta_c, self.wavelengths, centre, inv_doppler, damping,
                                      strength, windows, self.n_terms)
                zero = torch.zeros_like(eta_c)
                return ({"i": e_i, "q": zero, "u": zero, "v": zero},
                        {"q": zero, "u": zero, "v": zero})
            e_i = eta_c
            for k, (j0, j1) in enumerate(windows):
                if j1 <= j0:
                    continue
                v = ((self.wavelengths[j0:j1, None] - centre[..., k, None, :])
                     * inv_doppler[..., k, None, :])                 # (..., λw, D)
                h, _ = voigt_faraday(damping[..., k, None, :], v, self.n_terms, faraday=False)
                e_i = e_i + _place(strength[..., k, None, :] * h, j0, j1, n_lambda)
            zero = torch.zeros_like(eta_c)
            return ({"i": e_i, "q": zero, "u": zero, "v": zero},
                    {"q": zero, "u": zero, "v": zero})

        if self._fused(eta_c, centre, inv_doppler, damping, strength, larmor,
                       f["inclination"], f["azimuth"]):
            from iris_lab.synthesis import fused

            return fused.polarized_lines(eta_c, self.wavelengths, centre, inv_doppler,
                                         damping, strength, larmor, self._components,
                                         windows, f["inclination"], f["azimuth"],
                                         self.n_terms)
        # Σ over lines of strength × Σ_components weight × H (or L), per group
        acc_h: list[Tensor | None] = [None, None, None]
        acc_l: list[Tensor | None] = [None, None, None]
        for k, (j0, j1) in enumerate(windows):
            if j1 <= j0:
                continue
            v = ((self.wavelengths[j0:j1, None] - centre[..., k, None, :])
                 * inv_doppler[..., k, None, :])
            a_k = damping[..., k, None, :]
            s_k = strength[..., k, None, :]
            split = larmor[..., k, None, :]
            g_h: list[Tensor | None] = [None, None, None]
            g_l: list[Tensor | None] = [None, None, None]
            for group, shift, weight in self._components[k]:
                h, l_ = voigt_faraday(a_k, v - shift * split if shift else v, self.n_terms)
                g_h[group] = weight * h if g_h[group] is None else g_h[group] + weight * h
                g_l[group] = weight * l_ if g_l[group] is None else g_l[group] + weight * l_
            for group in range(3):
                for acc, g in ((acc_h, g_h), (acc_l, g_l)):
                    term = _place(s_k * g[group], j0, j1, n_lambda)
                    acc[group] = term if acc[group] is None else acc[group] + term
        zero = torch.zeros_like(eta_c)
        acc_h = [zero if x is None else x for x in acc_h]
        acc_l = [zero if x is None else x for x in acc_l]
        gamma, chi = f["inclination"], f["azimuth"]
        sin2 = (torch.sin(gamma) ** 2).unsqueeze(-2)                 # (..., 1, D)
        cos_g = torch.cos(gamma).unsqueeze(-2)
        cos2chi = torch.cos(2.0 * chi).unsqueeze(-2)
        sin2chi = torch.sin(2.0 * chi).unsqueeze(-2)

        def combine(groups):
            blue, pi, red = groups
            sigma = 0.5 * (blue + red)
            i_term = 0.5 * (pi * sin2 + sigma * (1.0 + cos_g**2))
            lin = 0.5 * (pi - sigma) * sin2
            circ = 0.5 * (red - blue) * cos_g
            return i_term, lin * cos2chi, lin * sin2chi, circ

        e_i, e_q, e_u, e_v = combine(acc_h)
        _, r_q, r_u, r_v = combine(acc_l)
        eta = {"i": eta_c + e_i, "q": e_q, "u": e_u, "v": e_v}
        rho = {"q": r_q, "u": r_u, "v": r_v}
        return eta, rho

    # ------------------------------------------------------------------
    def stokes(
        self,
        fields: Mapping[str, Any],
        *,
        log_gf_offset: Tensor | None = None,
        dlambda: Tensor | None = None,
    ) -> Tensor:
        """Emergent Stokes vector, shape (..., 4, n_wavelength) [erg/s/cm²/sr/Å].

        Parameters
        ----------
        fields
            Tensors (..., depth), top to bottom: ``temperature`` [K] and a depth
            scale, ``log_tau`` (log τ500) or ``height`` [cm]; optional
            ``v_los``, ``v_turb`` [cm/s], ``b_field`` [G], ``inclination``,
            ``azimuth`` [rad] (0 when absent), ``n_e``, ``n_h`` [cm⁻³] (else
            hydrostatic equilibrium on log τ500). With ``height`` *and*
            densities the optical depth is integrated geometrically.
        log_gf_offset
            Added to log(gf) per line, (..., n_lines).
        dlambda
            Shift of each line's rest wavelength [Å], (..., n_lines).

        Example
        -------
        >>> import torch
        >>> from iris_lab.atomic import LineList
        >>> from iris_lab.atmosphere import Atmosphere
        >>> falc = Atmosphere.reference("falc")
        >>> synth = LTESynthesizer(LineList.shipped("fe6301_6302"),
        ...                        torch.linspace(6301.0, 6303.0, 40))
        >>> fields = {"log_tau": torch.tensor(falc.log_tau[40:]),
        ...           "temperature": torch.tensor(falc.temperature[40:])}
        >>> synth.stokes(fields).shape
        torch.Size([4, 40])
        """
        p = self.propagation(fields, log_gf_offset=log_gf_offset, dlambda=dlambda)
        if not self.polarized:
            if self._fused(p["tau"], p["planck"]):
                from iris_lab.synthesis import fused

                intensity = fused.bezier_intensity(p["tau"], p["planck"])
            else:
                intensity = bezier_intensity(p["tau"], p["planck"])
            zero = torch.zeros_like(intensity)
            return torch.stack([intensity, zero, zero, zero], dim=-2)
        ratios = [p[k] for k in ("eta_q", "eta_u", "eta_v", "rho_q", "rho_u", "rho_v")]
        if self._fused(p["tau"], p["planck"], *ratios):
            from iris_lab.synthesis import fused

            emergent = fused.delo_bezier(p["tau"], p["planck"], ratios)
        else:
            emergent = delo_bezier(p["tau"], p["planck"], ratios)   # (..., λ, 4)
        return emergent.transpose(-1, -2)

    def continuum_intensity(self, fields: Mapping[str, Any] | None = None) -> Tensor:
        """Line-free intensity (..., n_wavelength); FAL-C at this μ by default."""
        return continuum_intensity(self.wavelengths, fields, mu=self.mu,
                                   continuum=self._continuum, device=self.device)

    def response_functions(
        self,
        fields: Mapping[str, Any],
        names: Sequence[str] = ("temperature",),
        *,
        log_gf_offset: Tensor | None = None,
        dlambda: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Response functions ∂Stokes/∂x by forward-mode autodiff.

        For each atmospheric field in ``names`` the derivative with respect
        to its value at every depth, ``{name: Tensor (..., 4, n_wavelength,
        depth)}``; ``"log_gf_offset"`` and ``"dlambda"`` in ``names`` give
        ``(..., 4, n_wavelength, n_lines)``. A single batched Jacobian–vector
        product (``torch.func.jvp``) computes all columns: the unit tangents
        ride on an extra leading batch axis, which the engine vectorises like
        pixels.

        Example
        -------
        >>> import torch
        >>> from iris_lab.atomic import LineList
        >>> from iris_lab.atmosphere import Atmosphere
        >>> falc = Atmosphere.reference("falc")
        >>> synth = LTESynthesizer(LineList.shipped("fe6301_6302"),
        ...                        torch.linspace(6301.3, 6301.7, 9))
        >>> f = {"log_tau": torch.tensor(falc.log_tau[50:]),
        ...      "temperature": torch.tensor(falc.temperature[50:])}
        >>> synth.response_functions(f)["temperature"].shape
        torch.Size([4, 9, 32])
        """
        base = self._prepare(fields)
        batch = base["temperature"].shape[:-1]
        atomic = {
            "log_gf_offset": torch.zeros(*batch, self.n_lines, dtype=self.dtype,
                                         device=self.device)
            if log_gf_offset is None else torch.as_tensor(
                log_gf_offset, dtype=self.dtype, device=self.device).expand(*batch, -1),
            "dlambda": torch.zeros(*batch, self.n_lines, dtype=self.dtype, device=self.device)
            if dlambda is None else torch.as_tensor(
                dlambda, dtype=self.dtype, device=self.device).expand(*batch, -1),
        }
        out = {}
        for name in names:
            if name in atomic:
                x = atomic[name]
            elif name in base:
                x = base[name]
            else:
                raise ValueError(f"no field or atomic parameter {name!r} to differentiate")

            n = x.shape[-1]
            # one batched JVP: a new leading axis carries the n unit tangents
            expanded = {k: v.expand(n, *v.shape).clone()
                        for k, v in {**base, **atomic}.items()}
            tangent = torch.eye(n, dtype=self.dtype, device=self.device)
            tangent = tangent.reshape(n, *([1] * len(batch)), n).expand(n, *x.shape)

            def forward(value, name=name, expanded=expanded):
                fields_ = {k: v for k, v in expanded.items() if k not in atomic}
                params = {k: v for k, v in expanded.items() if k in atomic}
                if name in atomic:
                    params[name] = value
                else:
                    fields_[name] = value
                return self.stokes(fields_, **params)

            jvp = torch.func.jvp(forward, (expanded[name],), (tangent.contiguous(),))[1]
            out[name] = torch.movedim(jvp, 0, -1)
        return out

    def synthesize(self, atmosphere: Any, batch_dims: Sequence[str] | None = None):
        """Stokes spectra of an :class:`~iris_lab.atmosphere.Atmosphere`.

        Uses the atmosphere's densities when it has ``n_e`` and ``n_h`` (on
        its own depth scale), else hydrostatic equilibrium on ``log_tau``.

        Returns
        -------
        xarray.DataArray
            dims (*batch_dims, ``stokes``, ``wavelength``), units in attrs.
        """
        import xarray as xr

        fields = {n: torch.as_tensor(v) for n, v in atmosphere.fields().items()
                  if n in ("log_tau", "height", "temperature", "v_los", "v_turb", "b_field",
                           "inclination", "azimuth", "n_e", "n_h")}
        if not (atmosphere.n_e is not None and atmosphere.n_h is not None):
            fields.pop("height", None)
            if "log_tau" not in fields:
                raise ValueError("an atmosphere without densities needs a log_tau scale")
        elif atmosphere.scale == "log_tau":
            fields.pop("height", None)
        with torch.no_grad():
            spectra = self.stokes(fields).cpu().numpy()
        batch_dims = tuple(batch_dims) if batch_dims is not None else tuple(
            f"dim_{i}" for i in range(len(atmosphere.batch_shape)))
        return xr.DataArray(
            spectra, dims=(*batch_dims, "stokes", "wavelength"),
            coords={"stokes": list(STOKES),
                    "wavelength": ("wavelength", self.wavelengths.cpu().numpy(),
                                   {"units": "Angstrom", "medium": self.medium})},
            attrs={"units": INTENSITY_UNITS, "mu": self.mu,
                   "long_name": "emergent Stokes vector (LTE)"},
            name="stokes")
