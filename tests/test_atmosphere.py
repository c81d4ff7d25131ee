"""The Atmosphere type: validation, batching, units and netCDF round trips."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest

from iris_lab.atmosphere import Atmosphere

K_BOLTZMANN = 1.380649e-16


@pytest.fixture(scope="module")
def falc() -> Atmosphere:
    return Atmosphere.reference("falc")


def test_falc_is_the_published_model(falc):
    # FAL-C (Fontenla et al. 1993): 82 points, T_min ≈ 4400 K near 500 km,
    # 9400 K at the bottom, τ500 = 1 within ±50 km of h = 0.
    assert falc.n_depth == 82
    t_min = falc.temperature.argmin()
    assert 4300 <= falc.temperature[t_min] <= 4500
    assert 400e5 < falc.height[t_min] < 600e5
    assert falc.temperature[-1] == pytest.approx(9400.0)
    h_tau1 = np.interp(0.0, falc.log_tau, falc.height)
    assert abs(h_tau1) < 50e5
    # ideal gas: p = n k T with n ≈ 1.086 n_H + n_e (He and metals), better than 1%
    n_total = falc.p_gas / (K_BOLTZMANN * falc.temperature)
    ratio = (n_total - falc.n_e) / falc.n_h
    np.testing.assert_allclose(ratio, 1.0862, rtol=1e-3)


def test_falc_hydrostatic_equilibrium(falc):
    # dp/dz = -ρ g holds for the tabulated model to a few % in the photosphere
    # (FAL-C includes turbulent pressure, ≈ ρ v_t²/2, which we add here).
    g = 2.7398e4
    p_total = falc.p_gas + 0.5 * falc.rho * falc.v_turb**2
    dp_dz = np.gradient(p_total, falc.height)
    photosphere = (falc.height > 0) & (falc.height < 500e5)
    np.testing.assert_allclose(-dp_dz[photosphere] / (falc.rho[photosphere] * g), 1.0, rtol=0.06)


def test_batching_and_indexing(falc):
    batch = falc.broadcast_to((3, 4))
    assert batch.batch_shape == (3, 4)
    np.testing.assert_array_equal(batch[2, 1].temperature, falc.temperature)
    assert batch.reshape(-1).batch_shape == (12,)
    stacked = Atmosphere.stack([falc, falc.replace(temperature=falc.temperature * 1.1)])
    assert stacked.batch_shape == (2,)
    np.testing.assert_allclose(stacked.temperature[1] / stacked.temperature[0], 1.1)
    picked = batch.reshape(-1)[np.array([0, 5, 7])]
    assert picked.batch_shape == (3,)
    mask = np.zeros(12, dtype=bool)
    mask[[1, 2]] = True
    assert batch.reshape(-1)[mask].batch_shape == (2,)
    with pytest.raises(IndexError):
        falc[0]


def test_units_at_the_boundary():
    atm = Atmosphere.from_quantities(
        temperature=[5000, 6000] * u.K, height=[0.5, 0.0] * u.Mm,
        v_los=[1.0, -2.0] * u.km / u.s, b_field=[0.1, 0.2] * u.T,
        inclination=[90, 45] * u.deg)
    np.testing.assert_allclose(atm.height, [5e7, 0.0])
    np.testing.assert_allclose(atm.v_los, [1e5, -2e5])
    np.testing.assert_allclose(atm.b_field, [1000.0, 2000.0])
    np.testing.assert_allclose(atm.inclination, [np.pi / 2, np.pi / 4])
    assert atm.quantity("v_los").to(u.km / u.s)[1] == -2 * u.km / u.s
    with pytest.raises(ValueError, match="v_los"):
        Atmosphere.from_quantities(temperature=[5000] * u.K, height=[0] * u.km,
                                   v_los=[1] * u.K)
    with pytest.raises(TypeError, match="from_quantities"):
        Atmosphere(temperature=[5000] * u.K, height=[0.0])


def test_dataset_and_netcdf_round_trip(falc, tmp_path):
    batch = Atmosphere.stack([falc, falc.replace(v_los=np.linspace(0, 1e5, falc.n_depth))])
    dataset = batch.to_dataset(batch_dims=("pixel",))
    assert dataset["temperature"].dims == ("pixel", "depth")
    assert dataset["temperature"].attrs["units"] == "K"
    assert dataset["log_tau"].dims == ("depth",)  # shared coordinate stays 1-D
    path = batch.to_netcdf(tmp_path / "atm.nc", batch_dims=("pixel",))
    back = Atmosphere.from_netcdf(path)
    assert back.scale == "height"
    for name, array in batch.fields().items():
        np.testing.assert_array_equal(getattr(back, name), array, err_msg=name)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"temperature": [5000.0, -1.0, 6000.0]}, "temperature"),
        ({"temperature": [5000.0, np.nan, 6000.0]}, "temperature"),
        ({"n_e": [1e10, -1e10, 1e12]}, "n_e"),
        ({"rho": [1e-9, 1e-8, -1.0]}, "rho"),
        ({"log_tau": [-2.0, -3.0, 0.0]}, "log_tau"),
        ({"v_los": [0.0, 0.0]}, "v_los"),
        ({"v_turb": [0.0, -1.0, 0.0]}, "v_turb"),
    ],
)
def test_bad_input_names_the_field(changes, field):
    fields = {"temperature": [5000.0, 5500.0, 6000.0], "log_tau": [-2.0, -1.0, 0.0]}
    fields.update(changes)
    with pytest.raises(ValueError, match=field):
        Atmosphere(**fields)


def test_height_scale_must_decrease():
    with pytest.raises(ValueError, match="height"):
        Atmosphere(temperature=[5000.0, 6000.0], height=[0.0, 1e7])
    with pytest.raises(ValueError, match="depth scale"):
        Atmosphere(temperature=[5000.0, 6000.0])
    with pytest.raises(ValueError, match="unknown reference"):
        Atmosphere.reference("nonexistent")
