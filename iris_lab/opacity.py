"""Continuum opacity of the solar photosphere and chromosphere, in torch.

API summary
-----------
``continuum_opacity(wavelength_aa, temperature, n_e, n_h_neutral, *, n_protons=None,
n_he_neutral=None, scattering=True, return_components=False)``
    Linear extinction coefficient κ [cm⁻¹] with shape ``(*state, n_wavelength)``:
    H⁻ bound-free (John 1988 fit to Wishart 1979) and free-free (John 1988),
    hydrogenic H I bound-free (levels n = 1…16, Gaunt factors after Menzel &
    Pekeris 1935 as in Gray 2005, eq. 8.5) and free-free (Gray 2005, eq. 8.6),
    Thomson scattering and Rayleigh scattering on H I (Dalgarno 1962, as in
    Kurucz 1970) and He I (Kurucz 1970). With ``return_components=True`` a dict
    of every term plus ``"absorption"``, ``"scattering"`` and ``"total"``.
``opacity_coefficients(wavelength_aa, temperature)`` / ``combine_opacity(coef, n_e, ...)``
    The same split into a temperature-only part (precompute once per
    wavelength grid) and a cheap product with the densities.
``kappa_500(temperature, n_e, n_h_neutral, **kw)``
    κ at 5000 Å (the τ500 reference), shape ``(*state,)``.
``hminus_bf_cross_section(wavelength_aa)``
    H⁻ photodetachment cross-section [cm²] (John 1988).
``hminus_ff_coefficient(wavelength_aa, temperature)``
    H⁻ free-free coefficient [cm⁴ dyn⁻¹] per H atom and unit electron pressure.
``hminus_density(temperature, n_e, n_h_neutral)``
    LTE H⁻ number density (Saha equation, binding energy 0.754195 eV).

State arrays (temperature, densities) broadcast with each other; the
wavelength axis is appended last. All functions are differentiable torch
float64 code that runs on the device of their inputs. Scattering terms are
returned inside the total when ``scattering=True`` (the τ500 convention used
by :mod:`iris_lab.eos`); in LTE line synthesis they can be separated with
``return_components=True``. All fits are cited in ``iris_lab/data/README.md``.

Example
-------
>>> import torch
>>> from iris_lab.opacity import continuum_opacity
>>> k = continuum_opacity(torch.tensor([5000.0, 4016.0]), torch.tensor([6000.0]),
...                       torch.tensor([1e13]), torch.tensor([1e17]))
>>> k.shape
torch.Size([1, 2])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# CGS constants (CODATA 2018)
K_BOLTZMANN = 1.380649e-16
H_PLANCK = 6.62607015e-27
C_LIGHT = 2.99792458e10
M_ELECTRON = 9.1093837015e-28
EV = 1.602176634e-12
SIGMA_THOMSON = 6.6524587321e-25
#: (2π m_e k / h²)^{3/2} [cm⁻³ K⁻³ᐟ²], the Saha-equation constant.
SAHA_CONST = (2.0 * math.pi * M_ELECTRON * K_BOLTZMANN / H_PLANCK**2) ** 1.5
#: H⁻ electron affinity [eV] (Lykke, Murray & Lineberger 1991).
CHI_HMINUS = 0.754195
#: H I ionisation energy [eV].
CHI_H = 13.598434
#: Rydberg constant for hydrogen [cm⁻¹] (Gray 2005, eqs. 8.5-8.6).
R_H = 1.0967758e5
#: hc/k [Å K]
HC_K_AA = H_PLANCK * C_LIGHT / K_BOLTZMANN * 1e8

# John (1988), A&A 193, 189: H⁻ bound-free fit coefficients C_n (n = 1..6),
# λ in μm, threshold λ0 = 1.6419 μm.
_JOHN_BF = (152.519, 49.534, -118.858, 92.536, -34.194, 4.982)
_JOHN_LAMBDA0 = 1.6419
# John (1988) free-free, rows n = 1..6, columns A, B, C, D, E, F.
_JOHN_FF_LONG = (  # λ > 0.3645 μm
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (2483.346, 285.827, -2054.291, 2827.776, -1341.537, 208.952),
    (-3449.889, -1158.382, 8746.523, -11485.632, 5303.609, -812.939),
    (2200.040, 2427.719, -13651.105, 16755.524, -7510.494, 1132.738),
    (-696.271, -1841.400, 8624.970, -10051.530, 4400.067, -655.020),
    (88.283, 444.517, -1863.864, 2095.288, -901.788, 132.985),
)
_JOHN_FF_SHORT = (  # 0.1823 < λ < 0.3645 μm
    (518.1021, -734.8666, 1021.1775, -479.0721, 93.1373, -6.4285),
    (473.2636, 1443.4137, -1977.3395, 922.3575, -178.9275, 12.3600),
    (-482.2089, -737.1616, 1096.8827, -521.1341, 101.7963, -7.0571),
    (115.5291, 169.6374, -245.6490, 114.2430, -21.9972, 1.5097),
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
)
#: highest H I level included explicitly in the bound-free sum
N_H_LEVELS = 16


def _as_tensor(x, like: Tensor | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x if x.dtype == torch.float64 else x.to(torch.float64)
    device = like.device if like is not None else None
    return torch.as_tensor(x, dtype=torch.float64, device=device)


def _check_state(name: str, x: Tensor, positive: bool) -> None:
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if positive and (x <= 0).any():
        raise ValueError(f"{name} must be > 0 everywhere (min {float(x.min()):.3g})")
    if not positive and (x < 0).any():
        raise ValueError(f"{name} must be >= 0 everywhere (min {float(x.min()):.3g})")


def hminus_bf_cross_section(wavelength_aa: Tensor) -> Tensor:
    """H⁻ photodetachment cross-section [cm²] (John 1988 fit to Wishart 1979).

    Zero beyond the threshold (16419 Å) and below 1250 Å (outside the fit).

    Example
    -------
    >>> import torch
    >>> s = hminus_bf_cross_section(torch.tensor([5000.0]))
    >>> 2e-17 < float(s) < 5e-17
    True
    """
    lam = _as_tensor(wavelength_aa) * 1e-4  # μm
    valid = (lam > 0.125) & (lam < _JOHN_LAMBDA0)
    lam_v = torch.where(valid, lam, torch.full_like(lam, 1.0))
    x = torch.sqrt(torch.clamp(1.0 / lam_v - 1.0 / _JOHN_LAMBDA0, min=0.0))
    f = torch.zeros_like(lam)
    for n, c in enumerate(_JOHN_BF):
        f = f + c * x**n
    sigma = 1e-18 * lam_v**3 * x**3 * f
    return torch.where(valid, sigma, torch.zeros_like(sigma))


def hminus_ff_coefficient(wavelength_aa: Tensor, temperature: Tensor) -> Tensor:
    """H⁻ free-free absorption per H I atom per unit electron pressure [cm⁴ dyn⁻¹].

    John (1988); stimulated emission included. Valid for λ > 1823 Å and
    1400 K < T < 100 080 K; zero below 1823 Å. Shapes broadcast.

    Example
    -------
    >>> import torch
    >>> k = hminus_ff_coefficient(torch.tensor(5000.0), torch.tensor(6000.0))
    >>> 1e-27 < float(k) < 1e-25
    True
    """
    lam = _as_tensor(wavelength_aa) * 1e-4
    t = _as_tensor(temperature, lam)
    lam, t = torch.broadcast_tensors(lam, t)
    theta = 5040.0 / t
    long = torch.as_tensor(_JOHN_FF_LONG, dtype=torch.float64, device=lam.device)
    short = torch.as_tensor(_JOHN_FF_SHORT, dtype=torch.float64, device=lam.device)
    lam_safe = torch.clamp(lam, min=0.1823)
    powers = torch.stack([lam_safe**2, torch.ones_like(lam_safe), 1.0 / lam_safe,
                          lam_safe**-2, lam_safe**-3, lam_safe**-4], dim=-1)
    total_long = torch.zeros_like(lam)
    total_short = torch.zeros_like(lam)
    for n in range(6):
        th = theta ** ((n + 2) / 2.0)
        total_long = total_long + th * (powers @ long[n])
        total_short = total_short + th * (powers @ short[n])
    k = torch.where(lam > 0.3645, total_long, total_short) * 1e-29
    return torch.where(lam > 0.1823, k, torch.zeros_like(k))


def hminus_density(temperature: Tensor, n_e: Tensor, n_h_neutral: Tensor) -> Tensor:
    """LTE number density of H⁻ [cm⁻³] from the Saha equation.

    ``n(H⁻) = n(H I) n_e / (4 Φ(T))`` with Φ = (2πm_e kT/h²)^{3/2} e^{−0.754 eV/kT}
    (statistical weights 1 for H⁻, 2 for the H I ground state).

    Example
    -------
    >>> import torch
    >>> r = hminus_density(torch.tensor(6000.0), torch.tensor(1e13), torch.tensor(1e17))
    >>> 1e8 < float(r) < 1e10
    True
    """
    t = _as_tensor(temperature)
    phi = SAHA_CONST * t**1.5 * torch.exp(-CHI_HMINUS * EV / (K_BOLTZMANN * t))
    return _as_tensor(n_h_neutral, t) * _as_tensor(n_e, t) / (4.0 * phi)


def _rayleigh_h(lam_aa: Tensor) -> Tensor:
    """Rayleigh cross-section of H I [cm²], Dalgarno (1962) as in Kurucz (1970)."""
    w = torch.clamp(lam_aa, min=1026.0)
    w2 = w * w
    return (5.799e-13 + 1.422e-6 / w2 + 2.784 / (w2 * w2)) / (w2 * w2)


def _rayleigh_he(lam_aa: Tensor) -> Tensor:
    """Rayleigh cross-section of He I [cm²] (Kurucz 1970, after Dalgarno 1962)."""
    w = torch.clamp(lam_aa, min=584.0)
    w2 = w * w
    return 5.484e-14 / (w2 * w2) * (1.0 + (2.44e5 + 5.94e10 / (w2 - 2.90e5)) / w2) ** 2


def _h_bf_per_atom(lam_aa: Tensor, t: Tensor, u_h: Tensor | float = 2.0) -> Tensor:
    """H I bound-free cross-section per neutral H atom [cm²], LTE level populations,
    without stimulated emission (levels whose edge lies blueward of every wavelength
    are skipped)."""
    nu = C_LIGHT / (lam_aa * 1e-8)
    lam_r = lam_aa * 1e-8 * R_H
    n_min = max(1, math.ceil(math.sqrt(float(lam_r.detach().min())) - 1e-9))
    if n_min > N_H_LEVELS:
        return torch.zeros(torch.broadcast_shapes(lam_aa.shape, t.shape), dtype=torch.float64,
                           device=lam_aa.device)
    n = torch.arange(n_min, N_H_LEVELS + 1, dtype=torch.float64, device=lam_aa.device)
    lr = lam_r.unsqueeze(-1)
    gaunt = 1.0 - 0.3456 / lr ** (1.0 / 3.0) * (lr / (n * n) - 0.5)
    sigma = torch.where(lr <= n * n, 2.815e29 * torch.clamp(gaunt, min=0.0) / n**5, 0.0)
    kt_ev = (K_BOLTZMANN * t / EV).unsqueeze(-1)
    pop = 2.0 * n * n * torch.exp(-CHI_H * (1.0 - 1.0 / (n * n)) / kt_ev)  # (..., W?, L)
    return (sigma * pop).sum(-1) / (nu**3 * u_h)


def _h_ff_per_pair(lam_aa: Tensor, t: Tensor) -> Tensor:
    """H I free-free coefficient per electron and proton [cm⁵], no stimulated emission."""
    nu = C_LIGHT / (lam_aa * 1e-8)
    lam_r = lam_aa * 1e-8 * R_H
    theta = 5040.0 / t
    chi_lam = 12398.42 / lam_aa
    gaunt = 1.0 + 0.3456 / lam_r ** (1.0 / 3.0) * (math.log10(math.e) / (theta * chi_lam) + 0.5)
    return 3.6919e8 * gaunt / (nu**3 * torch.sqrt(t))


def opacity_coefficients(wavelength_aa: Tensor, temperature: Tensor,
                         u_h: Tensor | float = 2.0) -> dict[str, Tensor]:
    """Temperature-dependent continuum coefficients, per unit of the densities they multiply.

    Returns a dict of tensors (*temperature.shape, n_wavelength) [cm⁵ or cm²]:
    ``hminus`` (H⁻ bf + ff, × n(H I) n_e), ``h_bf`` and ``rayleigh_h`` (× n(H I)),
    ``h_ff`` (× n_e n_p), ``thomson`` (× n_e), ``rayleigh_he`` (× n(He I)).
    Stimulated emission is included in the absorption terms. Precompute once
    per wavelength grid and atmosphere temperature, then combine with
    :func:`combine_opacity` (cheap) whenever the densities change.

    Example
    -------
    >>> import torch
    >>> c = opacity_coefficients(torch.tensor([5000.0]), torch.tensor([6000.0]))
    >>> sorted(c)[:3]
    ['h_bf', 'h_ff', 'hminus_bf']
    """
    lam = _as_tensor(wavelength_aa).reshape(-1)
    t_ = _as_tensor(temperature, lam).unsqueeze(-1)
    uh = u_h if not isinstance(u_h, Tensor) else u_h.unsqueeze(-1)
    kt = K_BOLTZMANN * t_
    stim = -torch.expm1(-HC_K_AA / (lam * t_))
    phi = SAHA_CONST * t_**1.5 * torch.exp(-CHI_HMINUS * EV / kt)
    ones = torch.ones_like(stim)
    return {
        "hminus_bf": hminus_bf_cross_section(lam) * stim / (4.0 * phi),
        "hminus_ff": kt * hminus_ff_coefficient(lam, t_),
        "h_bf": _h_bf_per_atom(lam, t_, uh) * stim,
        "h_ff": _h_ff_per_pair(lam, t_) * stim,
        "thomson": SIGMA_THOMSON * ones,
        "rayleigh_h": _rayleigh_h(lam) * ones,
        "rayleigh_he": _rayleigh_he(lam) * ones,
    }


def combine_opacity(coefficients: dict[str, Tensor], n_e: Tensor, n_h_neutral: Tensor,
                    n_protons: Tensor, n_he_neutral: Tensor | None = None, *,
                    scattering: bool = True, return_components: bool = False
                    ) -> Tensor | dict[str, Tensor]:
    """κ [cm⁻¹] from :func:`opacity_coefficients` and densities (*state) [cm⁻³].

    Example
    -------
    >>> import torch
    >>> c = opacity_coefficients(torch.tensor([5000.0]), torch.tensor(6000.0))
    >>> k = combine_opacity(c, torch.tensor(1e13), torch.tensor(1e17), torch.tensor(1e13))
    >>> k.shape
    torch.Size([1])
    """
    ne, nh0, n_p = (x.unsqueeze(-1) for x in (n_e, n_h_neutral, n_protons))
    comp = {
        "hminus_bf": coefficients["hminus_bf"] * nh0 * ne,
        "hminus_ff": coefficients["hminus_ff"] * nh0 * ne,
        "h_bf": coefficients["h_bf"] * nh0,
        "h_ff": coefficients["h_ff"] * ne * n_p,
        "thomson": coefficients["thomson"] * ne,
        "rayleigh_h": coefficients["rayleigh_h"] * nh0,
    }
    absorption = comp["hminus_bf"] + comp["hminus_ff"] + comp["h_bf"] + comp["h_ff"]
    scatter = comp["thomson"] + comp["rayleigh_h"]
    if n_he_neutral is not None:
        comp["rayleigh_he"] = coefficients["rayleigh_he"] * n_he_neutral.unsqueeze(-1)
        scatter = scatter + comp["rayleigh_he"]
    total = absorption + scatter if scattering else absorption
    if return_components:
        comp.update(absorption=absorption, scattering=scatter, total=total)
        return comp
    return total


def continuum_opacity(
    wavelength_aa: Tensor,
    temperature: Tensor,
    n_e: Tensor,
    n_h_neutral: Tensor,
    *,
    n_protons: Tensor | None = None,
    n_he_neutral: Tensor | None = None,
    u_h: Tensor | None = None,
    scattering: bool = True,
    return_components: bool = False,
    validate: bool = True,
) -> Tensor | dict[str, Tensor]:
    """Continuum extinction coefficient κ [cm⁻¹].

    Parameters
    ----------
    wavelength_aa : Tensor (n_wavelength,) or scalar
        Wavelengths [Å] (the medium does not matter at this precision).
    temperature, n_e, n_h_neutral : Tensor (*state)
        Temperature [K], electron density and neutral-hydrogen density [cm⁻³];
        shapes broadcast.
    n_protons : Tensor, optional
        Proton density [cm⁻³]; LTE Saha value from ``n_h_neutral`` and ``n_e``
        when omitted.
    n_he_neutral : Tensor, optional
        Neutral helium density for He I Rayleigh scattering (omitted: none).
    u_h : Tensor, optional
        H I partition function (default 2, the ground-state weight; the
        difference is < 1e-6 below 10⁴ K).
    scattering : bool
        Include Thomson and Rayleigh scattering in the returned total.
    return_components : bool
        Return a dict with every term plus ``absorption``, ``scattering``, ``total``.
    validate : bool
        Check the inputs (set False inside ``torch.func.vmap``).

    Returns
    -------
    Tensor (*state, n_wavelength) — or (*state) for a scalar wavelength — or a
    dict of such tensors.

    Raises
    ------
    ValueError
        NaN anywhere, T ≤ 0, negative densities or wavelengths ≤ 0.

    Example
    -------
    >>> import torch
    >>> c = continuum_opacity(torch.tensor([5000.0]), torch.tensor(6000.0),
    ...                       torch.tensor(1e13), torch.tensor(1e17), return_components=True)
    >>> bool(c["hminus_bf"] > c["thomson"])
    True
    """
    lam = _as_tensor(wavelength_aa)
    t = _as_tensor(temperature, lam)
    ne = _as_tensor(n_e, t)
    nh0 = _as_tensor(n_h_neutral, t)
    if validate:
        _check_state("wavelength", lam, positive=True)
        _check_state("temperature", t, positive=True)
        _check_state("n_e", ne, positive=False)
        _check_state("n_h_neutral", nh0, positive=False)
    scalar_lam = lam.ndim == 0
    t, ne, nh0 = torch.broadcast_tensors(t, ne, nh0)
    uh = 2.0 if u_h is None else _as_tensor(u_h, t)
    if n_protons is None:
        s_h = SAHA_CONST * t**1.5 * torch.exp(-CHI_H * EV / (K_BOLTZMANN * t)) * 2.0 / uh
        n_p = nh0 * s_h / torch.clamp(ne, min=1e-300)
    else:
        n_p = _as_tensor(n_protons, t)
    n_he = None if n_he_neutral is None else _as_tensor(n_he_neutral, t)
    coef = opacity_coefficients(lam, t, uh)
    out = combine_opacity(coef, ne, nh0, n_p, n_he, scattering=scattering,
                          return_components=return_components)
    if scalar_lam:
        if isinstance(out, dict):
            return {k: v[..., 0] for k, v in out.items()}
        return out[..., 0]
    return out


def kappa_500(temperature: Tensor, n_e: Tensor, n_h_neutral: Tensor, **kwargs) -> Tensor:
    """κ at 5000 Å [cm⁻¹], absorption plus scattering; shape of the state arrays.

    Example
    -------
    >>> import torch
    >>> float(kappa_500(torch.tensor(6000.0), torch.tensor(1e13), torch.tensor(1e17))) > 0
    True
    """
    return continuum_opacity(torch.tensor(5000.0, dtype=torch.float64,
                                          device=_as_tensor(temperature).device),
                             temperature, n_e, n_h_neutral, **kwargs)
