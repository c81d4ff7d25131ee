"""NodeModel: interpolation properties, extrapolation rules, shapes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iris_lab.atmosphere import Atmosphere
from iris_lab.nodes import NodeModel, bezier_interpolate

GRID = np.round(np.linspace(-5.0, 1.0, 61), 6)
KINDS = ["bezier3", "bezier2", "spline", "linear"]


def _t(x):
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_interpolation_passes_through_nodes_without_overshoot(kind):
    x_nodes = _t([-4.0, -2.5, -1.0, 0.0, 0.8])
    y_nodes = _t([[4000.0, 4600.0, 5000.0, 6500.0, 9000.0],      # monotone
                  [5000.0, 4200.0, 4400.0, 6000.0, 6100.0]])    # with a minimum
    x = _t(GRID)
    y = bezier_interpolate(x_nodes, y_nodes, x, kind)
    at_nodes = bezier_interpolate(x_nodes, y_nodes, x_nodes, kind)
    assert torch.allclose(at_nodes, y_nodes, atol=1e-9)
    inside = (x >= -4.0) & (x <= 0.8)
    if kind != "spline":       # Bézier with Fritsch–Butland tangents: monotone, bounded
        assert torch.all(torch.diff(y[0, inside]) >= -1e-9)
        idx = torch.searchsorted(x_nodes, x[inside], right=True).clamp(1, 4)
        lo = torch.minimum(y_nodes[1, idx - 1], y_nodes[1, idx])
        hi = torch.maximum(y_nodes[1, idx - 1], y_nodes[1, idx])
        assert torch.all((y[1, inside] >= lo - 1e-9) & (y[1, inside] <= hi + 1e-9))


def test_linear_extrapolation_beyond_end_nodes():
    x_nodes = _t([-3.0, -1.0, 0.0])
    y_nodes = _t([1.0, 2.0, 4.0])
    y = bezier_interpolate(x_nodes, y_nodes, _t([-5.0, -4.0, 1.0]), "bezier3")
    assert torch.allclose(y, _t([0.0, 0.5, 6.0]))


def test_temperature_follows_reference_gradient_below_last_node_and_floor():
    falc = Atmosphere.reference("falc")
    model = NodeModel({"temperature": [-4.0, -2.0, -0.5]}, log_tau=GRID)
    params = _t([2000.0, 4500.0, 5500.0])
    t = model.interpolate(params)["temperature"].numpy()
    deep = GRID > -0.5
    t_falc = np.interp(GRID, falc.log_tau, falc.temperature)
    shift = 5500.0 - np.interp(-0.5, falc.log_tau, falc.temperature)
    np.testing.assert_allclose(t[deep], t_falc[deep] + shift, rtol=1e-9)
    assert t.min() == pytest.approx(2800.0)      # floor at the top


def test_round_trip_batched_and_fixed_parameters():
    falc = Atmosphere.reference("falc")
    model = NodeModel({"temperature": [-2.5, -1.5, -0.5, 0.4], "v_los": [-1.0],
                       "b_field": [-2.0, 0.0], "inclination": [-1.0]}, log_tau=GRID)
    assert model.n_parameters == 8
    assert model.parameter_names[4] == "v_los_0"
    atm = falc.replace(v_los=np.full(82, 1.5e5), b_field=np.full(82, 700.0),
                       inclination=np.full(82, 0.4)).broadcast_to((3, 2))
    params = model.parameters_from(atm)
    assert params.shape == (3, 2, 8)
    fields = model.interpolate(params)
    assert fields["temperature"].shape == (3, 2, GRID.size)
    np.testing.assert_allclose(fields["v_los"].numpy(), 1.5e5)
    np.testing.assert_allclose(fields["b_field"].numpy(), 700.0)
    # fixed v_turb comes from the reference
    np.testing.assert_allclose(fields["v_turb"][0, 0].numpy(),
                               np.interp(GRID, falc.log_tau, falc.v_turb))
    back = model.to_atmosphere(params)
    assert back.batch_shape == (3, 2) and back.scale == "log_tau"
    # T at the nodes read back exactly
    again = model.parameters_from(back)
    torch.testing.assert_close(again, params, rtol=1e-9, atol=1e-6)


def test_differentiable_under_vmap_jacfwd():
    model = NodeModel({"temperature": [-2.0, -1.0, 0.0], "v_turb": [-1.0]}, log_tau=GRID)
    params = _t([[4500.0, 5000.0, 6400.0, 1e5]] * 2)

    def f(p):
        out = model.interpolate(p)
        return out["temperature"] + out["v_turb"]

    jac = torch.func.vmap(torch.func.jacfwd(f))(params)
    assert jac.shape == (2, GRID.size, 4)
    node = int(np.argmin(np.abs(GRID + 1.0)))
    assert float(jac[0, node, 1]) == pytest.approx(1.0)
    assert float(jac[0, node, 0]) == pytest.approx(0.0, abs=1e-12)


def test_bounds_and_clip():
    model = NodeModel({"temperature": [-1.0, 0.0], "b_field": [0.0]},
                      bounds={"b_field": (0.0, 3000.0)})
    lower, upper = model.bounds
    assert lower.tolist() == [2800.0, 2800.0, 0.0]
    assert upper[-1] == 3000.0
    clipped = model.clip(_t([1000.0, 7000.0, 4000.0]))
    assert clipped.tolist() == [2800.0, 7000.0, 3000.0]


def test_bad_input_raises():
    with pytest.raises(ValueError, match="unknown node parameter"):
        NodeModel({"pressure": [0.0]})
    with pytest.raises(ValueError, match="strictly increasing"):
        NodeModel({"temperature": [0.0, -1.0]})
    with pytest.raises(ValueError, match="interpolation"):
        NodeModel({"temperature": [0.0]}, interpolation="cubic")
    with pytest.raises(ValueError, match="lower"):
        NodeModel({"temperature": [0.0]}, bounds={"temperature": (5.0, 1.0)})
    model = NodeModel({"temperature": [-1.0, 0.0]})
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        model.interpolate(_t([1.0, 2.0, 3.0]))


def test_extrapolated_v_turb_b_and_inclination_stay_physical():
    """Nodes inside their bounds extrapolate linearly beyond the end nodes;
    v_turb and B must not go negative there, nor γ leave [0, π]."""
    grid = np.linspace(-4.0, 1.0, 26)
    m = NodeModel({"v_turb": [-2.2, -1.1, 0.0], "b_field": [-2.2, -1.1, 0.0],
                   "inclination": [-2.2, 0.0]}, log_tau=grid)
    p = torch.tensor([[0.1e5, 2.0e5, 4.0e5, 50.0, 600.0, 1200.0, 0.2, 2.9]],
                     dtype=torch.float64)
    f = m.interpolate(p)
    assert float(f["v_turb"].min()) == 0.0 and float(f["b_field"].min()) == 0.0
    assert float(f["inclination"].max()) == pytest.approx(np.pi)
    assert float(f["inclination"].min()) >= 0.0
    # inside the node range the values are untouched
    inside = (grid >= -2.2) & (grid <= 0.0)
    assert float(f["v_turb"][0, inside].min()) == pytest.approx(0.1e5)
    assert float(f["b_field"][0, inside].max()) == pytest.approx(1200.0)
