"""Stratified model atmospheres, batched over pixels.

An :class:`Atmosphere` holds the thermodynamic and magnetic stratification of
one or many pixels on a common depth index. Values are stored in CGS (K,
cm s⁻¹, cm⁻³, dyn cm⁻², g cm⁻³, G) and angles in radians; astropy units are
accepted and returned at the public boundary (:meth:`Atmosphere.from_quantities`,
:meth:`Atmosphere.quantity`) and written into the attributes of
:meth:`Atmosphere.to_dataset`.

Arrays have shape ``(*batch, depth)``; the depth axis is ordered from the top
of the atmosphere (small optical depth, large height) to the bottom.

Example
-------
>>> from iris_lab.atmosphere import Atmosphere
>>> falc = Atmosphere.reference("falc")
>>> falc.n_depth, falc.batch_shape
(82, ())
>>> float(falc.temperature[-1]) > 9000.0
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

DepthScale = Literal["log_tau", "height"]

#: CGS unit of every stored field, as an astropy-parsable string.
UNITS: dict[str, str] = {
    "log_tau": "",
    "height": "cm",
    "temperature": "K",
    "v_los": "cm / s",
    "v_turb": "cm / s",
    "b_field": "G",
    "inclination": "rad",
    "azimuth": "rad",
    "n_e": "1 / cm3",
    "n_h": "1 / cm3",
    "p_gas": "dyn / cm2",
    "rho": "g / cm3",
}

LONG_NAMES: dict[str, str] = {
    "log_tau": "log10 optical depth at 500 nm",
    "height": "height above tau500 = 1",
    "temperature": "temperature",
    "v_los": "line-of-sight velocity (positive = redshift, downflow)",
    "v_turb": "microturbulent velocity",
    "b_field": "magnetic field strength",
    "inclination": "field inclination to the line of sight",
    "azimuth": "field azimuth",
    "n_e": "electron number density",
    "n_h": "total hydrogen number density",
    "p_gas": "gas pressure",
    "rho": "mass density",
}

_REFERENCE_FILES: dict[str, str] = {
    "falc": "falc.nc",
}


def _data_path(name: str) -> Path:
    return Path(__file__).parent / "data" / name


@dataclasses.dataclass(frozen=True, eq=False)
class Atmosphere:
    """A stratified atmosphere with leading batch dimensions.

    Parameters
    ----------
    temperature
        Temperature [K], shape ``(*batch, depth)``.
    log_tau, height
        Depth coordinates: log10 of the continuum optical depth at 500 nm and
        geometrical height [cm]. At least one must be given; ``scale`` names
        the one that defines the grid (strictly increasing ``log_tau`` or
        strictly decreasing ``height`` along depth).
    v_los, v_turb
        Line-of-sight velocity (positive = redshift) and microturbulence
        [cm s⁻¹]. Default 0.
    b_field, inclination, azimuth
        Magnetic field [G] and its angles [rad]. Default 0.
    n_e, n_h, p_gas, rho
        Electron and total hydrogen density [cm⁻³], gas pressure
        [dyn cm⁻²], mass density [g cm⁻³]; ``None`` when not known (an
        equation of state fills them).
    scale
        ``"log_tau"`` or ``"height"``; inferred when omitted.

    Raises
    ------
    ValueError
        Naming the offending field for wrong shapes, non-finite values,
        non-positive temperatures, negative densities or a non-monotonic
        depth scale.

    Example
    -------
    >>> import numpy as np
    >>> atm = Atmosphere(temperature=np.full((2, 3), 6000.0),
    ...                  log_tau=np.array([-2.0, -1.0, 0.0]))
    >>> atm.batch_shape, atm.scale
    ((2,), 'log_tau')
    """

    temperature: np.ndarray
    log_tau: np.ndarray | None = None
    height: np.ndarray | None = None
    v_los: np.ndarray | None = None
    v_turb: np.ndarray | None = None
    b_field: np.ndarray | None = None
    inclination: np.ndarray | None = None
    azimuth: np.ndarray | None = None
    n_e: np.ndarray | None = None
    n_h: np.ndarray | None = None
    p_gas: np.ndarray | None = None
    rho: np.ndarray | None = None
    scale: DepthScale | None = None

    FIELDS: ClassVar[tuple[str, ...]] = (
        "log_tau", "height", "temperature", "v_los", "v_turb", "b_field",
        "inclination", "azimuth", "n_e", "n_h", "p_gas", "rho",
    )
    ZERO_DEFAULT: ClassVar[tuple[str, ...]] = (
        "v_los", "v_turb", "b_field", "inclination", "azimuth",
    )
    DENSITIES: ClassVar[tuple[str, ...]] = ("n_e", "n_h", "p_gas", "rho")

    def __post_init__(self) -> None:
        temperature = self._as_array("temperature", self.temperature)
        if temperature.ndim < 1:
            raise ValueError("temperature must have a depth axis (shape (..., depth))")
        shape = temperature.shape
        set_ = object.__setattr__
        set_(self, "temperature", temperature)
        for name in self.FIELDS:
            if name == "temperature":
                continue
            value = getattr(self, name)
            if value is None:
                if name in self.ZERO_DEFAULT:
                    set_(self, name, np.zeros(shape))
                continue
            array = self._as_array(name, value)
            try:
                array = np.broadcast_to(array, shape).copy()
            except ValueError:
                raise ValueError(
                    f"{name} has shape {array.shape}, which does not broadcast to "
                    f"temperature's shape {shape}"
                ) from None
            set_(self, name, array)

        if self.log_tau is None and self.height is None:
            raise ValueError("a depth scale is needed: give log_tau or height")
        scale = self.scale or ("log_tau" if self.log_tau is not None else "height")
        if scale not in ("log_tau", "height"):
            raise ValueError(f"scale must be 'log_tau' or 'height', not {scale!r}")
        if getattr(self, scale) is None:
            raise ValueError(f"scale is {scale!r} but {scale} was not given")
        set_(self, "scale", scale)

        if np.any(temperature <= 0):
            raise ValueError("temperature must be > 0 K everywhere")
        for name in self.DENSITIES:
            value = getattr(self, name)
            if value is not None and np.any(value < 0):
                raise ValueError(f"{name} must be non-negative everywhere")
        if self.b_field is not None and np.any(self.b_field < 0):
            raise ValueError("b_field must be non-negative (direction goes in the angles)")
        if self.v_turb is not None and np.any(self.v_turb < 0):
            raise ValueError("v_turb must be non-negative everywhere")
        if shape[-1] > 1:
            step = np.diff(getattr(self, scale), axis=-1)
            monotone = np.all(step > 0) if scale == "log_tau" else np.all(step < 0)
            if not monotone:
                order = "increasing" if scale == "log_tau" else "decreasing"
                raise ValueError(
                    f"{scale} must be strictly {order} along depth (top to bottom)"
                )

    @staticmethod
    def _as_array(name: str, value: Any) -> np.ndarray:
        if hasattr(value, "unit") and hasattr(value, "to_value"):
            raise TypeError(
                f"{name} carries astropy units: use Atmosphere.from_quantities for that"
            )
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        array = np.asarray(value, dtype=np.float64)
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or infinite values")
        return array

    # -- shape -----------------------------------------------------------
    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Shape of the leading (pixel) dimensions."""
        return self.temperature.shape[:-1]

    @property
    def n_depth(self) -> int:
        """Number of depth points."""
        return self.temperature.shape[-1]

    @property
    def depth(self) -> np.ndarray:
        """The coordinate named by :attr:`scale`."""
        return getattr(self, self.scale)

    def fields(self) -> dict[str, np.ndarray]:
        """Every field that is set, by name (CGS arrays)."""
        return {n: getattr(self, n) for n in self.FIELDS if getattr(self, n) is not None}

    def replace(self, **changes: Any) -> Atmosphere:
        """A copy with some fields changed (validated again).

        Example
        -------
        >>> falc = Atmosphere.reference("falc")
        >>> hot = falc.replace(temperature=falc.temperature * 1.1)
        """
        return dataclasses.replace(self, **changes)

    def __getitem__(self, index: Any) -> Atmosphere:
        """Index the batch dimensions; the depth axis is kept whole."""
        if not self.batch_shape:
            raise IndexError("this atmosphere has no batch dimensions to index")
        index = index if isinstance(index, tuple) else (index,)
        if not any(part is Ellipsis for part in index):
            index = (*index, Ellipsis)
        picked = {n: a[index] for n, a in self.fields().items()}
        if any(a.ndim == 0 for a in picked.values()):
            raise IndexError("indexing removed the depth axis")
        return Atmosphere(**picked, scale=self.scale)

    def reshape(self, *batch_shape: int) -> Atmosphere:
        """Reshape the batch dimensions, e.g. ``atm.reshape(-1)`` to flatten."""
        shape = (*batch_shape, self.n_depth)
        return Atmosphere(**{n: a.reshape(shape) for n, a in self.fields().items()},
                          scale=self.scale)

    def broadcast_to(self, batch_shape: Sequence[int]) -> Atmosphere:
        """Repeat a single atmosphere over new batch dimensions."""
        shape = (*batch_shape, self.n_depth)
        return Atmosphere(**{n: np.broadcast_to(a, shape) for n, a in self.fields().items()},
                          scale=self.scale)

    @classmethod
    def stack(cls, atmospheres: Sequence[Atmosphere]) -> Atmosphere:
        """Stack atmospheres on a common depth grid along a new first axis."""
        if not atmospheres:
            raise ValueError("nothing to stack")
        names = set(atmospheres[0].fields())
        for atm in atmospheres[1:]:
            if set(atm.fields()) != names:
                raise ValueError("atmospheres to stack must define the same fields")
        return cls(**{n: np.stack([getattr(a, n) for a in atmospheres]) for n in names},
                   scale=atmospheres[0].scale)

    # -- units ------------------------------------------------------------
    @classmethod
    def from_quantities(cls, scale: DepthScale | None = None, **fields: Any) -> Atmosphere:
        """Build from astropy quantities (any compatible units).

        Example
        -------
        >>> import astropy.units as u
        >>> atm = Atmosphere.from_quantities(
        ...     temperature=[5000, 6000] * u.K, height=[500, 0] * u.km,
        ...     v_los=[1, 2] * u.km / u.s)
        >>> float(atm.v_los[0])
        100000.0
        """
        import astropy.units as u

        converted: dict[str, np.ndarray] = {}
        for name, value in fields.items():
            if name not in UNITS:
                raise ValueError(f"unknown atmosphere field {name!r}")
            if value is None:
                continue
            unit = u.Unit(UNITS[name]) if UNITS[name] else u.dimensionless_unscaled
            quantity = u.Quantity(value)
            try:
                converted[name] = quantity.to_value(unit, equivalencies=u.dimensionless_angles())
            except u.UnitConversionError as err:
                raise ValueError(f"{name}: {err}") from None
        return cls(**converted, scale=scale)

    def quantity(self, name: str):
        """One field as an astropy ``Quantity`` in CGS units."""
        import astropy.units as u

        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{name} is not set in this atmosphere")
        return u.Quantity(value, UNITS[name] or u.dimensionless_unscaled)

    # -- xarray -------------------------------------------------------------
    def to_dataset(self, batch_dims: Sequence[str] | None = None):
        """Convert to an ``xarray.Dataset`` with units and long names.

        The depth dimension is called ``depth``; ``log_tau`` and ``height`` are
        coordinates (1-D when identical for every pixel).
        """
        import xarray as xr

        batch_dims = tuple(batch_dims) if batch_dims is not None else tuple(
            f"dim_{i}" for i in range(len(self.batch_shape)))
        if len(batch_dims) != len(self.batch_shape):
            raise ValueError(
                f"batch_dims has {len(batch_dims)} names for {len(self.batch_shape)} batch dims")
        dims = (*batch_dims, "depth")
        data_vars, coords = {}, {}
        for name, array in self.fields().items():
            attrs = {"units": UNITS[name], "long_name": LONG_NAMES[name]}
            if name in ("log_tau", "height"):
                flat = array.reshape(-1, self.n_depth)
                if np.all(flat == flat[:1]):
                    coords[name] = xr.Variable(("depth",), flat[0], attrs)
                    continue
                coords[name] = xr.Variable(dims, array, attrs)
                continue
            data_vars[name] = xr.Variable(dims, array, attrs)
        return xr.Dataset(data_vars, coords=coords, attrs={"depth_scale": self.scale})

    @classmethod
    def from_dataset(cls, dataset) -> Atmosphere:
        """Inverse of :meth:`to_dataset` (batch dims in the dataset's order)."""
        temperature = dataset["temperature"]
        dims = temperature.dims
        if dims[-1] != "depth":
            temperature = temperature.transpose(..., "depth")
            dims = temperature.dims
        fields: dict[str, np.ndarray] = {}
        for name in cls.FIELDS:
            if name not in dataset.variables:
                continue
            var = dataset[name]
            missing = [d for d in dims if d not in var.dims]
            fields[name] = var.expand_dims(missing).transpose(*dims).values if missing \
                else var.transpose(*dims).values
        return cls(**fields, scale=dataset.attrs.get("depth_scale"))

    def to_netcdf(self, path: str | Path, batch_dims: Sequence[str] | None = None) -> Path:
        """Write as netCDF (h5netcdf engine); returns the path."""
        path = Path(path)
        self.to_dataset(batch_dims).to_netcdf(path, engine="h5netcdf")
        return path

    @classmethod
    def from_netcdf(cls, path: str | Path) -> Atmosphere:
        """Read a file written by :meth:`to_netcdf`."""
        import xarray as xr

        with xr.open_dataset(path, engine="h5netcdf") as dataset:
            return cls.from_dataset(dataset.load())

    # -- reference models ---------------------------------------------------
    @classmethod
    def reference(cls, name: str = "falc") -> Atmosphere:
        """A shipped reference model atmosphere.

        Parameters
        ----------
        name
            ``"falc"`` (Fontenla, Avrett & Loeser 1993 model C, with log τ500
            computed by the build script; see ``iris_lab/data/README.md``).
        """
        key = name.lower().replace("-", "").replace("_", "")
        if key not in _REFERENCE_FILES:
            raise ValueError(
                f"unknown reference atmosphere {name!r}; available: {sorted(_REFERENCE_FILES)}")
        return cls.from_netcdf(_data_path(_REFERENCE_FILES[key]))

    @staticmethod
    def available_references() -> list[str]:
        """Names accepted by :meth:`reference`."""
        return sorted(_REFERENCE_FILES)

    def __repr__(self) -> str:
        known = ", ".join(self.fields())
        return (f"Atmosphere(batch_shape={self.batch_shape}, n_depth={self.n_depth}, "
                f"scale={self.scale!r}, fields=[{known}])")

