"""Pixel explorer for IRIS² results: maps, a log τ slider, click a pixel for its details.

The maps (k2v intensity, RP index, T, v_los, log n_e at the slider's log τ, and
the temperature UMF when given) are drawn in one matplotlib figure; with the
``ipympl`` backend (``%matplotlib widget``) that figure is a live canvas and a
click on any map selects the pixel. The detail panel (observed profile, the
matched database profile and the pixel's RP; T, v_los and log n_e with their σ
band) is re-rendered as a PNG on every selection.

Example
-------
>>> from iris_lab.widgets.iris2 import IRIS2Explorer          # doctest: +SKIP
>>> explorer = IRIS2Explorer(raster, result, model, rp=rp)    # doctest: +SKIP
>>> explorer.select(10, 12)                                   # doctest: +SKIP
>>> explorer.widget                                           # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from iris_lab.widgets.pixel import map_view, move_markers, png_bytes

#: Vacuum wavelength of the Mg II k2v peak used for the intensity map [Å].
K2V_VACUUM = 2796.20


def map_axes_positions(n: int) -> list[tuple[float, float, float, float]]:
    """Figure-fraction positions (left, bottom, width, height) of ``n`` maps in a row.

    Example
    -------
    >>> map_axes_positions(2)[0]
    (0.01, 0.04, 0.47, 0.8)
    """
    width = 0.98 / n
    return [(round(0.01 + i * width, 4), 0.04, round(width - 0.02, 4), 0.8) for i in range(n)]


def plot_representative_profiles(rp: Any, ids: list[int] | None = None, ax=None):
    """RPs with their ±1 spread band (default: the 6 most populated).

    Example
    -------
    >>> plot_representative_profiles(rp)  # doctest: +SKIP
    """
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(9, 3.5)).subplots()
    counts = np.asarray(rp.counts_)
    ids = list(np.argsort(counts)[::-1][:6]) if ids is None else list(ids)
    wl = rp.profiles_["wavelength"].values
    for k in ids:
        c = rp.profiles_.values[k]
        s = rp.spread_.values[k]
        (line,) = ax.plot(wl, c, lw=1, label=f"RP {k} ({counts[k]} px)")
        ax.fill_between(wl, c - s, c + s, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("wavelength [Å, vacuum]")
    ax.set_ylabel(f"I [{rp.profiles_.attrs.get('units', '')}]")
    ax.legend(fontsize=7, ncols=2)
    return ax.figure


class IRIS2Explorer:
    """Maps of an IRIS² result with a log τ slider and click-to-inspect pixels.

    Parameters
    ----------
    raster
        The observed ``(y, x, wavelength)`` raster (intensity units).
    result
        ``IRIS2.predict`` (or RP path) result for that raster.
    model
        The fitted :class:`iris_lab.methods.iris2.IRIS2` (for matched profiles).
    rp
        Optional fitted :class:`iris_lab.methods.rp.RepresentativeProfiles`.
    umf
        Optional UMF dataset (``umf_temperature`` map panel).

    Attributes
    ----------
    widget : ipywidgets.VBox
        Slider, map canvas, readout and detail image.
    selected : tuple[int, int]
    """

    def __init__(self, raster: xr.DataArray, result: xr.Dataset, model: Any, *,
                 rp: Any = None, umf: xr.Dataset | None = None) -> None:
        import ipywidgets as widgets
        import matplotlib.pyplot as plt

        self.raster = raster.transpose(..., "wavelength")
        self.result = result
        self.model = model
        self.rp = rp
        self.umf = umf
        self.labels = rp.predict(self.raster).values if rp is not None else None
        self.log_tau = result["log_tau"].values
        self.selected = (0, 0)
        k = int(np.argmin(np.abs(self.log_tau + 3.0)))
        self.slider = widgets.SelectionSlider(
            options=[(f"{v:.1f}", i) for i, v in enumerate(self.log_tau)], value=k,
            description="log τ", continuous_update=False,
            layout=widgets.Layout(width="60%"))
        self.readout = widgets.Label(value="")
        self.detail = widgets.Image(format="png")
        panels = ["intensity", "rp" if self.labels is not None else "chi2", "temperature",
                  "v_los", "n_e"] + (["umf"] if umf is not None else [])
        self.panels = panels
        with plt.ioff():
            self.map_fig = plt.figure(figsize=(2.3 * len(panels), 2.6))
        self.map_axes = [self.map_fig.add_axes(pos) for pos in map_axes_positions(len(panels))]
        self._images: dict[str, Any] = {}
        self._markers = []
        self._draw_maps()
        self.map_view, self.interactive = map_view(self.map_fig, self._on_click)
        self.slider.observe(lambda change: self.set_log_tau(change["new"]), names="value")
        self.widget = widgets.VBox([self.slider, self.map_view, self.readout, self.detail])
        self.select(*self.selected)

    # ------------------------------------------------------------------ maps
    def _map_data(self, name: str, k: int) -> tuple[np.ndarray, str, str]:
        res = self.result
        if name == "intensity":
            img = self.raster.sel(wavelength=K2V_VACUUM, method="nearest").values
            return img, "I(k2v)", "gray"
        if name == "rp":
            return self.labels.astype(float), "RP index", "tab20"
        if name == "chi2":
            return np.log10(res["chi2"].values), "log χ²", "magma"
        if name == "temperature":
            return res["temperature"].values[..., k] / 1e3, "T [kK]", "inferno"
        if name == "v_los":
            return res["v_los"].values[..., k] / 1e5, "v_los [km/s]", "RdBu_r"
        if name == "n_e":
            return np.log10(res["n_e"].values[..., k]), "log n_e", "viridis"
        return self.umf["umf_temperature"].values[..., k], "UMF T", "cividis"

    def _draw_maps(self) -> None:
        k = int(self.slider.value)
        for ax, name in zip(self.map_axes, self.panels, strict=True):
            data, title, cmap = self._map_data(name, k)
            if name in self._images:
                self._images[name].set_data(data)
                finite = data[np.isfinite(data)]
                if finite.size and name not in ("intensity", "rp"):
                    self._images[name].set_clim(*np.percentile(finite, [1, 99]))
            else:
                ax.set_xticks([])
                ax.set_yticks([])
                self._images[name] = ax.imshow(data, origin="lower", cmap=cmap, aspect="auto",
                                               interpolation="nearest")
                (marker,) = ax.plot([0], [0], "+", color="cyan", ms=10, mew=2)
                self._markers.append(marker)
            extra = f" @ {self.log_tau[k]:.1f}" if name not in ("intensity", "rp", "chi2") \
                else ""
            ax.set_title(title + extra, fontsize=8)

    def _refresh_maps(self) -> None:
        y, x = self.selected
        move_markers(self._markers, y, x, self.map_fig, self.map_view, self.interactive)

    def set_log_tau(self, k: int) -> None:
        """Show the maps at log τ index ``k``."""
        if int(self.slider.value) != int(k):
            self.slider.value = int(k)
            return
        self._draw_maps()
        self._refresh_maps()
        self._update_readout()
        self._update_detail()

    # ---------------------------------------------------------------- pixels
    def _on_click(self, event) -> None:
        if event.inaxes not in self.map_axes or event.xdata is None:
            return
        self.select(int(round(event.ydata)), int(round(event.xdata)))

    def select(self, y: int, x: int) -> None:
        """Select pixel (y, x): move the markers, update readout and details."""
        ny, nx = self.result["chi2"].shape
        self.selected = (int(np.clip(y, 0, ny - 1)), int(np.clip(x, 0, nx - 1)))
        self._refresh_maps()
        self._update_readout()
        self._update_detail()

    def _update_readout(self) -> None:
        y, x = self.selected
        res = self.result
        rp = f" · RP {int(self.labels[y, x])}" if self.labels is not None else ""
        lt = self.log_tau[int(self.slider.value)]
        self.readout.value = (
            f"pixel y={y} x={x}{rp} · entry {int(res['index'].values[y, x])} · "
            f"χ² {float(res['chi2'].values[y, x]):.3g} · quality "
            f"{int(res['quality'].values[y, x])} · log τ {lt:.1f}")

    def _update_detail(self) -> None:
        from matplotlib.figure import Figure

        y, x = self.selected
        res = self.result
        k = int(self.slider.value)
        fig = Figure(figsize=(13, 2.8))
        axes = fig.subplots(1, 4)
        fig.subplots_adjust(left=0.05, right=0.99, bottom=0.2, wspace=0.3)
        wl = self.raster["wavelength"].values
        ax = axes[0]
        ax.plot(wl, self.raster.values[y, x], color="k", lw=1, label="observed")
        idx = int(res["index"].values[y, x])
        if idx >= 0:
            ax.plot(self.model.wavelength_, self.model._profiles[idx], color="C3", lw=1,
                    label=f"database {idx}")
        if self.labels is not None and self.labels[y, x] >= 0:
            ax.plot(wl, self.rp.profiles_.values[self.labels[y, x]], color="C0", lw=1,
                    ls="--", label=f"RP {int(self.labels[y, x])}")
        ax.set_xlim(2795.4, 2797.3)
        ax.set_xlabel("λ [Å]")
        ax.legend(fontsize=7)
        lt = self.log_tau
        for ax, (var, sig, scale, title, log) in zip(axes[1:], (
                ("temperature", "sigma_temperature", 1e-3, "T [kK]", False),
                ("v_los", "sigma_v_los", 1e-5, "v_los [km/s]", False),
                ("n_e", "sigma_log_n_e", 1.0, "log n_e [cm⁻³]", True)), strict=True):
            val = res[var].values[y, x].astype(float)
            sg = res[sig].values[y, x].astype(float)
            if log:
                val = np.log10(val)
            else:
                val, sg = val * scale, sg * scale
            ax.plot(lt, val, color="C3")
            ax.fill_between(lt, val - sg, val + sg, color="C3", alpha=0.25, lw=0)
            ax.axvline(lt[k], color="gray", lw=0.8)
            ax.set_xlabel("log τ₅₀₀")
            ax.set_title(title, fontsize=9)
        self.detail.value = png_bytes(fig)
