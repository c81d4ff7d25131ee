"""Node parametrisation of model atmospheres (differentiable, batched).

A :class:`NodeModel` names the free physical parameters of an atmosphere
(temperature, v_los, v_turb, b_field, inclination, azimuth), the log τ500
positions of their nodes, and maps a parameter vector ``(..., n_parameters)``
to stratifications on a fine log τ500 grid ``(..., depth)``.

Interpolation between nodes:

- ``"bezier3"`` / ``"bezier2"``: cubic / quadratic Bézier splines whose
  control points come from Fritsch–Butland (harmonic-mean) node derivatives,
  which are zero at local extrema, so the curve never overshoots the node
  values (Auer 2003; de la Cruz Rodríguez & Piskunov 2013, ApJ 764, 33);
- ``"spline"``: a cardinal (Hermite) spline under tension ``tension`` in
  [0, 1]: 0 is the Catmull–Rom spline, 1 the broken line through the nodes;
- ``"linear"``: piecewise linear.

Beyond the end nodes every parameter is extrapolated linearly with the slope
of the end interval, except that below the deepest temperature node the
temperature follows the gradient of the reference model (FAL-C by default),
as in globin (Vukadinović et al. 2024). Temperatures are floored at 2800 K.
Everything is torch, float64 by default, and works under ``torch.func``
transforms (``vmap``, ``jacfwd``).

Example
-------
>>> import numpy as np, torch
>>> from iris_lab.nodes import NodeModel
>>> model = NodeModel({"temperature": [-2.5, -1.5, -0.5, 0.4], "v_los": [-1.0]},
...                   log_tau=np.linspace(-4, 1, 51))
>>> model.parameter_names
['temperature_0', 'temperature_1', 'temperature_2', 'temperature_3', 'v_los_0']
>>> params = model.parameters_from(model.reference)
>>> fields = model.interpolate(params)
>>> tuple(fields["temperature"].shape)
(51,)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch

from iris_lab.atmosphere import Atmosphere
from iris_lab.synthesis.formal import fritsch_butland

__all__ = ["NodeModel", "PARAMETERS", "DEFAULT_BOUNDS", "bezier_interpolate"]

Interpolation = Literal["bezier3", "bezier2", "spline", "linear"]

#: Physical parameters a node model can free, in the order they are packed.
PARAMETERS: tuple[str, ...] = (
    "temperature", "v_los", "v_turb", "b_field", "inclination", "azimuth",
)

#: Default (lower, upper) bounds per parameter, CGS / radians.
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "temperature": (2800.0, 1.0e5),
    "v_los": (-2.0e6, 2.0e6),
    "v_turb": (0.0, 1.0e6),
    "b_field": (0.0, 5000.0),
    "inclination": (0.0, np.pi),
    "azimuth": (-np.pi, np.pi),
}

#: Temperature floor [K] applied after interpolation and extrapolation.
TEMPERATURE_FLOOR = 2800.0

#: Physical range applied to the fine-grid stratification after interpolation
#: and linear extrapolation (nodes inside their bounds can still extrapolate
#: to a negative v_turb or B beyond the end nodes).
PHYSICAL_RANGE: dict[str, tuple[float, float]] = {
    "temperature": (TEMPERATURE_FLOOR, np.inf),
    "v_turb": (0.0, np.inf),
    "b_field": (0.0, np.inf),
    "inclination": (0.0, np.pi),
}


def _node_derivatives(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fritsch–Butland derivatives at the nodes (zero at extrema).

    ``x`` (n,), ``y`` (..., n); returns (..., n).
    """
    h = x[1:] - x[:-1]
    slope = (y[..., 1:] - y[..., :-1]) / h
    if x.shape[0] == 2:
        return torch.cat([slope, slope], dim=-1)
    s0, s1 = slope[..., :-1], slope[..., 1:]
    h0, h1 = h[:-1], h[1:]
    inner = fritsch_butland(s0, s1, h0, h1)
    return torch.cat([slope[..., :1], inner, slope[..., -1:]], dim=-1)


