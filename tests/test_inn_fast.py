"""The inference-only FlareINN evaluator and percentiles agree with FrEIA / torch.quantile."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import xarray as xr

from iris_lab.methods.inn import FlareINN
from iris_lab.methods.inn_fast import (
    FrozenINN,
    _oddeven_merge_pairs,
    coupling_polynomial,
    draw_percentiles,
    load_kernels,
    torch_sgemm,
)

DL_HA = np.round(np.linspace(-1.4, 1.4, 29), 3)
DL_CA = np.round(np.linspace(-1.2, 1.2, 25), 3)
N_HEIGHT = 10


@pytest.fixture(scope="module")
def inn() -> FlareINN:
    """A small random-initialised FlareINN whose couplings are far from the identity."""
    net = FlareINN(width=96, hidden=48, n_latent=40, n_blocks=4, seed=3, progress=False)
    net.n_height_, net.n_halpha_, net.n_ca8542_ = N_HEIGHT, DL_HA.size, DL_CA.size
    net.heights_ = np.linspace(10e8, 0.0, N_HEIGHT)
    net.dl_halpha_, net.dl_ca8542_ = DL_HA, DL_CA
    gen = torch.Generator().manual_seed(7)
    net.x_mean_ = torch.randn(3 * N_HEIGHT, generator=gen) + 5.0
    net.x_std_ = torch.rand(3 * N_HEIGHT, generator=gen) + 0.5
    net._build()
    with torch.no_grad():  # FrEIA-style init leaves the last layers ~0: make them matter
        for p in net.net_.parameters():
            if p.requires_grad:
                p.add_(0.08 * torch.randn(p.shape, generator=gen))
    net.net_.eval()
    return net


@pytest.mark.parametrize("use_kernels,polynomial,driver", [
    (True, True, True), (True, False, True), (True, True, False), (True, False, False),
    (False, False, False)])
def test_frozen_matches_freia_both_directions(inn, use_kernels, polynomial, driver):
    fast = FrozenINN.from_sequence(inn.net_, use_kernels=use_kernels, chunk_rows=300,
                                   polynomial=polynomial, driver=driver)
    if use_kernels and load_kernels() is None:
        pytest.skip("no C compiler for the fused kernels")
    if driver and torch_sgemm() is None:
        pytest.skip("torch's library exports no sgemm_ here")
    assert fast.uses_kernels == use_kernels
    assert fast.uses_driver == driver
    if polynomial:  # the polynomial kernel is the one that runs for this clamp
        assert all(coupling_polynomial(c.clamp) is not None for c in fast.couplings)
    x = torch.randn(1000, inn.width, generator=torch.Generator().manual_seed(0))
    net64 = copy.deepcopy(inn.net_).double()
    for rev in (False, True):
        with torch.no_grad():
            ref64, _ = net64(x.double(), rev=rev, jac=False)
            ref32, _ = inn.net_(x, rev=rev, jac=False)
        got = fast.reverse(x) if rev else fast.forward(x)
        assert ref64.abs().max() > 5.0  # not a near-identity network
        # as close to the float64 result as FrEIA's own float32 evaluation is
        err_freia = float((ref32.double() - ref64).abs().max())
        err_fast = float((got.double() - ref64).abs().max())
        assert err_fast <= 3.0 * err_freia + 1e-6 * float(ref64.abs().max()), (rev, err_fast,
                                                                                err_freia)
        np.testing.assert_allclose(got.numpy(), ref32.numpy(), rtol=1e-4,
                                   atol=1e-4 * float(ref64.abs().max()))
    # round trip and in-place evaluation
    buf = x.clone()
    back = fast.forward(fast.reverse(buf, out=buf), out=buf)
    assert back.data_ptr() == buf.data_ptr()
    np.testing.assert_allclose(back.numpy(), x.numpy(), atol=1e-4)


def test_frozen_rejects_what_it_cannot_evaluate(inn):
    from FrEIA.framework import SequenceINN
    from FrEIA.modules import GLOWCouplingBlock

    def sub(din, dout):
        return torch.nn.Sequential(torch.nn.Linear(din, 8), torch.nn.Tanh(),
                                   torch.nn.Linear(8, dout))

    net = SequenceINN(8)
    net.append(GLOWCouplingBlock, subnet_constructor=sub)
    with pytest.raises(TypeError, match="Tanh"):
        FrozenINN.from_sequence(net)
    net = SequenceINN(8)
    net.append(GLOWCouplingBlock, subnet_constructor=lambda i, o: torch.nn.Linear(i, o),
               clamp_activation="TANH")
    with pytest.raises(TypeError, match="ATAN"):
        FrozenINN.from_sequence(net)
    with pytest.raises(ValueError, match="rows"):
        FrozenINN.from_sequence(inn.net_).reverse(torch.zeros(3, inn.width + 2))


def test_sample_and_round_trip_fast_path_match_freia(inn):
    y = torch.rand(5, inn.n_y, generator=torch.Generator().manual_seed(1)) + 0.1
    draws = {}
    for fast in (True, False):
        gen = torch.Generator().manual_seed(4)
        draws[fast] = inn.sample_x(y, 37, generator=gen, max_rows=100, fast=fast)
    assert draws[True].shape == (5, 37, inn.n_x)
    np.testing.assert_allclose(draws[True].numpy(), draws[False].numpy(), rtol=1e-4,
                               atol=1e-4 * float(draws[False].abs().max()))
    xs = inn._scale(draws[False].reshape(-1, inn.n_x))
    np.testing.assert_allclose(inn._forward_y(xs, 50, fast=True).numpy(),
                               inn._forward_y(xs, 50, fast=False).numpy(), rtol=1e-4, atol=1e-4)
    # the public sample() converts to CGS as x_to_atmosphere does
    out = inn.sample(y.numpy(), 6, seed=2)
    assert out["n_e"].shape == (5, 6, N_HEIGHT) and out["n_e"].dtype == np.float32
    assert np.all(out["temperature"] > 0)


def test_posterior_summary_fast_path_matches_quantile(inn):
    rng = np.random.default_rng(0)
    ha = 1.0 + rng.random((3, 4, DL_HA.size))
    ca = 1.0 + rng.random((3, 4, DL_CA.size))
    ha[0, 0, 2] = np.nan
    cube = xr.Dataset({"halpha": (("y", "x", "dl_halpha"), ha),
                       "ca8542": (("y", "x", "dl_ca8542"), ca)},
                      coords={"dl_halpha": DL_HA, "dl_ca8542": DL_CA})
    res = {fast: inn.posterior_summary(cube, 50, seed=3, max_rows=200, fast=fast)
           for fast in (True, False)}
    for name in ("temperature", "n_e_p16", "v_los_p84", "round_trip_rms"):
        a, b = res[True][name].values, res[False][name].values
        assert np.array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.nanmax(np.abs(b)))
    assert np.array_equal(res[True]["quality"].values, res[False]["quality"].values)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33, 200])
def test_draw_percentiles_equal_torch_quantile(n):
    gen = torch.Generator().manual_seed(n)
    draws = torch.randn(4, n, 19, generator=gen)
    draws[1, n // 2, 3] = float("nan")
    draws[2, :, 5] = 1.5  # ties
    q = torch.tensor([0.0, 0.16, 0.5, 0.84, 1.0])
    ref = torch.quantile(draws, q, dim=1)
    for lib in (load_kernels(), None):
        got = draw_percentiles(draws.clone(), q, lib=lib)
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
        assert torch.isnan(got[:, 1, 3]).all() and not torch.isnan(got[:, 0]).any()


@pytest.mark.parametrize("n", [5, 8, 13, 32, 100])
def test_oddeven_merge_network_sorts(n):
    ci, cj = _oddeven_merge_pairs(n)
    assert all(0 <= i < j < n for i, j in zip(ci, cj, strict=True))
    rng = np.random.default_rng(n)
    for _ in range(50):
        a = rng.integers(0, 4, n)  # many ties
        b = a.copy()
        for i, j in zip(ci, cj, strict=True):
            if b[i] > b[j]:
                b[i], b[j] = b[j], b[i]
        assert np.array_equal(b, np.sort(a))


@pytest.mark.parametrize("use_kernels", [True, False])
def test_x_to_atmosphere_kernel_and_torch_paths_match_float64(monkeypatch, use_kernels):
    from iris_lab.methods.inn import x_to_atmosphere

    if use_kernels and load_kernels() is None:
        pytest.skip("no C compiler for the fused kernels")
    if not use_kernels:
        monkeypatch.setenv("IRIS_LAB_NO_KERNELS", "1")
    rng = np.random.default_rng(5)
    nh = 7
    x = np.concatenate([rng.uniform(8, 16, (2, 3, nh)), rng.uniform(3.3, 7.5, (2, 3, nh)),
                        rng.uniform(-2.5, 2.5, (2, 3, nh))], axis=-1).astype(np.float32)
    x[0, 1, 2] = np.nan
    x[1, 2, 2 * nh + 1] = 0.0
    got = x_to_atmosphere(x, nh)
    x64 = x.astype(np.float64)
    ref = {"n_e": 10.0 ** x64[..., :nh], "temperature": 10.0 ** x64[..., nh:2 * nh],
           "v_los": np.sign(x64[..., 2 * nh:]) * (10.0 ** np.abs(x64[..., 2 * nh:]) - 1) * 1e5}
    for k, r in ref.items():
        assert got[k].shape == (2, 3, nh) and got[k].dtype == np.float32
        # float32 rounding of x ln 10 (|x| ≤ 16 → ≤ 37): ≤ 4 ulp of 37 ≈ 1.5e-5 relative
        np.testing.assert_allclose(got[k], r, rtol=2e-5, atol=1e-3)
    assert np.isnan(got["n_e"][0, 1, 2]) and np.isfinite(np.delete(got["n_e"].ravel(), 9)).all()
    assert got["v_los"][1, 2, 1] == 0.0
    with pytest.raises(ValueError, match="last axis"):
        x_to_atmosphere(x[..., :-1], nh)


def test_coupling_polynomial_fit_and_fallback():
    """The fitted e^{C atan r} meets its tolerance on the reduced range; the factors
    are e^{C π/4}, e^{C π/2}; a clamp too large for degree 10 gives None (Cephes)."""
    coef, m1, m2 = coupling_polynomial(2.0)
    c = 0.636 * 2.0
    r = np.linspace(-math.tan(math.pi / 8), math.tan(math.pi / 8), 1001)
    g = np.polynomial.polynomial.polyval(r, coef.double().numpy())
    assert np.max(np.abs(g / np.exp(c * np.arctan(r)) - 1)) < 1e-6  # float32 coefficients
    assert m1 == pytest.approx(math.exp(c * math.pi / 4)) and m2 == pytest.approx(
        math.exp(c * math.pi / 2))
    assert coupling_polynomial(8.0) is None


def test_driver_agrees_with_the_stepwise_path_for_any_chunking(inn):
    """The one-call driver runs the same arithmetic as the step-by-step kernels: chunk
    sizes that do not divide the rows, several threads, and in-place output."""
    if load_kernels() is None or torch_sgemm() is None:
        pytest.skip("no fused kernels or no sgemm_ in torch's library")
    x = torch.randn(777, inn.width, generator=torch.Generator().manual_seed(5))
    step = FrozenINN.from_sequence(inn.net_, driver=False)
    for rev in (False, True):
        ref = step.reverse(x) if rev else step.forward(x)
        for chunk, threads in ((1, 1), (64, 2), (1000, 2)):
            drv = FrozenINN.from_sequence(inn.net_, chunk_rows=chunk)
            assert drv.uses_driver and drv.batch_rows >= drv.chunk_rows
            kept = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                buf = x.clone()
                got = drv.reverse(buf, out=buf) if rev else drv.forward(buf, out=buf)
            finally:
                torch.set_num_threads(kept)
            assert got.data_ptr() == buf.data_ptr()
            np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=2e-6,
                                       atol=2e-6 * float(ref.abs().max()))
    # a strided input (every other row) gives the rows it holds
    drv = FrozenINN.from_sequence(inn.net_)
    np.testing.assert_allclose(drv.reverse(x[::2]).numpy(), step.reverse(x)[::2].numpy(),
                               rtol=2e-6, atol=2e-6 * float(x.abs().max()) + 1e-5)


def test_torch_sgemm_is_the_product_torch_computes():
    """On Linux the wheels carry MKL's sgemm_: the pointer passes its own check."""
    import sys

    ptr = torch_sgemm()
    if sys.platform.startswith("linux") and "mkl" in torch.__config__.show().lower():
        assert ptr is not None and ptr > 0
    else:
        assert ptr is None or ptr > 0


