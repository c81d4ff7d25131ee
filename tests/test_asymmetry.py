"""Line-asymmetry measures against analytic Gaussian moments and direct quadrature."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from scipy import integrate
from scipy.stats import norm

from iris_lab.methods.asymmetry import asymmetry_map, line_asymmetry


def _gauss(dl, mu, s, amp=3.0, bg=1.0):
    return bg + amp * np.exp(-0.5 * ((dl - mu) / s) ** 2)


@pytest.mark.parametrize("mu,s", [(0.15, 0.2), (-0.3, 0.25), (0.0, 0.1)])
def test_gaussian_moments_match_analytic(mu, s):
    # Fine sampling (0.01 Å, σ/h ≥ 10): trapezoid + linear-interpolation error
    # of the moments is O(h²/σ²) ~ 1e-4 relative, so 1e-3 Å is a safe bound; the
    # window (±1.4 Å) truncates the Gaussian at ≥ 4.4σ, which moves λ0 by < 1e-4 Å.
    dl = np.linspace(-1.4, 1.4, 281)
    a = line_asymmetry(dl, _gauss(dl, mu, s))
    half = s * np.sqrt(2.0 / np.pi)  # mean of a half-normal
    assert a["lambda0"] == pytest.approx(mu, abs=1e-3)
    assert a["sigma"] == pytest.approx(s, rel=5e-3)
    assert a["lambda0_blue"] == pytest.approx(mu - half, abs=1e-3)
    assert a["lambda0_red"] == pytest.approx(mu + half, abs=1e-3)
    assert a["delta_lambda"] == pytest.approx(half, abs=1e-3)
    assert a["ib_ir"] == pytest.approx(norm.cdf(-mu / s) / norm.cdf(mu / s), rel=5e-3)


def test_crisp_like_sampling_is_close():
    # On the 29-point Hα grid (0.1 Å, σ/h = 3) linear interpolation of the
    # samples smears the moments by O(h²/12) relative to σ²: λ0 stays exact by
    # symmetry of the error, σ within 3 %.
    dl = np.round(np.linspace(-1.4, 1.4, 29), 3)
    a = line_asymmetry(dl, _gauss(dl, 0.2, 0.3))
    assert a["lambda0"] == pytest.approx(0.2, abs=5e-3)
    assert a["sigma"] == pytest.approx(0.3, rel=3e-2)


def test_skewed_profile_against_quadrature():
    # Independent reference: adaptive quadrature of the same continuous profile.
    def f(x):
        return 1.0 + 2.0 * np.exp(-0.5 * ((x - 0.1) / 0.15) ** 2) \
            + 1.2 * np.exp(-0.5 * ((x + 0.35) / 0.2) ** 2)

    dl = np.linspace(-1.4, 1.4, 561)
    bg = f(dl).min()
    a = line_asymmetry(dl, f(dl))

    def e(x):
        return f(x) - bg

    tot = integrate.quad(e, -1.4, 1.4, limit=200)[0]
    lam0 = integrate.quad(lambda x: x * e(x), -1.4, 1.4, limit=200)[0] / tot
    sig = np.sqrt(integrate.quad(lambda x: (x - lam0) ** 2 * e(x), -1.4, 1.4, limit=200)[0] / tot)
    lb = (integrate.quad(lambda x: x * e(x), -1.4, lam0)[0]
          / integrate.quad(e, -1.4, lam0)[0])
    ratio = integrate.quad(e, -1.4, 0.0)[0] / integrate.quad(e, 0.0, 1.4)[0]
    # 0.005 Å grid: discretisation error ~1e-5 Å; 1e-3 is generous but still
    # an order of magnitude below the asymmetry signal being measured (~0.1 Å).
    assert a["lambda0"] == pytest.approx(lam0, abs=1e-3)
    assert a["sigma"] == pytest.approx(sig, abs=1e-3)
    assert a["lambda0_blue"] == pytest.approx(lb, abs=1e-3)
    assert a["ib_ir"] == pytest.approx(ratio, rel=2e-3)
    assert a["ib_ir"] > 1.0  # the extra blue component gives a blue asymmetry


def test_mirror_symmetry_and_absorption():
    dl = np.linspace(-1.2, 1.2, 25)
    prof = _gauss(dl, 0.2, 0.25) + 0.5 * _gauss(dl, -0.4, 0.1, bg=0.0)
    a, b = line_asymmetry(dl, prof), line_asymmetry(dl, prof[::-1])
    assert b["lambda0"] == pytest.approx(-a["lambda0"], abs=1e-12)
    assert b["ib_ir"] == pytest.approx(1.0 / a["ib_ir"], rel=1e-12)
    assert b["delta_lambda"] == pytest.approx(a["delta_lambda"], abs=1e-12)
    c = line_asymmetry(dl, 5.0 - prof, kind="absorption")  # same signal, inverted
    for k in a:
        assert c[k] == pytest.approx(a[k], rel=1e-10, abs=1e-12)


def test_map_batches_and_flags_bad_pixels():
    dl = np.round(np.linspace(-1.4, 1.4, 29), 3)
    mus = np.linspace(-0.2, 0.2, 6).reshape(2, 3)
    cube = _gauss(dl, mus[..., None], 0.3)
    cube[0, 0, 4] = np.nan
    cube[1, 2] = 1.0  # flat: no line signal
    da = xr.DataArray(cube, dims=("y", "x", "dl_halpha"),
                      coords={"dl_halpha": dl, "y": [0, 1], "x": [0, 1, 2]})
    ds = asymmetry_map(da)
    assert ds["lambda0"].dims == ("y", "x") and ds["lambda0"].attrs["units"] == "Angstrom"
    assert np.isnan(ds["lambda0"].values[0, 0]) and np.isnan(ds["sigma"].values[1, 2])
    single = line_asymmetry(dl, cube[1, 0])
    assert ds["lambda0"].values[1, 0] == pytest.approx(single["lambda0"], abs=1e-12)
    assert np.diff(ds["lambda0"].values[0, 1:]).item() > 0  # follows the shift


def test_bad_axis_raises():
    with pytest.raises(ValueError, match="increasing"):
        line_asymmetry(np.array([0.0, -1.0, 1.0]), np.ones(3))
    with pytest.raises(ValueError, match="samples"):
        line_asymmetry(np.linspace(-1, 1, 5), np.ones(4))
