"""The torch LTE engine against Lightweaver (Osborne & Milić 2021) in LTE.

Each comparison gives both codes the same problem: the same atmosphere
(heights, T, v_turb, n_e, n_H, B), the same lines (Lightweaver's atomic data
read back with :func:`line_data_from_atoms`, damping converted exactly) and
the same LTE level populations (Lightweaver's partition sums over the model
atom). What differs is the background continuum: ours is H⁻, H, Thomson and
Rayleigh (:mod:`iris_lab.opacity`) with scattering counted as absorption;
Lightweaver adds metal bound-free edges and treats scattering with the mean
intensity J. In FAL-C at log τ500 = -1.7 … 0.6 our κ is 0.3-1.8 % above
Lightweaver's at 4016, 5000 and 6301 Å (measured when writing this test), so
the continuum intensities agree to ~1.5 % and normalised profiles to ~0.1-0.3 %.

Tolerances are the issue's: Stokes I/I_c ≤ 1 % rms, Q, U, V ≤ 2 % of max|V|
rms, continuum at 5000 Å within 2 %.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from iris_lab.atmosphere import Atmosphere
from iris_lab.synthesis.lte import LTESynthesizer, continuum_intensity

pytestmark = pytest.mark.nlte

WAVELENGTHS = np.linspace(6300.8, 6303.2, 161)      # air, Å
FIELD = {"b_field": 1000.0, "inclination": 1.0, "azimuth": 0.3}


def _photosphere(scale: float) -> Atmosphere:
    """FAL-C's T(log τ500) below log τ = -5.5 scaled by ``scale``, in hydrostatic
    equilibrium from :mod:`iris_lab.eos` (heights and densities for both codes)."""
    from iris_lab import eos

    falc = Atmosphere.reference("falc")
    keep = falc.log_tau >= -5.5
    log_tau = falc.log_tau[keep]
    temperature = np.maximum(falc.temperature[keep] * scale, 2800.0)
    v_turb = falc.v_turb[keep]
    he = eos.hydrostatic_equilibrium(torch.tensor(log_tau), torch.tensor(temperature),
                                     torch.tensor(v_turb))
    return Atmosphere(height=he["height"].numpy(), log_tau=log_tau, temperature=temperature,
                      v_turb=v_turb, n_e=he["n_e"].numpy(), n_h=he["n_h"].numpy(),
                      scale="height")


ATMOSPHERES = {
    "falc": lambda: Atmosphere.reference("falc"),
    "cool": lambda: _photosphere(0.72),      # umbra-like: T(τ=1) ≈ 4700 K
    "hot": lambda: _photosphere(1.10),
}


def _ours(atmosphere, line_data, populations, wavelengths, medium="air"):
    synth = LTESynthesizer(line_data, wavelengths, populations=populations, medium=medium)
    names = ("height", "temperature", "v_los", "v_turb", "b_field", "inclination",
             "azimuth", "n_e", "n_h")
    fields = {n: torch.tensor(v) for n, v in atmosphere.fields().items() if n in names}
    with torch.no_grad():
        return synth.stokes(fields).numpy()


@pytest.fixture(scope="module")
def fe_results():
    """Both codes on the three atmospheres, with B = 0 and with 1 kG inclined."""
    from iris_lab.synthesis import lightweaver_lte as lwl

    warnings.filterwarnings("ignore", module="lightweaver")
    out = {}
    for name, make in ATMOSPHERES.items():
        for magnetic in (False, True):
            atm = make()
            if magnetic:
                atm = atm.replace(**{k: np.full(atm.n_depth, v) for k, v in FIELD.items()})
            ref = lwl.run_lightweaver(atm, "Fe23", WAVELENGTHS, stokes=magnetic)
            atoms = ref["atoms"]
            lines = [ln for ln in atoms[0].lines if 6300.0 < ln.lambda0 * 10 < 6310.0]
            data = lwl.line_data_from_atoms(atoms, lines)
            pops = lwl.lightweaver_populations(ref["eq_pops"], data, atoms, atm.temperature)
            ours = _ours(atm, data, pops, WAVELENGTHS)
            theirs = ref["stokes"]
            if not magnetic:
                theirs = np.concatenate([theirs, np.zeros((3, theirs.shape[-1]))])
            out[name, magnetic] = (ours, theirs)
    return out


@pytest.mark.parametrize("name", list(ATMOSPHERES))
@pytest.mark.parametrize("magnetic", [False, True])
def test_fe6301_6302_stokes_match_lightweaver(fe_results, name, magnetic):
    ours, theirs = fe_results[name, magnetic]
    # normalise each code by its own continuum (first wavelength is line-free)
    a, b = ours / ours[0, 0], theirs / theirs[0, 0]
    rms_i = np.sqrt(np.mean((a[0] - b[0]) ** 2))
    assert rms_i <= 0.01, f"{name} B={magnetic}: Stokes I rms {rms_i:.4f} > 1 %"
    assert b[0].min() < 0.9, "the lines must be present in the reference"
    if magnetic:
        vmax = np.abs(b[3]).max()
        assert vmax > 0.01
        for k in (1, 2, 3):
            rms = np.sqrt(np.mean((a[k] - b[k]) ** 2)) / vmax
            assert rms <= 0.02, f"{name}: Stokes {'IQUV'[k]} rms {rms:.4f} of max|V| > 2 %"
    else:
        assert np.abs(a[1:]).max() == 0.0


def test_continuum_5000_matches_lightweaver():
    from iris_lab.synthesis import lightweaver_lte as lwl

    falc = Atmosphere.reference("falc")
    wavelengths = np.array([4999.0, 5000.0, 5001.0])
    ref = lwl.run_lightweaver(falc, "Fe23", wavelengths, stokes=False, medium="vacuum")
    ours = continuum_intensity(torch.tensor(wavelengths)).numpy()
    ratio = ours[1] / ref["stokes"][0, 1]
    # 2 %: the tolerance; measured -1.5 % (our κ is ~1-1.8 % higher, see top)
    assert abs(ratio - 1.0) <= 0.02, f"I_c(5000 Å) ours / Lightweaver = {ratio:.4f}"


def test_4015_4017_window_matches_lightweaver():
    """The 18 blended lines of the shipped Kurucz list, FAL-C, Stokes I.

    Lightweaver gets model atoms built from the list (one per element: the
    lines' levels plus the next stage's ground level, Kurucz-scaled damping);
    our engine reads the same atoms back. Lightweaver's LTE populations of
    such small atoms use partition sums over their few levels; both codes use
    those populations here, so this checks opacities, profiles and transfer.
    """
    from iris_lab.atomic import LineList
    from iris_lab.synthesis import lightweaver_lte as lwl

    # a 1 km/s downflow also checks the velocity sign convention of the adapter
    falc = Atmosphere.reference("falc").replace(v_los=np.full(82, 1.0e5))
    wavelengths = np.linspace(4015.0, 4017.0, 301)
    atoms = lwl.kurucz_model_atoms(LineList.shipped("4015_4017"))
    ref = lwl.run_lightweaver(falc, atoms, wavelengths, stokes=False)
    data = lwl.line_data_from_atoms(ref["atoms"])
    assert len(data) == 18
    pops = lwl.lightweaver_populations(ref["eq_pops"], data, ref["atoms"], falc.temperature)
    ours = _ours(falc, data, pops, wavelengths)[0]
    theirs = ref["stokes"][0]
    a, b = ours / ours.max(), theirs / theirs.max()
    assert b.min() < 0.5
    rms = np.sqrt(np.mean((a - b) ** 2))
    assert rms <= 0.01, f"4015-4017 Å Stokes I rms {rms:.4f} > 1 %"