def _interp_rows(x: torch.Tensor, y: torch.Tensor, positions: Sequence[float]) -> torch.Tensor:
    """Linear interpolation of rows ``y`` (b, d) on sorted rows ``x`` (b, d), clamped."""
    pos = torch.as_tensor(positions, dtype=x.dtype).expand(x.shape[0], len(positions))
    pos = torch.clamp(pos, x[:, :1], x[:, -1:])
    i = torch.clamp(torch.searchsorted(x.contiguous(), pos.contiguous()) - 1, 0, x.shape[1] - 2)
    x0, x1 = torch.gather(x, 1, i), torch.gather(x, 1, i + 1)
    y0, y1 = torch.gather(y, 1, i), torch.gather(y, 1, i + 1)
    return y0 + (y1 - y0) * (pos - x0) / (x1 - x0)


def _cardinal_derivatives(x: torch.Tensor, y: torch.Tensor, tension: float) -> torch.Tensor:
    h = x[1:] - x[:-1]
    slope = (y[..., 1:] - y[..., :-1]) / h
    if x.shape[0] == 2:
        return (1.0 - tension) * torch.cat([slope, slope], dim=-1)
    centred = (y[..., 2:] - y[..., :-2]) / (x[2:] - x[:-2])
    return (1.0 - tension) * torch.cat([slope[..., :1], centred, slope[..., -1:]], dim=-1)


def bezier_interpolate(
    x_nodes: torch.Tensor,
    y_nodes: torch.Tensor,
    x: torch.Tensor,
    kind: Interpolation = "bezier3",
    tension: float = 0.0,
) -> torch.Tensor:
    """Interpolate node values onto ``x``, linear extrapolation outside.

    Parameters
    ----------
    x_nodes
        Strictly increasing node positions, shape (n,).
    y_nodes
        Node values, shape (..., n).
    x
        Positions to interpolate at, shape (m,).
    kind
        ``"bezier3"``, ``"bezier2"``, ``"spline"`` or ``"linear"``.
    tension
        Tension of ``"spline"`` in [0, 1].

    Returns
    -------
    torch.Tensor
        Shape (..., m).

    Example
    -------
    >>> import torch
    >>> xn = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    >>> yn = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    >>> y = bezier_interpolate(xn, yn, torch.linspace(0, 2, 5, dtype=torch.float64))
    >>> float(y.max())
    1.0
    """
    n = x_nodes.shape[0]
    if n == 1:
        return y_nodes[..., :1].expand(*y_nodes.shape[:-1], x.shape[0])
    index = torch.clamp(torch.searchsorted(x_nodes, x, right=True) - 1, 0, n - 2)
    x0, x1 = x_nodes[index], x_nodes[index + 1]
    h = x1 - x0
    y0, y1 = y_nodes[..., index], y_nodes[..., index + 1]
    t = (x - x0) / h
    inside = (x >= x_nodes[0]) & (x <= x_nodes[-1])
    linear = y0 + (y1 - y0) * t
    if kind == "linear":
        return linear
    if kind == "spline":
        d = _cardinal_derivatives(x_nodes, y_nodes, tension)
    else:
        d = _node_derivatives(x_nodes, y_nodes)
    d0, d1 = d[..., index], d[..., index + 1]
    tc = torch.clamp(t, 0.0, 1.0)
    u = 1.0 - tc
    if kind == "bezier2":
        # one control point: mean of the two tangents' estimates, clipped to
        # the interval's range (no overshoot)
        c = 0.5 * ((y0 + 0.5 * h * d0) + (y1 - 0.5 * h * d1))
        low, high = torch.minimum(y0, y1), torch.maximum(y0, y1)
        c = torch.minimum(torch.maximum(c, low), high)
        curve = u * u * y0 + 2.0 * tc * u * c + tc * tc * y1
    elif kind in ("bezier3", "spline"):
        c0 = y0 + h * d0 / 3.0
        c1 = y1 - h * d1 / 3.0
        curve = u**3 * y0 + 3.0 * tc * u * u * c0 + 3.0 * tc * tc * u * c1 + tc**3 * y1
    else:
        raise ValueError(
            f"interpolation must be 'bezier3', 'bezier2', 'spline' or 'linear', not {kind!r}")
    return torch.where(inside, curve, linear)


