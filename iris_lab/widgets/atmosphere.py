"""An explorer for a stratified atmosphere: T, n_e and p_gas against depth.

Example
-------
>>> from iris_lab.atmosphere import Atmosphere
>>> from iris_lab.widgets.atmosphere import AtmosphereExplorer
>>> import contextlib, io
>>> with contextlib.redirect_stdout(io.StringIO()):  # outside a notebook figures print
...     explorer = AtmosphereExplorer(Atmosphere.reference("falc"))
...     explorer.select(40)
>>> explorer.readout.value.startswith("depth 40")
True
"""

from __future__ import annotations

import numpy as np

from iris_lab.atmosphere import Atmosphere

_PANELS = (
    ("temperature", "T [K]", 1.0, False),
    ("n_e", "n$_e$ [cm$^{-3}$]", 1.0, True),
    ("p_gas", "p$_{gas}$ [dyn cm$^{-2}$]", 1.0, True),
)
_AXES = {"height": ("height [km]", 1e-5), "log_tau": ("log τ$_{500}$", 1.0)}


def plot_atmosphere(atmosphere: Atmosphere, axis: str = "height", index: int | None = None,
                    fig=None):
    """Plot T, n_e and p_gas of a single (unbatched) atmosphere against depth.

    Parameters
    ----------
    atmosphere
        An atmosphere without batch dimensions.
    axis
        ``"height"`` or ``"log_tau"``.
    index
        Depth index to mark, or ``None``.
    fig
        A matplotlib figure to draw into (cleared); a new one when ``None``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    if atmosphere.batch_shape:
        raise ValueError("plot_atmosphere takes one atmosphere; index the batch first")
    if axis not in _AXES:
        raise ValueError(f"axis must be one of {sorted(_AXES)}, not {axis!r}")
    coordinate = getattr(atmosphere, axis)
    if coordinate is None:
        raise ValueError(f"this atmosphere has no {axis} coordinate")
    label, factor = _AXES[axis]
    x = coordinate * factor
    fig = fig or plt.figure(figsize=(11, 3.4))
    fig.clear()
    axes = fig.subplots(1, 3)
    for ax, (name, ylabel, scale, log) in zip(axes, _PANELS, strict=True):
        values = getattr(atmosphere, name)
        if values is None:
            ax.text(0.5, 0.5, f"{name} not set", ha="center", transform=ax.transAxes)
            continue
        ax.plot(x, values * scale, color="k", lw=1.2)
        if index is not None:
            ax.plot(x[index], values[index] * scale, "o", color="tab:red")
        ax.set_yscale("log" if log else "linear")
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        if axis == "log_tau":
            ax.set_xlim(x.min(), x.max())
    fig.tight_layout()
    return fig


class AtmosphereExplorer:
    """Slider over depth and a toggle of the depth axis, with a live readout.

    Parameters
    ----------
    atmosphere
        One atmosphere (no batch dimensions).

    Attributes
    ----------
    slider, axis, readout, output, widget
        The ipywidgets controls; ``widget`` is the box to display.
    """

    def __init__(self, atmosphere: Atmosphere) -> None:
        import ipywidgets as widgets

        if atmosphere.batch_shape:
            raise ValueError("AtmosphereExplorer takes one atmosphere; index the batch first")
        self.atmosphere = atmosphere
        options = [name for name in _AXES if getattr(atmosphere, name) is not None]
        self.slider = widgets.IntSlider(
            value=atmosphere.n_depth // 2, min=0, max=atmosphere.n_depth - 1,
            description="depth index", continuous_update=False)
        self.axis = widgets.ToggleButtons(options=options, description="against")
        self.readout = widgets.Label()
        self.output = widgets.Output()
        self.slider.observe(lambda change: self.select(change["new"]), names="value")
        self.axis.observe(lambda change: self.select(self.slider.value), names="value")
        self.widget = widgets.VBox([widgets.HBox([self.slider, self.axis]), self.readout,
                                    self.output])
        self.select(self.slider.value)

    def describe(self, index: int) -> str:
        """One line with the stratification at depth ``index``."""
        atm = self.atmosphere
        parts = [f"depth {index}"]
        if atm.height is not None:
            parts.append(f"h = {atm.height[index] * 1e-5:.0f} km")
        if atm.log_tau is not None:
            parts.append(f"log τ500 = {atm.log_tau[index]:.2f}")
        parts.append(f"T = {atm.temperature[index]:.0f} K")
        if atm.n_e is not None:
            parts.append(f"n_e = {atm.n_e[index]:.3g} cm⁻³")
        if atm.p_gas is not None:
            parts.append(f"p_gas = {atm.p_gas[index]:.3g} dyn cm⁻²")
        return " | ".join(parts)

    def select(self, index: int) -> None:
        """Move the marker to depth ``index`` and redraw."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        index = int(np.clip(index, 0, self.atmosphere.n_depth - 1))
        if self.slider.value != index:
            self.slider.value = index  # the slider's observer redraws
            return
        self.readout.value = self.describe(index)
        with self.output:
            self.output.clear_output(wait=True)
            fig = plot_atmosphere(self.atmosphere, self.axis.value, index)
            display(fig)
            plt.close(fig)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