def test_reverse_latent_builds_rows_and_unscales_in_one_call(inn):
    """The driver's sampling entry equals building [y, s z, 0] rows, reversing, unscaling."""
    fast = FrozenINN.from_sequence(inn.net_, chunk_rows=50)
    if not fast.uses_driver:
        pytest.skip("no fused kernels or no sgemm_ in torch's library")
    gen = torch.Generator().manual_seed(9)
    y = torch.rand(4, inn.n_y, generator=gen)
    n_draws, row0 = 30, 17  # rows 17..116 of the 4 pixels' 120 draws
    z = torch.randn(100, inn.n_latent, generator=gen)
    mean, std = inn.x_mean_, inn.x_std_
    out = torch.empty(100, inn.n_x)
    fast.reverse_latent(y, z, n_draws, scale=1.3, mean=mean, std=std, out=out, row0=row0)
    rows = torch.zeros(100, inn.width)
    rows[:, :inn.n_y] = y[(torch.arange(100) + row0) // n_draws]
    rows[:, inn.n_y:inn.n_y + inn.n_latent] = 1.3 * z
    ref = FrozenINN.from_sequence(inn.net_, driver=False).reverse(rows)[:, :inn.n_x] * std + mean
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=2e-6,
                               atol=2e-6 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="inconsistent"):  # rows past the last pixel
        fast.reverse_latent(y, z, 10, scale=1.0, mean=mean, std=std, out=out)
    for bad in (dict(row0=-1), dict(n_draws=0)):
        kw = dict(scale=1.0, mean=mean, std=std, out=out, n_draws=n_draws) | bad
        with pytest.raises(ValueError, match="reverse_latent"):
            fast.reverse_latent(y, z, **kw)
    with pytest.raises(ValueError, match="float32"):
        fast.reverse_latent(y, z, n_draws, scale=1.0, mean=mean, std=std,
                            out=out.double())
    with pytest.raises(RuntimeError, match="driver"):
        FrozenINN.from_sequence(inn.net_, driver=False).reverse_latent(
            y, z, n_draws, scale=1.0, mean=mean, std=std, out=out)


def test_frozen_checks_and_converts_its_output(inn):
    """``out`` of another shape is refused; a float64 ``out`` gets the float32 result."""
    fast = FrozenINN.from_sequence(inn.net_)
    x = torch.randn(10, inn.width, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="out must be"):
        fast.reverse(x, out=torch.empty(2, inn.width))
    ref = fast.reverse(x)
    x64 = x.double()
    got = fast.reverse(x64, out=x64)
    assert got.dtype == torch.float64 and got.data_ptr() == x64.data_ptr()
    np.testing.assert_array_equal(got.float().numpy(), ref.numpy())
