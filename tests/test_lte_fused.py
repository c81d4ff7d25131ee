"""The compiled (numba) forward path of the LTE engine equals the torch path.

:mod:`iris_lab.synthesis.fused` replaces the per-line torch kernels and the
unpolarized formal solver where no derivative is wanted; both paths must give
the same spectra to rounding (1e-10 relative), and the torch path must still
run wherever a derivative is taken.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iris_lab.atmosphere import Atmosphere
from iris_lab.atomic import LineList
from iris_lab.synthesis import formal, fused
from iris_lab.synthesis.lte import LTESynthesizer

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")

FALC = Atmosphere.reference("falc")
PHOTOSPHERE = FALC.log_tau >= -5.0


def _fields(n: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` FAL-C photospheres with perturbed T, v_los and v_turb."""
    rng = np.random.default_rng(seed)
    base = {k: torch.tensor(FALC.fields()[k][PHOTOSPHERE])
            for k in ("height", "temperature", "n_e", "n_h")}
    depth = base["temperature"].numel()
    out = {k: v.expand(n, depth).clone() for k, v in base.items()}
    out["temperature"] = out["temperature"] * torch.tensor(
        1.0 + 0.03 * rng.standard_normal((n, 1)))
    out["v_los"] = torch.tensor(rng.uniform(-2e5, 2e5, (n, 1))).expand(n, depth)
    out["v_turb"] = torch.tensor(rng.uniform(0.0, 2e5, (n, 1))).expand(n, depth)
    return out


@pytest.mark.parametrize("cutoff", [None, 1e-4])
def test_fused_stokes_i_equals_torch_path(cutoff):
    lines = LineList.shipped("4015_4017")
    grid = np.linspace(4015.0, 4017.0, 401)
    f = _fields()
    torch_path = LTESynthesizer(lines, grid, polarized=False, line_cutoff=cutoff, fused=False)
    compiled = LTESynthesizer(lines, grid, polarized=False, line_cutoff=cutoff)
    with torch.no_grad():
        eta_t = torch_path.propagation(f)["eta_i"]
        eta_f = compiled.propagation(f)["eta_i"]
        i_t = torch_path.stokes(f)
        i_f = compiled.stokes(f)
    assert float(((eta_f - eta_t).abs() / eta_t).max()) < 1e-10
    assert float(((i_f - i_t).abs() / i_t[:, 0].abs().unsqueeze(-2)).max()) < 1e-10
    assert i_f.shape == (3, 4, 401)
    assert float(i_f[:, 1:].abs().max()) == 0.0


def test_fused_formal_solver_equals_torch_on_small_and_large_steps():
    """Rows mixing steps below and above the series threshold, random sources."""
    rng = np.random.default_rng(1)
    steps = 10.0 ** rng.uniform(-4.0, 0.7, (50, 40))
    tau = torch.tensor(np.cumsum(steps, axis=-1) + 1e-6)
    source = torch.tensor(1.0 + rng.uniform(0.0, 1.0, (50, 40)).cumsum(-1))
    reference = formal.bezier_intensity(tau, source)
    ours = fused.bezier_intensity(tau, source)
    assert float(((ours - reference).abs() / reference).max()) < 1e-10


def test_fused_add_lines_matches_voigt_profile_near_and_far():
    """One line across the core/far-wing switch: H from the torch profiles."""
    from iris_lab.synthesis.profiles import voigt_faraday

    grid = torch.linspace(-12.0, 12.0, 241, dtype=torch.float64)
    a = torch.tensor([[1e-3, 0.05, 1.0, 4.0]], dtype=torch.float64)
    one = torch.ones_like(a)
    kappa = fused.add_lines(torch.zeros(241, 4, dtype=torch.float64), grid, 0.0 * one, one,
                            a, one, [(0, 241)])
    h, _ = voigt_faraday(a, grid[:, None], faraday=False)
    assert float(((kappa - h).abs() / h).max()) < 1e-12


def test_torch_path_where_derivatives_are_wanted():
    """grad mode, torch.func transforms and forward AD are never fused."""
    x = torch.ones(4, dtype=torch.float64)
    assert fused.usable(x)
    assert not fused.usable(x.clone().requires_grad_())
    assert not fused.usable(x.float())
    seen = []
    torch.func.jvp(lambda y: seen.append(fused.usable(y)) or y, (x,), (x,))
    torch.func.vmap(lambda y: seen.append(fused.usable(y)) or y)(x[None])
    assert seen == [False, False]
    with torch.no_grad():
        assert fused.usable(x.clone().requires_grad_())


def test_gradient_through_the_engine_still_flows():
    """Stokes I with requires_grad takes the torch path and differentiates."""
    lines = LineList.shipped("4015_4017")
    synth = LTESynthesizer(lines, np.linspace(4015.5, 4016.0, 41), polarized=False,
                           line_cutoff=1e-4)
    f = _fields(1)
    t = f["temperature"].clone().requires_grad_()
    intensity = synth.stokes({**f, "temperature": t})[..., 0, :].sum()
    intensity.backward()
    assert t.grad is not None and float(t.grad.abs().max()) > 0.0
    with torch.no_grad():
        plain = synth.stokes(f)[..., 0, :].sum()
    assert float(abs(plain - intensity.detach()) / plain) < 1e-10


def test_without_numba_the_torch_path_runs(monkeypatch):
    """``fused.available() is False`` (no numba) → torch kernels, same spectra."""
    lines = LineList.shipped("4015_4017")
    synth = LTESynthesizer(lines, np.linspace(4015.5, 4016.0, 41), polarized=False)
    f = _fields(2)
    with torch.no_grad():
        compiled = synth.stokes(f)
        monkeypatch.setattr(fused, "available", lambda: False)
        assert not synth._fused(f["temperature"])
        plain = synth.stokes(f)
    assert float((compiled - plain).abs().max() / plain.abs().max()) < 1e-10