class NodeModel:
    """Free atmospheric parameters at log τ500 nodes, interpolated to a fine grid.

    Parameters
    ----------
    nodes
        ``{parameter: [log τ500 of each node, ...]}`` for parameters among
        ``temperature, v_los, v_turb, b_field, inclination, azimuth``. Node
        positions must be strictly increasing. Parameters not named are taken
        from ``reference`` (zero when it does not define them).
    log_tau
        Fine, strictly increasing log τ500 grid (top to bottom). Default: the
        reference model's range clipped to [-6, 1] at 0.1 steps.
    reference
        Atmosphere on a log τ scale (one pixel) for fixed parameters and the
        deep temperature gradient. Default FAL-C.
    interpolation
        ``"bezier3"`` (default), ``"bezier2"``, ``"spline"`` or ``"linear"``.
    tension
        Tension of the ``"spline"`` interpolation, in [0, 1].
    bounds
        Overrides of :data:`DEFAULT_BOUNDS` per parameter.
    dtype, device
        Torch dtype (float64 default) and device of the returned tensors.

    Raises
    ------
    ValueError
        For unknown parameters, empty or non-increasing node lists, or bounds
        with lower ≥ upper.

    Example
    -------
    >>> import torch
    >>> model = NodeModel({"temperature": [-2.0, -0.5, 0.5], "b_field": [-1.0]})
    >>> model.n_parameters
    4
    >>> lower, upper = model.bounds
    >>> p = torch.tensor([[5000.0, 6000.0, 8000.0, 800.0]], dtype=torch.float64)
    >>> atm = model.to_atmosphere(p)
    >>> atm.batch_shape
    (1,)
    """

    def __init__(
        self,
        nodes: Mapping[str, Sequence[float]],
        log_tau: Sequence[float] | np.ndarray | None = None,
        reference: Atmosphere | None = None,
        interpolation: Interpolation = "bezier3",
        *,
        tension: float = 0.0,
        bounds: Mapping[str, tuple[float, float]] | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> None:
        if interpolation not in ("bezier3", "bezier2", "spline", "linear"):
            raise ValueError(
                "interpolation must be 'bezier3', 'bezier2', 'spline' or 'linear', "
                f"not {interpolation!r}")
        if not 0.0 <= tension <= 1.0:
            raise ValueError(f"tension must lie in [0, 1], not {tension}")
        if not nodes:
            raise ValueError("nodes is empty: give at least one free parameter")
        for name, positions in nodes.items():
            if name not in PARAMETERS:
                raise ValueError(f"unknown node parameter {name!r}; known: {list(PARAMETERS)}")
            positions = np.asarray(positions, dtype=np.float64)
            if positions.ndim != 1 or positions.size == 0:
                raise ValueError(f"nodes[{name!r}] must be a non-empty 1-D list of log tau")
            if not np.all(np.isfinite(positions)):
                raise ValueError(f"nodes[{name!r}] contains NaN or infinite positions")
            if np.any(np.diff(positions) <= 0):
                raise ValueError(f"nodes[{name!r}] must be strictly increasing in log tau")
        self.nodes = {n: [float(v) for v in nodes[n]] for n in PARAMETERS if n in nodes}
        self.interpolation = interpolation
        self.tension = float(tension)
        self.dtype = dtype
        self.device = torch.device(device)

        reference = Atmosphere.reference("falc") if reference is None else reference
        if reference.batch_shape:
            raise ValueError("reference must be a single atmosphere (no batch dimensions)")
        if reference.log_tau is None:
            raise ValueError("reference needs a log_tau scale")
        self.reference = reference
        order = np.argsort(reference.log_tau)
        ref_x = reference.log_tau[order]
        if log_tau is None:
            top, bottom = max(ref_x[0], -6.0), min(ref_x[-1], 1.0)
            log_tau = np.round(np.arange(top, bottom + 1e-9, 0.1), 10)
        grid = np.asarray(log_tau, dtype=np.float64)
        if grid.ndim != 1 or grid.size < 2:
            raise ValueError("log_tau must be a 1-D grid with at least two points")
        if not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
            raise ValueError("log_tau must be finite and strictly increasing (top to bottom)")
        self.log_tau = grid

        fixed = {}
        for name in PARAMETERS:
            values = getattr(reference, name)
            values = np.zeros_like(ref_x) if values is None else values[order]
            fixed[name] = np.interp(grid, ref_x, values)
        self._fixed = {n: self._tensor(v) for n, v in fixed.items()}
        # reference temperature (linearly extrapolated in log tau) for the deep gradient
        slope = (ref_x[-1] - ref_x[-2])
        t_ref = reference.temperature[order]
        deep = t_ref[-1] + (grid - ref_x[-1]) * (t_ref[-1] - t_ref[-2]) / slope
        t_reference = np.where(grid > ref_x[-1], deep, np.interp(grid, ref_x, t_ref))
        self._t_reference = self._tensor(t_reference)
        self._t_reference_at_last_node = (
            float(np.interp(self.nodes["temperature"][-1], grid, t_reference))
            if "temperature" in self.nodes else 0.0)

        merged = dict(DEFAULT_BOUNDS)
        for name, pair in (bounds or {}).items():
            if name not in PARAMETERS:
                raise ValueError(f"bounds given for unknown parameter {name!r}")
            lo, hi = (float(v) for v in pair)
            if not lo < hi:
                raise ValueError(f"bounds[{name!r}]: lower {lo} must be < upper {hi}")
            merged[name] = (lo, hi)
        self._bounds = merged

    # ------------------------------------------------------------------
    def _tensor(self, value) -> torch.Tensor:
        return torch.as_tensor(np.asarray(value), dtype=self.dtype, device=self.device)

    @property
    def parameter_names(self) -> list[str]:
        """Names ``"<parameter>_<k>"`` of the packed parameters, in order."""
        return [f"{n}_{k}" for n, pos in self.nodes.items() for k in range(len(pos))]

    @property
    def n_parameters(self) -> int:
        """Length of the parameter vector."""
        return sum(len(pos) for pos in self.nodes.values())

    @property
    def slices(self) -> dict[str, slice]:
        """Where each physical parameter's nodes sit in the packed vector."""
        out, start = {}, 0
        for name, pos in self.nodes.items():
            out[name] = slice(start, start + len(pos))
            start += len(pos)
        return out

    @property
    def node_log_tau(self) -> np.ndarray:
        """log τ500 of every packed parameter."""
        return np.concatenate([np.asarray(p) for p in self.nodes.values()])

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) arrays of shape (n_parameters,)."""
        lower = np.concatenate([[self._bounds[n][0]] * len(p) for n, p in self.nodes.items()])
        upper = np.concatenate([[self._bounds[n][1]] * len(p) for n, p in self.nodes.items()])
        return lower, upper

    def _check(self, params: torch.Tensor) -> torch.Tensor:
        params = torch.as_tensor(params, dtype=self.dtype, device=self.device)
        if params.ndim == 0 or params.shape[-1] != self.n_parameters:
            raise ValueError(
                f"params must have shape (..., {self.n_parameters}) "
                f"({', '.join(self.parameter_names)}), not {tuple(params.shape)}")
        return params

    def interpolate(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fine-grid stratifications from packed node values.

        Parameters
        ----------
        params
            Tensor (..., n_parameters) in CGS / radians.

        Returns
        -------
        dict of torch.Tensor
            ``log_tau`` (depth,) and every parameter of :data:`PARAMETERS`
            with shape (..., depth); fixed ones broadcast from the reference.

        Example
        -------
        >>> import torch
        >>> m = NodeModel({"v_los": [-2.0, 0.0]})
        >>> f = m.interpolate(torch.tensor([1e5, -1e5], dtype=torch.float64))
        >>> f["v_los"].shape == f["temperature"].shape
        True
        """
        params = self._check(params)
        batch = params.shape[:-1]
        depth = self.log_tau.shape[0]
        grid = self._tensor(self.log_tau)
        out: dict[str, torch.Tensor] = {"log_tau": grid}
        for name in PARAMETERS:
            if name not in self.nodes:
                out[name] = self._fixed[name].expand(*batch, depth)
                continue
            x_nodes = self._tensor(self.nodes[name])
            y_nodes = params[..., self.slices[name]]
            values = bezier_interpolate(x_nodes, y_nodes, grid, self.interpolation, self.tension)
            if name == "temperature":
                last = float(self.nodes[name][-1])
                t_last = y_nodes[..., -1:]
                # reference gradient below the deepest node (globin's convention)
                deep = t_last + (self._t_reference - self._t_reference_at_last_node)
                values = torch.where(grid > last, deep, values)
            if name in PHYSICAL_RANGE:
                low, high = PHYSICAL_RANGE[name]
                values = torch.clamp(values, min=low, max=None if np.isinf(high) else high)
            out[name] = values
        return out

    def to_atmosphere(self, params: torch.Tensor) -> Atmosphere:
        """An :class:`~iris_lab.atmosphere.Atmosphere` on the fine log τ grid.

        Densities are left unset (the equation of state fills them).
        """
        fields = self.interpolate(params)
        arrays = {n: v.detach().cpu().numpy() for n, v in fields.items() if n != "log_tau"}
        shape = arrays["temperature"].shape
        arrays["b_field"] = np.abs(arrays["b_field"])
        return Atmosphere(log_tau=np.broadcast_to(self.log_tau, shape), **arrays)

    def parameters_from(self, atmosphere: Atmosphere) -> torch.Tensor:
        """Node values read off an atmosphere (linear in log τ500).

        Parameters
        ----------
        atmosphere
            Any batch shape, with a ``log_tau`` coordinate.

        Returns
        -------
        torch.Tensor
            (*atmosphere.batch_shape, n_parameters).
        """
        if atmosphere.log_tau is None:
            raise ValueError("the atmosphere needs a log_tau coordinate")
        x = torch.as_tensor(atmosphere.log_tau.reshape(-1, atmosphere.n_depth))
        order = torch.argsort(x, dim=-1)
        x = torch.gather(x, -1, order)
        columns = []
        for name, positions in self.nodes.items():
            values = getattr(atmosphere, name)
            values = (np.zeros(atmosphere.temperature.shape) if values is None else values)
            values = torch.gather(torch.as_tensor(values.reshape(-1, atmosphere.n_depth)),
                                  -1, order)
            columns.append(_interp_rows(x, values, positions))
        packed = torch.cat(columns, dim=-1).numpy()
        packed = np.concatenate(columns, axis=-1).reshape(*atmosphere.batch_shape, -1)
        return self._tensor(packed)

    def clip(self, params: torch.Tensor) -> torch.Tensor:
        """Clamp parameters into :attr:`bounds`."""
        params = self._check(params)
        lower, upper = (self._tensor(b) for b in self.bounds)
        return torch.minimum(torch.maximum(params, lower), upper)

    def __repr__(self) -> str:
        free = ", ".join(f"{n}: {len(p)}" for n, p in self.nodes.items())
        return (f"NodeModel({free}; depth={self.log_tau.size}, "
                f"interpolation={self.interpolation!r})")
