"""Atomic line data: Kurucz line lists, Landé factors, Zeeman patterns, damping.

API summary
-----------
``LineList``
    Dataclass of per-line numpy arrays (index = line): ``element`` (symbol),
    ``ion`` (1 = neutral), ``wavelength_air`` / ``wavelength_vacuum`` [Å],
    ``log_gf``, ``e_low`` / ``e_up`` [eV], ``j_low`` / ``j_up``, ``lande_low`` /
    ``lande_up`` (NaN where unknown), ``g_eff``, ``polarizable`` (both Landé
    factors known), ``log_gamma_rad`` [log10 s⁻¹], ``log_gamma_stark``
    [log10 s⁻¹ cm³, per electron], ``log_gamma_vdw`` [log10 s⁻¹ cm³ per H atom
    at 10⁴ K], ``abo_sigma`` [a0²] / ``abo_alpha`` (NaN where absent),
    ``vdw_enhancement`` (multiplier of Unsöld's width), ``mass`` [amu],
    ``chi_ion`` [eV] (ionisation energy of the line's stage), ``label_low`` /
    ``label_up``, ``s_low``/``l_low``/``s_up``/``l_up`` (NaN where the label
    gives no LS term) and ``damping_source`` (where each width came from).
``LineList.from_kurucz(path)``, ``LineList.shipped("4015_4017" | "fe6301_6302")``
    Read Kurucz ``gfall`` fixed-column rows (a malformed row → ``ValueError``
    naming the file, row and field).
``len(lines)``, ``lines.select(indices)``, ``lines.zeeman_pattern()``
    The last returns a dict ``{"sigma_b", "pi", "sigma_r"}`` of dicts with
    ``shift`` [Larmor units Δλ_B = λ² e B / (4π m_e c²), positive = red],
    ``strength`` (summing to 1 per line and group) and ``mask``, each a padded
    array (n_lines, n_components).
``lines.damping(temperature, n_e, n_h_neutral, n_he_neutral=None)``
    Radiative, quadratic Stark and van der Waals widths Γ [s⁻¹] (torch,
    shape (..., n_lines)); see the method for the formulae.
``air_to_vacuum(λ)``, ``vacuum_to_air(λ)``
    Edlén (1966) refractivity of standard air [Å] (the convention of Lightweaver).
``lande_ls(j, l, s)``, ``effective_lande(g_low, g_up, j_low, j_up)``, ``parse_term(label)``

Damping conventions (``damping_source`` records the choice per line):
radiative from the list, else classical Γ = 0.2223 / λ² [cm]; quadratic Stark
from the list, else Cowley (1971) Γ/n_e = 10⁻⁸ n_eff⁵ (upper level); van der
Waals by Anstee–Barklem–O'Mara (σ, α) where the list packs them in the vdW
column (integer part σ, fractional part α, as RH does), else Unsöld (1955)
× enhancement, the enhancement being the ratio that reproduces the list's
log Γ_vdW at 10⁴ K (both scale as T^0.3) or ``DEFAULT_VDW_ENHANCEMENT`` = 1.5
when the list has none.

Example
-------
>>> from iris_lab.atomic import LineList
>>> lines = LineList.shipped("fe6301_6302")
>>> len(lines), [round(float(g), 3) for g in lines.g_eff]
(2, [1.669, 2.487])
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

_DATA = Path(__file__).parent / "data"
SHIPPED = {
    "4015_4017": "lines_4015_4017.kurucz",
    "fe6301_6302": "lines_fe6301_6302.kurucz",
}
#: Unsöld enhancement used when the line list gives no van der Waals data.
DEFAULT_VDW_ENHANCEMENT = 1.5
#: Landé factor assumed for lines whose levels cannot be identified (as RH and
#: Lightweaver do, such lines are not split).
UNKNOWN_G_EFF = 0.0

_L_LETTERS = "SPDFGHIKLMNOQRTUV"
_TERM_RE = re.compile(r"^(\d+)([SPDFGHIKLMNOQRTUV])['\"*]*$")

# CGS constants
_K = 1.380649e-16
_AMU = 1.66053906660e-24
_E_ESU = 4.80320471e-10
_H = 6.62607015e-27
_A0 = 5.29177210903e-9
_ALPHA_H = 6.67e-25  # static polarizability of H [cm³] (Lightweaver's ABarH in CGS)
_E_RYD_EV = 13.605693
_HC_EV_AA = 12398.419843


# --------------------------------------------------------------------------- helpers


def _edlen_n(wavelength_vac_aa: np.ndarray) -> np.ndarray:
    sigma2 = (1e4 / wavelength_vac_aa) ** 2
    return 1.0 + 1e-8 * (8342.13 + 2406030.0 / (130.0 - sigma2) + 15997.0 / (38.9 - sigma2))


def vacuum_to_air(wavelength_aa):
    """Vacuum → standard-air wavelength [Å], Edlén (1966); unchanged below 2000 Å.

    Example
    -------
    >>> round(float(vacuum_to_air(6302.4936 * 1.000277)), 1)
    6302.5
    """
    w = np.asarray(wavelength_aa, dtype=float)
    return np.where(w > 2000.0, w / _edlen_n(w), w)


def air_to_vacuum(wavelength_aa):
    """Standard-air → vacuum wavelength [Å] (inverse of :func:`vacuum_to_air` by iteration).

    Example
    -------
    >>> round(float(air_to_vacuum(6302.4936)), 3)
    6304.237
    """
    w_air = np.asarray(wavelength_aa, dtype=float)
    w = w_air.copy()
    for _ in range(6):
        w = w_air * _edlen_n(w)
    return np.where(w_air > 2000.0, w, w_air)


def parse_term(label: str) -> tuple[float, float]:
    """(S, L) of an LS term from a Kurucz level label, NaNs when there is none.

    The last word of the label is read as ``[letter]2S+1L`` (e.g. ``y5F``,
    ``e5D``, ``*4D``, ``4I``); jK (``3+[1+]``) and bare configurations give NaN.

    Example
    -------
    >>> parse_term("(4F)4p y5F"), parse_term("s6d 3+[1+]")
    ((2.0, 3.0), (nan, nan))
    """
    words = label.split()
    if not words:
        return math.nan, math.nan
    tok = words[-1]
    if "[" in tok or "]" in tok:
        return math.nan, math.nan
    tok = tok.lstrip("*")
    if tok[:1].islower():
        tok = tok[1:]
    tok = tok.lstrip("*")
    m = _TERM_RE.match(tok)
    if not m:
        return math.nan, math.nan
    mult = int(m.group(1))
    return (mult - 1) / 2.0, float(_L_LETTERS.index(m.group(2)))


def lande_ls(j, l, s):
    """LS-coupling Landé factor g = 1 + [J(J+1) + S(S+1) − L(L+1)] / [2J(J+1)] (g_s = 2).

    J = 0 gives 0 (the level is not split). NaN in → NaN out.

    Example
    -------
    >>> float(lande_ls(2.0, 1.0, 2.0))   # 5P2
    1.8333333333333335
    """
    j, l, s = (np.asarray(v, dtype=float) for v in (j, l, s))
    jj = j * (j + 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        g = 1.0 + (jj + s * (s + 1.0) - l * (l + 1.0)) / (2.0 * jj)
    return np.where(j > 0, g, np.where(np.isnan(l + s), np.nan, 0.0))


def effective_lande(g_low, g_up, j_low, j_up):
    """Effective Landé factor ḡ = ½(g_u + g_l) + ¼(g_u − g_l)[J_u(J_u+1) − J_l(J_l+1)].

    Example
    -------
    >>> float(effective_lande(0.0, 2.5, 0.0, 1.0))
    2.5
    """
    g_low, g_up, j_low, j_up = (np.asarray(v, dtype=float) for v in (g_low, g_up, j_low, j_up))
    return 0.5 * (g_up + g_low) + 0.25 * (g_up - g_low) * (j_up * (j_up + 1) - j_low * (j_low + 1))


def _factorial(x: Fraction) -> float:
    if x < 0 or x.denominator != 1:
        raise ValueError("factorial of a non-natural number")
    return float(math.factorial(int(x)))


def _wigner_3j(j1: Fraction, j2: Fraction, j3: Fraction, m1: Fraction, m2: Fraction,
               m3: Fraction) -> float:
    """Wigner 3j symbol by the Racah formula (half-integers as Fractions)."""
    if m1 + m2 + m3 != 0 or abs(m1) > j1 or abs(m2) > j2 or abs(m3) > j3:
        return 0.0
    if j3 < abs(j1 - j2) or j3 > j1 + j2:
        return 0.0
    f = _factorial
    pre = (f(j1 + j2 - j3) * f(j1 - j2 + j3) * f(-j1 + j2 + j3) / f(j1 + j2 + j3 + 1)
           * f(j1 + m1) * f(j1 - m1) * f(j2 + m2) * f(j2 - m2) * f(j3 + m3) * f(j3 - m3))
    total = 0.0
    for k in range(0, int(j1 + j2 + j3) + 2):
        kk = Fraction(k)
        args = (kk, j1 + j2 - j3 - kk, j1 - m1 - kk, j2 + m2 - kk, j3 - j2 + m1 + kk,
                j3 - j1 - m2 + kk)
        if any(a < 0 for a in args):
            continue
        total += (-1) ** k / math.prod(f(a) for a in args)
    sign = (-1) ** int(j1 - j2 - m3)
    return sign * math.sqrt(pre) * total


def _components(j_low: float, j_up: float, g_low: float, g_up: float):
    """Zeeman components per group (σ_b: M_u − M_l = +1, π: 0, σ_r: −1)."""
    jl, ju = Fraction(j_low).limit_denominator(2), Fraction(j_up).limit_denominator(2)
    groups = {1: [], 0: [], -1: []}
    m_u = -ju
    while m_u <= ju:
        for dm in (1, 0, -1):
            m_l = m_u - dm
            if abs(m_l) > jl:
                continue
            w = _wigner_3j(ju, jl, Fraction(1), -m_u, m_l, Fraction(dm)) ** 2
            if w > 0:
                groups[dm].append((g_low * float(m_l) - g_up * float(m_u), w))
        m_u += 1
    out = []
    for dm in (1, 0, -1):
        comps = groups[dm]
        tot = sum(w for _, w in comps)
        out.append([(sh, w / tot) for sh, w in comps] if tot > 0 else [])
    return out


def zeeman_pattern(j_low: Any, j_up: Any, lande_low: Any, lande_up: Any, *,
                   polarizable: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """Anomalous Zeeman patterns of lines from J and the Landé factors of both levels.

    The one implementation behind :meth:`LineList.zeeman_pattern` and the
    synthesizers. Returns ``{"sigma_b": g, "pi": g, "sigma_r": g}``; each
    ``g`` holds ``shift`` (n_lines, n_comp) in Larmor units Δλ_B (positive =
    red; shift = g_l M_l − g_u M_u), ``strength`` (∝ squared 3j symbols,
    normalised to 1 per line and group) and ``mask`` (valid components),
    padded to a common ``n_comp``. Lines that are not ``polarizable``
    (default: a Landé factor or J is not finite) get the unsplit pattern:
    one component at zero shift in each group.

    Example
    -------
    >>> z = zeeman_pattern([1.0], [0.0], [1.5], [0.0])       # normal triplet
    >>> [float(z[g]["shift"][0, 0]) for g in ("sigma_b", "pi", "sigma_r")]
    [-1.5, 0.0, 1.5]
    """
    j_low, j_up = np.atleast_1d(np.asarray(j_low, float)), np.atleast_1d(np.asarray(j_up, float))
    g_low = np.atleast_1d(np.asarray(lande_low, float))
    g_up = np.atleast_1d(np.asarray(lande_up, float))
    if polarizable is None:
        polarizable = np.isfinite(j_low) & np.isfinite(j_up) & np.isfinite(g_low) \
            & np.isfinite(g_up)
    polarizable = np.broadcast_to(np.asarray(polarizable, bool), j_low.shape)
    per_line = [_components(j_low[k], j_up[k], g_low[k], g_up[k]) if polarizable[k]
                else [[(0.0, 1.0)], [(0.0, 1.0)], [(0.0, 1.0)]] for k in range(j_low.size)]
    n_comp = max(1, max(len(g) for line in per_line for g in line))
    out = {}
    for gi, name in enumerate(("sigma_b", "pi", "sigma_r")):
        shift = np.zeros((len(per_line), n_comp))
        strength = np.zeros((len(per_line), n_comp))
        mask = np.zeros((len(per_line), n_comp), dtype=bool)
        for k, line in enumerate(per_line):
            for c, (sh, w) in enumerate(line[gi]):
                shift[k, c], strength[k, c], mask[k, c] = sh, w, True
        out[name] = {"shift": shift, "strength": strength, "mask": mask}
    return out


def _f(text: str, row: str, name: str, path: str, lineno: int, default=None) -> float:
    t = text.strip()
    if not t:
        if default is not None:
            return default
        raise ValueError(f"{path}: row {lineno}: empty field {name!r}: {row.rstrip()!r}")
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"{path}: row {lineno}: cannot read {name!r} from {text!r}: "
                         f"{row.rstrip()!r}") from None


# --------------------------------------------------------------------------- LineList

_ARRAY_FIELDS = (
    "element", "ion", "wavelength_air", "wavelength_vacuum", "log_gf", "e_low", "e_up",
    "j_low", "j_up", "lande_low", "lande_up", "g_eff", "polarizable", "log_gamma_rad",
    "log_gamma_stark", "log_gamma_vdw", "abo_sigma", "abo_alpha", "vdw_enhancement", "mass",
    "chi_ion", "label_low", "label_up", "s_low", "l_low", "s_up", "l_up", "damping_source",
)


@dataclasses.dataclass(eq=False)
class LineList:
    """Per-line atomic data (see the module docstring for every field and unit).

    Example
    -------
    >>> lines = LineList.shipped("4015_4017")
    >>> len(lines), str(lines.element[0]), int(lines.ion[0])
    (18, 'Fe', 1)
    >>> sub = lines.select([0, 2])
    >>> [str(e) for e in sub.element]
    ['Fe', 'Ti']
    """

    element: np.ndarray
    ion: np.ndarray
    wavelength_air: np.ndarray
    wavelength_vacuum: np.ndarray
    log_gf: np.ndarray
    e_low: np.ndarray
    e_up: np.ndarray
    j_low: np.ndarray
    j_up: np.ndarray
    lande_low: np.ndarray
    lande_up: np.ndarray
    g_eff: np.ndarray
    polarizable: np.ndarray
    log_gamma_rad: np.ndarray
    log_gamma_stark: np.ndarray
    log_gamma_vdw: np.ndarray
    abo_sigma: np.ndarray
    abo_alpha: np.ndarray
    vdw_enhancement: np.ndarray
    mass: np.ndarray
    chi_ion: np.ndarray
    label_low: np.ndarray
    label_up: np.ndarray
    s_low: np.ndarray
    l_low: np.ndarray
    s_up: np.ndarray
    l_up: np.ndarray
    damping_source: np.ndarray
    source: str = ""

    def __post_init__(self) -> None:
        n = len(self.element)
        for name in _ARRAY_FIELDS:
            arr = np.asarray(getattr(self, name))
            if arr.shape != (n,):
                raise ValueError(f"LineList field {name!r} has shape {arr.shape}, expected ({n},)")
            setattr(self, name, arr)

    def __len__(self) -> int:
        return len(self.element)

    def __repr__(self) -> str:
        rows = ", ".join(f"{e} {'I' * int(i)} {w:.3f}" for e, i, w in
                         zip(self.element[:4], self.ion[:4], self.wavelength_air[:4],
                             strict=False))
        more = ", …" if len(self) > 4 else ""
        return f"LineList({len(self)} lines: {rows}{more})"

    def select(self, indices) -> LineList:
        """A new LineList with the lines ``indices`` (ints, a slice or a boolean mask)."""
        idx = np.arange(len(self))[indices] if not isinstance(indices, list) else \
            np.asarray(indices, dtype=int)
        idx = np.atleast_1d(idx)
        return dataclasses.replace(self, **{k: getattr(self, k)[idx] for k in _ARRAY_FIELDS})

    # ------------------------------------------------------------------ readers

    @classmethod
    def shipped(cls, name: str) -> LineList:
        """One of the line lists shipped in ``iris_lab/data`` (``"4015_4017"``,
        ``"fe6301_6302"``)."""
        if name not in SHIPPED:
            raise ValueError(f"unknown line list {name!r}; choose from {sorted(SHIPPED)}")
        return cls.from_kurucz(_DATA / SHIPPED[name])

    @classmethod
    def from_kurucz(cls, path: str | Path, *,
                    vdw_enhancement: float = DEFAULT_VDW_ENHANCEMENT) -> LineList:
        """Read a Kurucz ``gfall`` file (fixed columns; air wavelength in nm above 200 nm).

        Columns (0-based, the layout RH reads): λ [nm] 0-10, log gf 10-17,
        species code 17-23 (26.00 = Fe I, 28.01 = Ni II), E, J, label of the
        first level 23-35, 35-40, 41-51; of the second level 51-63, 63-68,
        69-79; log Γ_rad, log Γ_Stark/n_e, log Γ_vdW/n_H 79-85, 85-91, 91-97
        (0 = absent; a vdW entry > 20 packs ABO σ.α); Landé factors × 1000 of
        both levels 143-148, 148-153 (both 0 = absent). Lines starting with
        ``#`` and blank lines are skipped; the lower level is the one with the
        smaller |E|.

        Raises
        ------
        ValueError
            A missing file, an empty list or a malformed row (naming the
            file, the row number and the field).
        """
        from iris_lab import eos

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"line list {path} does not exist")
        recs = []
        for lineno, row in enumerate(path.read_text().splitlines(), start=1):
            if not row.strip() or row.lstrip().startswith("#"):
                continue
            p = str(path.name)
            if len(row) < 97:
                raise ValueError(f"{p}: row {lineno}: too short ({len(row)} characters, need "
                                 f"at least 97 up to the damping columns): {row.rstrip()!r}")
            wl = _f(row[0:10], row, "wavelength", p, lineno) * 10.0
            log_gf = _f(row[10:17], row, "log_gf", p, lineno)
            code = row[17:23].strip()
            m = re.fullmatch(r"(\d+)\.(\d\d)", code)
            if not m:
                raise ValueError(f"{p}: row {lineno}: cannot read species code {code!r} "
                                 f"(expected e.g. 26.00): {row.rstrip()!r}")
            z, charge = int(m.group(1)), int(m.group(2))
            if not 1 <= z <= 92 or charge > z:
                raise ValueError(f"{p}: row {lineno}: impossible species code {code!r}")
            e1 = abs(_f(row[23:35], row, "E first level", p, lineno))
            j1 = _f(row[35:40], row, "J first level", p, lineno)
            lab1 = row[41:51]
            e2 = abs(_f(row[51:63], row, "E second level", p, lineno))
            j2 = _f(row[63:68], row, "J second level", p, lineno)
            lab2 = row[69:79]
            for name, j in (("J first level", j1), ("J second level", j2)):
                if j < 0 or abs(2 * j - round(2 * j)) > 1e-6:
                    raise ValueError(f"{p}: row {lineno}: {name} = {j} is not a non-negative "
                                     f"half-integer: {row.rstrip()!r}")
            g_rad = _f(row[79:85], row, "log_gamma_rad", p, lineno, default=0.0)
            g_stark = _f(row[85:91], row, "log_gamma_stark", p, lineno, default=0.0)
            # the vdW entry may be wider than its 6 columns when it packs ABO σ.α
            mv = re.match(r"\s*([+-]?\d*\.?\d*)", row[91:])
            g_vdw = _f(mv.group(1) if mv else "", row, "log_gamma_vdw", p, lineno, default=0.0)
            gl1 = gl2 = math.nan
            if len(row) >= 153:
                t1, t2 = row[143:148].strip(), row[148:153].strip()
                try:
                    v1 = int(t1) / 1000.0 if t1 else math.nan
                    v2 = int(t2) / 1000.0 if t2 else math.nan
                except ValueError:
                    raise ValueError(f"{p}: row {lineno}: cannot read the Landé factors from "
                                     f"{row[143:153]!r}: {row.rstrip()!r}") from None
                if not (v1 == 0 and v2 == 0):
                    gl1, gl2 = v1, v2
            if e2 < e1:
                e1, e2, j1, j2, lab1, lab2, gl1, gl2 = e2, e1, j2, j1, lab2, lab1, gl2, gl1
            recs.append((z, charge, wl, log_gf, e1, j1, lab1, e2, j2, lab2, g_rad, g_stark,
                         g_vdw, gl1, gl2))
        if not recs:
            raise ValueError(f"line list {path} contains no lines")

        cols = list(zip(*recs, strict=True))
        z = np.array(cols[0])
        ion = np.array(cols[1]) + 1
        wl_air = np.array(cols[2], dtype=float)
        wl_vac = air_to_vacuum(wl_air)
        e_low = np.array(cols[4]) / 8065.543937  # cm⁻¹ → eV
        e_up = np.array(cols[7]) / 8065.543937
        j_low, j_up = np.array(cols[5], dtype=float), np.array(cols[8], dtype=float)
        lab_low, lab_up = np.array(cols[6], dtype=object), np.array(cols[9], dtype=object)
        lab_low = np.array([s.strip() for s in lab_low])
        lab_up = np.array([s.strip() for s in lab_up])
        sl = np.array([parse_term(s) for s in lab_low]).reshape(-1, 2)
        su = np.array([parse_term(s) for s in lab_up]).reshape(-1, 2)
        g_list_low = np.array(cols[13], dtype=float)
        g_list_up = np.array(cols[14], dtype=float)
        g_low = np.where(np.isnan(g_list_low), lande_ls(j_low, sl[:, 1], sl[:, 0]), g_list_low)
        g_up = np.where(np.isnan(g_list_up), lande_ls(j_up, su[:, 1], su[:, 0]), g_list_up)
        g_low = np.where(j_low == 0, 0.0, g_low)
        g_up = np.where(j_up == 0, 0.0, g_up)
        polarizable = ~(np.isnan(g_low) | np.isnan(g_up))
        g_eff = np.where(polarizable, effective_lande(g_low, g_up, j_low, j_up), UNKNOWN_G_EFF)

        symbols = np.array([eos.element_data(int(zz)).symbol for zz in z])
        mass = np.array([eos.element_data(int(zz)).mass for zz in z])
        chi_ion = np.array([eos.element_data(int(zz)).chi[i - 1] if i <= 3 else math.nan
                            for zz, i in zip(z, ion, strict=True)])

        # damping ------------------------------------------------------------
        g_rad = np.array(cols[10], dtype=float)
        g_stark = np.array(cols[11], dtype=float)
        g_vdw_raw = np.array(cols[12], dtype=float)
        src = [[] for _ in recs]
        lam_cm = wl_vac * 1e-8
        rad_classical = np.log10(0.2223 / lam_cm**2)
        for k in np.flatnonzero(g_rad == 0):
            src[k].append("rad:classical")
        for k in np.flatnonzero(g_rad != 0):
            src[k].append("rad:list")
        log_rad = np.where(g_rad != 0, g_rad, rad_classical)
        # Cowley (1971): Γ_4/n_e = 1e-8 n_eff^5, n_eff of the upper level
        with np.errstate(invalid="ignore", divide="ignore"):
            n_eff2 = ion**2 * _E_RYD_EV / np.maximum(chi_ion - e_up, 1e-3)
        stark_cowley = np.log10(1e-8 * n_eff2**2.5)
        for k in range(len(recs)):
            src[k].append("stark:list" if g_stark[k] != 0 else "stark:cowley1971")
        log_stark = np.where(g_stark != 0, g_stark, stark_cowley)
        abo = g_vdw_raw > 20.0
        abo_sigma = np.where(abo, np.floor(g_vdw_raw), np.nan)
        abo_alpha = np.where(abo, g_vdw_raw - np.floor(g_vdw_raw), np.nan)
        unsold10k = _unsold_h(1e4, mass, ion, e_low, e_up, chi_ion)
        with np.errstate(divide="ignore", invalid="ignore"):
            enh = np.where((g_vdw_raw < 0) & ~abo, 10.0**g_vdw_raw / unsold10k, vdw_enhancement)
        log_vdw = np.where(abo, np.nan, np.where(g_vdw_raw < 0, g_vdw_raw,
                                                 np.log10(vdw_enhancement * unsold10k)))
        for k in range(len(recs)):
            if abo[k]:
                src[k].append("vdw:abo")
            elif g_vdw_raw[k] < 0:
                src[k].append("vdw:list(unsold-equivalent)")
            else:
                src[k].append(f"vdw:unsold*{vdw_enhancement:g}")

        return cls(
            element=symbols, ion=ion, wavelength_air=wl_air, wavelength_vacuum=wl_vac,
            log_gf=np.array(cols[3], dtype=float), e_low=e_low, e_up=e_up, j_low=j_low,
            j_up=j_up, lande_low=g_low, lande_up=g_up, g_eff=g_eff, polarizable=polarizable,
            log_gamma_rad=log_rad, log_gamma_stark=log_stark, log_gamma_vdw=log_vdw,
            abo_sigma=abo_sigma, abo_alpha=abo_alpha, vdw_enhancement=enh, mass=mass,
            chi_ion=chi_ion, label_low=lab_low, label_up=lab_up, s_low=sl[:, 0],
            l_low=sl[:, 1], s_up=su[:, 0], l_up=su[:, 1],
            damping_source=np.array([" ".join(s) for s in src]), source=str(path),
        )

    # ------------------------------------------------------------------ physics

    def zeeman_pattern(self) -> dict[str, dict[str, np.ndarray]]:
        """Anomalous Zeeman patterns from J and the Landé factors of both levels.

        Returns ``{"sigma_b": g, "pi": g, "sigma_r": g}`` where each ``g`` has
        ``shift`` (n_lines, n_comp) in Larmor units Δλ_B (positive = red;
        shift = g_l M_l − g_u M_u), ``strength`` (normalised to 1 per line and
        group, ∝ squared 3j symbols) and ``mask`` (valid components), padded
        to a common ``n_comp``. σ_b collects M_u − M_l = +1, σ_r −1, π 0.
        Lines that are not ``polarizable`` get the unsplit pattern (one
        component at 0 in each group); for the normal-triplet approximation
        use ḡ = ``g_eff`` instead.

        Example
        -------
        >>> z = LineList.shipped("fe6301_6302").zeeman_pattern()
        >>> float(z["sigma_r"]["shift"][1, 0]), int(z["pi"]["mask"][1].sum())  # 6302.5: J 1 → 0
        (2.487, 1)
        """
        return zeeman_pattern(self.j_low, self.j_up, self.lande_low, self.lande_up,
                              polarizable=self.polarizable)

    def damping(self, temperature, n_e, n_h_neutral, n_he_neutral=None):
        """Radiative, quadratic-Stark and van der Waals widths Γ [s⁻¹] (FWHM in angular
        frequency), torch float64, shape (..., n_lines).

        - Γ_rad = 10^``log_gamma_rad``;
        - Γ_Stark = 10^``log_gamma_stark`` n_e (no temperature scaling, as in
          Kurucz's SYNTHE and RH);
        - Γ_vdW: ABO lines 2 (4/π)^{α/2} Γ((4−α)/2) v₀ σ a₀² (v̄/v₀)^{1−α} n_H
          (Anstee & O'Mara 1995, v₀ = 10⁴ m/s, v̄ the mean relative speed to H);
          other lines ``vdw_enhancement`` × Unsöld (1955) 8.08 v̄^0.6 C₆^0.4 n_H
          (the form used by Lightweaver); He I perturbers add the Unsöld term
          with the He relative speed when ``n_he_neutral`` is given.

        Parameters
        ----------
        temperature, n_e, n_h_neutral, n_he_neutral : Tensor (...)
            K and cm⁻³.

        Returns
        -------
        dict with ``rad``, ``stark``, ``vdw`` and ``total`` tensors (..., n_lines).

        Example
        -------
        >>> import torch
        >>> d = LineList.shipped("fe6301_6302").damping(torch.tensor(5000.0),
        ...     torch.tensor(1e13), torch.tensor(1e17))
        >>> d["total"].shape
        torch.Size([2])
        """
        import torch

        t = torch.as_tensor(temperature, dtype=torch.float64).unsqueeze(-1)
        dev = t.device

        def arr(x):
            return torch.as_tensor(np.asarray(x, dtype=float), dtype=torch.float64, device=dev)

        ne = torch.as_tensor(n_e, dtype=torch.float64, device=dev).unsqueeze(-1)
        nh = torch.as_tensor(n_h_neutral, dtype=torch.float64, device=dev).unsqueeze(-1)
        rad = (10.0 ** arr(self.log_gamma_rad)).expand(torch.broadcast_shapes(
            t.shape, ne.shape, nh.shape)[:-1] + (len(self),))
        stark = 10.0 ** arr(self.log_gamma_stark) * ne
        mass = arr(self.mass)
        c625 = arr(_unsold_c6_04(self.ion, self.e_low, self.e_up, self.chi_ion))
        v_h = torch.sqrt(8.0 * _K * t / (math.pi * _AMU) * (1.0 / mass + 1.0 / 1.008))
        unsold = 8.08 * v_h**0.6 * c625 * nh
        is_abo = arr(~np.isnan(self.abo_sigma)) > 0
        sig = arr(np.nan_to_num(self.abo_sigma)) * _A0**2
        alp = arr(np.nan_to_num(self.abo_alpha))
        v0 = 1e6
        gam = torch.exp(torch.lgamma((4.0 - alp) / 2.0))
        abo = 2.0 * (4.0 / math.pi) ** (alp / 2.0) * gam * v0 * sig * (v_h / v0) ** (1.0 - alp) * nh
        vdw = torch.where(is_abo, abo, arr(self.vdw_enhancement) * unsold)
        if n_he_neutral is not None:
            nhe = torch.as_tensor(n_he_neutral, dtype=torch.float64, device=dev).unsqueeze(-1)
            v_he = torch.sqrt(8.0 * _K * t / (math.pi * _AMU) * (1.0 / mass + 1.0 / 4.0026))
            enh = torch.where(is_abo, torch.ones_like(mass), arr(self.vdw_enhancement))
            vdw = vdw + enh * 8.08 * v_he**0.6 * c625 * nhe
        return {"rad": rad, "stark": stark, "vdw": vdw, "total": rad + stark + vdw}


def _unsold_c6_04(ion, e_low, e_up, chi_ion) -> np.ndarray:
    """C₆^0.4 of Unsöld's approximation [CGS], as in Lightweaver's VdwUnsold.

    C₆ = 2.5 e² α_H 2π (Z a₀)² / h × Δ⟨r²⟩, Δ⟨r²⟩ = [E_R/(χ−E_u)]² − [E_R/(χ−E_l)]²
    (in units of (Z a₀)²), Z the charge seen by the optical electron (= ion).
    """
    ion, e_low, e_up, chi_ion = (np.asarray(v, dtype=float) for v in (ion, e_low, e_up, chi_ion))
    with np.errstate(divide="ignore", invalid="ignore"):
        d_r = (_E_RYD_EV / np.maximum(chi_ion - e_up, 1e-3)) ** 2 \
            - (_E_RYD_EV / np.maximum(chi_ion - e_low, 1e-3)) ** 2
    c6 = 2.5 * _E_ESU**2 * _ALPHA_H * 2.0 * math.pi * (ion * _A0) ** 2 / _H * np.abs(d_r)
    return c6**0.4


def _unsold_h(t: float, mass, ion, e_low, e_up, chi_ion) -> np.ndarray:
    """Unsöld Γ_vdW per H atom [s⁻¹ cm³] at temperature t."""
    v = np.sqrt(8.0 * _K * t / (math.pi * _AMU) * (1.0 / np.asarray(mass) + 1.0 / 1.008))
    return 8.08 * v**0.6 * _unsold_c6_04(ion, e_low, e_up, chi_ion)
