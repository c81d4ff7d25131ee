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


# ---------------------------------------------------------------------------
# Polarized (Stokes IQUV) path
SMALL = (11, 12, 13, 14, 15)


def _magnetic(fields: dict[str, torch.Tensor], b_field, inclination, azimuth
              ) -> dict[str, torch.Tensor]:
    """``fields`` (n, D) with per-pixel B [G], γ, χ [rad] (B decreasing with height
    scaled to the given value at the bottom)."""
    n, depth = fields["temperature"].shape
    profile = torch.linspace(0.6, 1.0, depth, dtype=torch.float64)
    col = lambda x: torch.as_tensor(x, dtype=torch.float64).reshape(n, 1)  # noqa: E731
    return {**fields, "b_field": col(b_field) * profile,
            "inclination": col(inclination).expand(n, depth),
            "azimuth": col(azimuth).expand(n, depth)}


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |Δ| over every Stokes parameter, relative to Stokes I (…, 4, λ)."""
    return float(((ours - reference).abs() / reference[..., :1, :].abs()).max())


def _pair(lines, grid, **kw) -> tuple[LTESynthesizer, LTESynthesizer]:
    return (LTESynthesizer(lines, grid, fused=False, **kw), LTESynthesizer(lines, grid, **kw))


@pytest.mark.parametrize("cutoff", [None, 1e-4])
def test_fused_iquv_equals_torch_path_geometric(cutoff):
    """Height scale with densities: B = 0 … 3 kG, γ near 0, π/2, π, χ ≠ 0,
    velocities, per-pixel log gf offsets and line shifts."""
    lines = LineList.shipped("4015_4017").select(list(SMALL))
    grid = np.linspace(4016.0, 4016.9, 61)
    f = _magnetic(_fields(5, seed=3), [0.0, 3000.0, 800.0, 3000.0, 1500.0],
                  [1e-3, np.pi / 2, np.pi - 1e-3, 0.7, 2.3], [0.0, 0.4, 1.2, 2.9, -0.8])
    rng = np.random.default_rng(4)
    offset = torch.tensor(rng.normal(0.0, 0.3, (5, len(SMALL))))
    shift = torch.tensor(rng.normal(0.0, 0.01, (5, len(SMALL))))
    torch_path, compiled = _pair(lines, grid, line_cutoff=cutoff)
    with torch.no_grad():
        reference = torch_path.stokes(f, log_gf_offset=offset, dlambda=shift)
        ours = compiled.stokes(f, log_gf_offset=offset, dlambda=shift)
    assert ours.shape == (5, 4, 61)
    assert _relative(ours, reference) < 1e-10
    # a wrong sign or factor of Q, U or V would show: all are far above 1e-10 of I
    for s in (1, 2, 3):
        assert float((reference[1:, s].abs() / reference[1:, 0]).max()) > 1e-3


def test_fused_iquv_equals_torch_path_log_tau_and_batch_dims():
    """log τ500 scale (hydrostatic equilibrium), batch shape (2, 3), μ < 1."""
    lines = LineList.shipped("4015_4017").select(list(SMALL))
    grid = np.linspace(4016.2, 4016.7, 28)
    depth = 24
    log_tau = torch.linspace(-3.6, 1.0, depth, dtype=torch.float64)
    t0 = torch.tensor(np.interp(log_tau.numpy(), FALC.log_tau, FALC.temperature))
    rng = np.random.default_rng(5)
    f = {"log_tau": log_tau.expand(6, depth),
         "temperature": t0 * torch.tensor(1.0 + 0.03 * rng.standard_normal((6, 1))),
         "v_los": torch.tensor(rng.uniform(-3e5, 3e5, (6, depth))),
         "v_turb": torch.tensor(rng.uniform(0.0, 2e5, (6, 1))).expand(6, depth)}
    f = _magnetic(f, [0.0, 3000.0, 2000.0, 500.0, 3000.0, 1000.0],
                  [0.5, 1e-4, np.pi / 2, 2.0, np.pi - 1e-4, 1.0],
                  [0.3, 0.0, 1.0, 2.0, 3.0, -1.0])
    f = {k: v.reshape(2, 3, depth) for k, v in f.items()}
    shift = torch.tensor(rng.normal(0.0, 0.01, (2, 3, len(SMALL))))
    torch_path, compiled = _pair(lines, grid, mu=0.6)
    with torch.no_grad():
        reference = torch_path.stokes(f, dlambda=shift)
        ours = compiled.stokes(f, dlambda=shift)
    assert ours.shape == (2, 3, 4, 28)
    assert _relative(ours, reference) < 1e-10


def test_fused_delo_bezier_equals_torch_strong_polarization():
    """Random ratios up to 0.6 (strong dichroism and dispersion), steps on
    both sides of the series threshold, non-monotonic sources."""
    rng = np.random.default_rng(6)
    steps = 10.0 ** rng.uniform(-4.0, 0.7, (30, 40))
    tau = torch.tensor(np.cumsum(steps, axis=-1) + 1e-6)
    planck = torch.tensor(1.0 + rng.uniform(-0.3, 1.0, (30, 40)).cumsum(-1))
    ratios = [torch.tensor(rng.uniform(-0.35, 0.35, (30, 40))) for _ in range(6)]
    reference = formal.delo_bezier(tau, planck, ratios)
    ours = fused.delo_bezier(tau, planck, ratios)
    assert ours.shape == (30, 4)
    assert float(((ours - reference).abs() / reference[:, :1]).max()) < 1e-10
    # the comparison is sensitive: a sign error in η_V would be caught
    flipped = fused.delo_bezier(tau, planck, [*ratios[:2], -ratios[2], *ratios[3:]])
    assert float(((flipped - reference).abs() / reference[:, :1]).max()) > 1e-3


def test_polarized_derivatives_take_the_torch_path(monkeypatch):
    """Response functions (torch.func.jvp) and autograd never call the
    compiled polarized kernels, and agree with the compiled forward."""
    lines = LineList.shipped("4015_4017").select([12])
    synth = LTESynthesizer(lines, np.linspace(4016.3, 4016.55, 11))
    f = _magnetic(_fields(1), [1500.0], [0.8], [0.5])
    with torch.no_grad():
        plain = synth.stokes(f)

    def refuse(*args, **kwargs):
        raise AssertionError("compiled kernel called where a derivative is wanted")

    monkeypatch.setattr(fused, "polarized_lines", refuse)
    monkeypatch.setattr(fused, "delo_bezier", refuse)
    response = synth.response_functions(f, ("b_field",))["b_field"]
    assert response.shape == (1, 4, 11, f["temperature"].shape[-1])
    assert float(response[:, 3].abs().max()) > 0.0
    b = f["b_field"].clone().requires_grad_()
    stokes = synth.stokes({**f, "b_field": b})
    stokes[..., 3, :].sum().backward()
    assert b.grad is not None and float(b.grad.abs().max()) > 0.0
    assert _relative(stokes.detach(), plain) < 1e-10


def test_duplicate_atmospheres_share_one_hydrostatic_equilibrium(monkeypatch):
    """No-grad CPU batches: rows with the same (log τ, T, v_turb) (finite-difference
    Jacobian columns of other parameters) get one hydrostatic equilibrium, and
    the spectra equal the torch path's (which solves every row)."""
    from iris_lab import eos

    lines = LineList.shipped("4015_4017").select([12])
    grid = np.linspace(4016.3, 4016.55, 11)
    depth = 20
    log_tau = torch.linspace(-3.6, 1.0, depth, dtype=torch.float64)
    t0 = torch.tensor(np.interp(log_tau.numpy(), FALC.log_tau, FALC.temperature))
    temperature = torch.stack([t0, t0, t0 * 1.01, t0, t0 * 1.01])
    f = {"log_tau": log_tau.expand(5, depth), "temperature": temperature}
    f = _magnetic(f, [1000.0, 1500.0, 1000.0, 1000.0, 1000.0], [0.5] * 5, [0.2] * 5)
    rows = []
    solve = eos.hydrostatic_equilibrium

    def counting(log_tau, *args, **kwargs):
        rows.append(log_tau.reshape(-1, log_tau.shape[-1]).shape[0])
        return solve(log_tau, *args, **kwargs)

    monkeypatch.setattr(eos, "hydrostatic_equilibrium", counting)
    torch_path, compiled = _pair(lines, grid)
    with torch.no_grad():
        ours = compiled.stokes(f)
        assert rows == [2]
        reference = torch_path.stokes(f)
        assert rows == [2, 5]
    assert _relative(ours, reference) < 1e-10


