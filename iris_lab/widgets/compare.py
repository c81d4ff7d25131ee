"""Side-by-side maps of inversion results (look-up, networks, truth) and UMF curves.

Any number of results in the shared layout (``IRIS2.predict``,
``DeepIRIS2.predict``, the RP path) and optionally the true models are shown
as maps of one quantity at a log τ slider; a click on any map (or
:meth:`ResultComparison.select`) draws that pixel's stratification from every
result, with its σ band, beside the truth.

Example
-------
>>> viewer = ResultComparison({"look-up": res_a, "deepIRIS²": res_b}, truth)  # doctest: +SKIP
>>> viewer.widget                                                             # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import xarray as xr

from iris_lab.widgets.pixel import ClickSelect, clip_pixel

#: quantity → (σ variable, label, scale to display units, log10 display)
QUANTITIES: dict[str, tuple[str, str, float, bool]] = {
    "temperature": ("sigma_temperature", "T [kK]", 1e-3, False),
    "v_los": ("sigma_v_los", "v$_{los}$ [km/s]", 1e-5, False),
    "v_turb": ("sigma_v_turb", "v$_{turb}$ [km/s]", 1e-5, False),
    "n_e": ("sigma_log_n_e", "log$_{10}$ n$_e$ [cm$^{-3}$]", 1.0, True),
}


def _display(values: np.ndarray, quantity: str) -> np.ndarray:
    _, _, scale, log = QUANTITIES[quantity]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(values) if log else values * scale


def plot_umf_curves(summaries: Mapping[str, xr.Dataset], quantity: str = "temperature",
                    ax=None):
    """UMF against log τ for each method (line style) and region (colour).

    Parameters
    ----------
    summaries
        Method name → :func:`iris_lab.methods.umf.umf_summary` output.
    quantity
        One of ``temperature``, ``v_los``, ``v_turb``, ``n_e``.

    Example
    -------
    >>> plot_umf_curves({"look-up": umf_summary(umf)}, "temperature")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.6))
    styles = ["-", "--", ":", "-."]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for m, (name, summary) in enumerate(summaries.items()):
        da = summary[f"umf_{quantity}"]
        for r, region in enumerate(da["region"].values):
            ax.plot(da["log_tau"], da.sel(region=region), styles[m % len(styles)],
                    color=colours[r % len(colours)], label=f"{name}: {region}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axvspan(-5, -1, color="0.9", zorder=0)
    ax.set_yscale("log")
    ax.set_xlabel(r"log$_{10}\,\tau_{500}$")
    ax.set_ylabel(f"median UMF of {quantity}")
    ax.legend(fontsize=7, ncol=2)
    return ax


class ResultComparison(ClickSelect):
    """Maps of several results at one log τ, and the stratifications of a clicked pixel.

    Parameters
    ----------
    results
        Name → result Dataset (dims y, x|time, log_tau) in the shared layout.
    truth
        Optional Dataset with the true ``temperature``, ``v_los``, ``v_turb``,
        ``n_e`` on the same pixels and log τ grid.
    quantity, log_tau
        Initial quantity and depth.

    Attributes
    ----------
    quantity, depth, readout, output, widget
        The controls; :meth:`select` picks a pixel programmatically.
    """

    def __init__(self, results: Mapping[str, xr.Dataset], truth: xr.Dataset | None = None,
                 quantity: str = "temperature", log_tau: float = -3.0) -> None:
        import ipywidgets as widgets
        import matplotlib.pyplot as plt

        if not results:
            raise ValueError("results must hold at least one result Dataset")
        self.panels: dict[str, xr.Dataset] = dict(results)
        if truth is not None:
            self.panels["truth"] = truth
        first = next(iter(results.values()))
        self.dims = first["temperature"].dims[:2]
        self.log_tau = first["log_tau"].values
        self.truth = truth
        self.quantity = widgets.Dropdown(options=list(QUANTITIES), value=quantity,
                                         description="quantity")
        self.depth = widgets.SelectionSlider(
            options=[(f"{v:g}", j) for j, v in enumerate(self.log_tau)],
            value=int(np.argmin(np.abs(self.log_tau - log_tau))), description="log τ",
            continuous_update=False)
        self.readout = widgets.Label()
        self.output = widgets.Output()
        n = len(self.panels)
        with plt.ioff():
            self.map_fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.4), squeeze=False)
        self.map_axes = axes[0]
        self._images = []
        for ax, (name, ds) in zip(self.map_axes, self.panels.items(), strict=True):
            img = ax.imshow(np.zeros(ds["temperature"].shape[:2]), origin="lower",
                            aspect="auto", cmap="inferno", interpolation="nearest")
            ax.set_title(name)
            ax.set_xlabel(self.dims[1])
            self._images.append(img)
        self.map_axes[0].set_ylabel(self.dims[0])
        self._colorbar = self.map_fig.colorbar(self._images[-1], ax=list(self.map_axes))
        self._markers = [ax.plot([], [], "c+", ms=12, mew=2)[0] for ax in self.map_axes]
        self.map_fig.canvas.mpl_connect("button_press_event", self._on_click)
        self.quantity.observe(lambda _: self._redraw(), names="value")
        self.depth.observe(lambda _: self._draw_maps(), names="value")
        canvas = self.map_fig.canvas
        self.widget = widgets.VBox([
            widgets.HBox([self.quantity, self.depth]),
            canvas if isinstance(canvas, widgets.DOMWidget) else widgets.Output(),
            self.readout, self.output])
        shape = first["temperature"].shape[:2]
        self.pixel = (shape[0] // 2, shape[1] // 2)
        self._redraw()

    def _redraw(self) -> None:
        self._draw_maps()
        self.select(*self.pixel)

    def _draw_maps(self) -> None:
        q, j = self.quantity.value, self.depth.value
        maps = [_display(ds[q].values[..., j].astype(np.float64), q)
                for ds in self.panels.values()]
        finite = np.concatenate([m[np.isfinite(m)] for m in maps])
        lo, hi = (np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0))
        for img, m in zip(self._images, maps, strict=True):
            img.set_data(m)
            img.set_clim(lo, hi if hi > lo else lo + 1.0)
        self._colorbar.set_label(f"{QUANTITIES[q][1]} at log τ = {self.log_tau[j]:g}")
        self.map_fig.canvas.draw_idle()

    def select(self, iy: int, ix: int) -> None:
        """Draw the stratifications of pixel ``(iy, ix)`` from every result."""
        import matplotlib.pyplot as plt
        from IPython.display import display

        first = next(iter(self.panels.values()))
        iy, ix = clip_pixel(iy, ix, first["temperature"].shape)
        self.pixel = (iy, ix)
        for marker in self._markers:
            marker.set_data([ix], [iy])
        self.map_fig.canvas.draw_idle()
        q = self.quantity.value
        sigma_name = QUANTITIES[q][0]
        parts = []
        with plt.ioff():
            fig, ax = plt.subplots(figsize=(6, 3.4))
        for name, ds in self.panels.items():
            v = ds[q].values[iy, ix].astype(np.float64)
            shown = _display(v, q)
            style = "k--" if name == "truth" else "-"
            line = ax.plot(self.log_tau, shown, style, label=name)[0]
            if sigma_name in ds:
                s = ds[sigma_name].values[iy, ix].astype(np.float64)
                if QUANTITIES[q][3]:
                    lo, hi = shown - s, shown + s  # σ of log n_e is in dex
                else:
                    lo, hi = _display(v - s, q), _display(v + s, q)
                ax.fill_between(self.log_tau, lo, hi, color=line.get_color(), alpha=0.2)
            if "quality" in ds:
                parts.append(f"{name}: quality {int(ds['quality'].values[iy, ix])}, "
                             f"χ² {float(ds['chi2'].values[iy, ix]):.3g}")
        ax.set_xlabel(r"log$_{10}\,\tau_{500}$")
        ax.set_ylabel(QUANTITIES[q][1])
        ax.set_title(f"pixel {self.dims[0]}={iy}, {self.dims[1]}={ix}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        self.readout.value = f"pixel ({iy}, {ix}) — " + "; ".join(parts)
        self.output.clear_output(wait=True)
        with self.output:
            display(fig)
        plt.close(fig)