@pytest.mark.parametrize("polarized", [True, False])
def test_threaded_kernels_give_the_single_thread_result_bit_for_bit(monkeypatch, polarized):
    """Rows split over threads (``torch.get_num_threads()``) and computed in one
    thread: the same arithmetic per row, so the same bits; and every row set
    (a missed or doubled block would leave zeros or garbage)."""
    lines = LineList.shipped("4015_4017").select(list(SMALL))
    grid = np.linspace(4016.0, 4016.9, 61)
    n = 13  # blocks of 4 or 5 rows: uneven splits
    f = _magnetic(_fields(n, seed=8), list(np.linspace(0.0, 3000.0, n)),
                  list(np.linspace(0.1, 3.0, n)), list(np.linspace(-1.0, 2.0, n)))
    if not polarized:
        f = {k: v for k, v in f.items() if k in ("height", "temperature", "n_e", "n_h",
                                                 "v_los", "v_turb")}
    synth = LTESynthesizer(lines, grid, polarized=polarized)
    calls = []
    real = fused._in_threads

    def counting(kernel, n_rows, *args):
        calls.append(min(torch.get_num_threads(), n_rows // fused._MIN_ROWS_PER_THREAD))
        real(kernel, n_rows, *args)

    monkeypatch.setattr(fused, "_in_threads", counting)
    kept = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            single = synth.stokes(f)
        torch.set_num_threads(3)
        with torch.no_grad():
            threaded = synth.stokes(f)
    finally:
        torch.set_num_threads(kept)
    assert 3 in calls and 1 in calls  # both paths ran
    assert torch.equal(single, threaded)
    assert bool((threaded[:, 0] > 0).all())


def test_rows_sharing_line_profiles_are_grouped_and_equal_the_torch_path(monkeypatch):
    """Copies of pixels that differ only in the field angles or in a line's log gf
    (the finite-difference Jacobian columns of γ, χ and log gf) share one profile
    evaluation per group in the compiled kernel and still match the torch path."""
    lines = LineList.shipped("4015_4017").select(list(SMALL))
    grid = np.linspace(4016.0, 4016.9, 61)
    base = _magnetic(_fields(2, seed=9), [1500.0, 2500.0], [0.6, 2.0], [0.3, -1.1])
    copies = 4
    f = {k: v.repeat_interleave(copies, 0).clone() for k, v in base.items()}
    f["inclination"][1::copies] += 0.1            # angle columns
    f["azimuth"][2::copies] -= 0.2
    offset = torch.zeros(2 * copies, len(SMALL), dtype=torch.float64)
    offset[3::copies, 2] = 0.05                   # a log gf column
    sizes = []
    real = fused._profile_groups

    def recording(*arrays):
        order, starts = real(*arrays)
        sizes.append(np.diff(starts).tolist())
        return order, starts

    monkeypatch.setattr(fused, "_profile_groups", recording)
    torch_path, compiled = _pair(lines, grid)
    with torch.no_grad():
        reference = torch_path.stokes(f, log_gf_offset=offset)
        ours = compiled.stokes(f, log_gf_offset=offset)
    assert sizes == [[copies, copies]]
    assert _relative(ours, reference) < 1e-10
    # the copies differ where they should: angles change Q, U; log gf changes I
    assert float((ours[1] - ours[0]).abs()[1:3].max()) > 1e-4 * float(ours[0, 0].max())
    assert float((ours[3] - ours[0]).abs()[0].max()) > 1e-4 * float(ours[0, 0].max())
