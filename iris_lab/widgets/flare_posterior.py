"""Posterior viewer for FlareINN maps: click a pixel, see its posterior.

The viewer shows Hα and Ca II 8542 core images and the posterior-median
temperature at a chosen height (an interactive ipympl figure: click a pixel),
and for the selected pixel the 2-D histograms of the posterior draws of n_e, T
and v against height (γ = 0.3 power-law colour scale, as Osborne et al. 2019),
their medians (and the truth when known), the round-trip profiles over the
observed ones, and a table of line asymmetries (observed and round-trip).

Example
-------
``FlarePosteriorViewer(inn, cube, truth=truth)`` in a notebook cell.
"""

from __future__ import annotations

import numpy as np

from iris_lab.methods.asymmetry import NAMES as ASYM_NAMES
from iris_lab.methods.asymmetry import line_asymmetry
from iris_lab.methods.inn import FlareINN, atmosphere_to_x
from iris_lab.widgets.pixel import ClickSelect, clip_pixel, png_bytes
from iris_lab.widgets.pixel import as_png as as_png  # re-exported for notebook 07

_Q = (("n_e", "log$_{10}$ n$_e$ [cm$^{-3}$]"), ("temperature", "log$_{10}$ T [K]"),
      ("v_los", "sign(v) log$_{10}$(|v|/1 km s$^{-1}$ + 1)"))


def _grid_2x3(fig, figsize: tuple[float, float]):
    """``fig`` (a new one of ``figsize`` when ``None``) cleared, and its 2×3 axes."""
    from matplotlib.figure import Figure

    if fig is None:
        fig = Figure(figsize=figsize)
    fig.clear()
    return fig, fig.subplots(2, 3)


def plot_pixel_posterior(inn: FlareINN, draws: dict, observed: np.ndarray,
                         round_trip: np.ndarray, truth: dict | None = None, fig=None):
    """Histograms of the draws against height, and round-trip profiles.

    Parameters
    ----------
    inn
        The network (for its grids).
    draws
        ``sample`` output for one pixel: arrays ``(n_draws, n_height)``.
    observed
        ``(n_y,)`` normalised observed profiles on the training grids.
    round_trip
        ``(n_rt, n_y)`` posterior draws pushed forward.
    truth
        Optional true ``n_e``, ``temperature``, ``v_los`` ``(n_height,)``.
    fig
        Figure to draw into (a new one when ``None``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.colors import PowerNorm

    fig, axes = _grid_2x3(fig, (13, 6.5))
    nh = inn.n_height_
    h_mm = inn.heights_ / 1e8
    x = atmosphere_to_x(draws["n_e"], draws["temperature"], draws["v_los"])
    xt = (atmosphere_to_x(truth["n_e"], truth["temperature"], truth["v_los"])
          if truth is not None else None)
    order = np.argsort(h_mm)
    for i, (_q, label) in enumerate(_Q):
        ax = axes[0, i]
        vals = x[:, i * nh:(i + 1) * nh]
        lo, hi = np.percentile(vals, [0.5, 99.5])
        if xt is not None:
            lo, hi = min(lo, xt[i * nh:(i + 1) * nh].min()), max(hi, xt[i * nh:(i + 1) * nh].max())
        pad = 0.05 * (hi - lo + 1e-6)
        bins_v = np.linspace(lo - pad, hi + pad, 80)
        edges_h = np.concatenate([[h_mm[order][0] - 0.05],
                                  0.5 * (h_mm[order][1:] + h_mm[order][:-1]),
                                  [h_mm[order][-1] + 0.05]])
        hist = np.stack([np.histogram(vals[:, j], bins=bins_v)[0] for j in order], axis=1)
        ax.pcolormesh(edges_h, bins_v, hist, norm=PowerNorm(0.3), cmap="magma", shading="flat")
        ax.plot(h_mm[order], np.median(vals, 0)[order], color="cyan", lw=1.2, label="median")
        if xt is not None:
            ax.plot(h_mm[order], xt[i * nh:(i + 1) * nh][order], "w--", lw=1.0, label="truth")
        ax.set_xlabel("height [Mm]")
        ax.set_ylabel(label)
        if i == 0:
            ax.legend(loc="upper right", fontsize=8)
    for j, (name, grid, sl) in enumerate(
            (("Hα", inn.dl_halpha_, slice(0, inn.n_halpha_)),
             ("Ca II 8542", inn.dl_ca8542_, slice(inn.n_halpha_, inn.n_y)))):
        ax = axes[1, j]
        ax.plot(grid, round_trip[:, sl].T, color="tab:orange", alpha=0.15, lw=0.8)
        ax.plot(grid, np.median(round_trip[:, sl], 0), color="tab:red", lw=1.2,
                label="round trip (median)")
        ax.plot(grid, observed[sl], "k.-", lw=1.0, label="observed")
        ax.set_xlabel(f"{name} Δλ [Å]")
        ax.set_ylabel("normalised intensity")
        ax.legend(fontsize=8)
    axes[1, 2].axis("off")
    fig.tight_layout()
    return fig


def asymmetry_table(inn: FlareINN, observed: np.ndarray, round_trip: np.ndarray) -> str:
    """HTML table of line asymmetries: observed vs round-trip median profile."""
    rows = []
    med = np.median(round_trip, 0)
    for name, grid, sl in (("Hα", inn.dl_halpha_, slice(0, inn.n_halpha_)),
                           ("Ca 8542", inn.dl_ca8542_, slice(inn.n_halpha_, inn.n_y))):
        for label, prof in (("observed", observed[sl]), ("round trip", med[sl])):
            a = line_asymmetry(grid, prof)
            cells = "".join(f"<td>{float(a[k]):.3f}</td>" for k in ASYM_NAMES)
            rows.append(f"<tr><td>{name}</td><td>{label}</td>{cells}</tr>")
    head = "".join(f"<th>{k}</th>" for k in ("line", "profile", "λ0 [Å]", "σ [Å]", "λ0B [Å]",
                                              "λ0R [Å]", "δλ [Å]", "I_B/I_R"))
    return f"<table class='flare-asymmetry'><tr>{head}</tr>{''.join(rows)}</table>"


def plot_line_images(cube, fig=None):
    """Hα and Ca II 8542 images in the blue wing, core and red wing of a CRISP cube.

    Parameters
    ----------
    cube
        ``xarray.Dataset`` with ``halpha``, ``ca8542`` (y, x, offsets [Å]).
    fig
        Figure to draw into (a new one when ``None``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    fig, axes = _grid_2x3(fig, (12, 5.5))
    for row, (line, name) in enumerate((("halpha", "Hα"), ("ca8542", "Ca II 8542"))):
        da = cube[line]
        dl = da[da.dims[-1]].values
        for col, target in enumerate((-0.8, 0.0, 0.8)):
            k = int(np.argmin(np.abs(dl - target)))
            ax = axes[row, col]
            ax.imshow(da.values[..., k], origin="lower", cmap="gray")
            ax.set_title(f"{name} {dl[k]:+.1f} Å")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


class FlarePosteriorViewer(ClickSelect):
    """Interactive map → pixel posterior viewer (ipympl + ipywidgets).

    Parameters
    ----------
    inn
        A fitted :class:`~iris_lab.methods.inn.FlareINN`.
    cube
        ``xarray.Dataset`` with ``halpha``, ``ca8542`` (y, x, offsets [Å]).
    summary
        ``inn.posterior_summary(cube)``; computed (100 draws) when ``None``.
    truth
        Optional ``xarray.Dataset`` with ``n_e``, ``temperature``, ``v_los``
        (y, x, height) to overplot.
    n_draws, n_round_trip
        Draws for the selected pixel's histograms and round trip.

    Attributes
    ----------
    readout, height, output, image, table, widget
        The controls; ``select(iy, ix)`` selects a pixel programmatically.
    """

    def __init__(self, inn: FlareINN, cube, summary=None, truth=None, n_draws: int = 4000,
                 n_round_trip: int = 32, seed: int = 0) -> None:
        import ipywidgets as widgets
        import matplotlib.pyplot as plt

        self.inn, self.cube, self.truth = inn, cube, truth
        self.n_draws, self.n_round_trip, self.seed = n_draws, n_round_trip, seed
        self.summary = summary if summary is not None else inn.posterior_summary(cube, 100)
        self.grid_ha, self.grid_ca = inn.profiles_to_grid(cube)
        self.readout = widgets.Label()
        nh = inn.n_height_
        self.height = widgets.SelectionSlider(
            options=[(f"{h / 1e8:.2f} Mm", j) for j, h in enumerate(inn.heights_)],
            value=min(nh - 1, int(np.argmin(np.abs(inn.heights_ - 1.5e8)))),
            description="T at", continuous_update=False)
        self.output = widgets.Output()  # messages (flagged pixels)
        self.image = widgets.Image(format="png")
        self.table = widgets.HTML()
        with plt.ioff():
            self.map_fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.2))
        self.map_axes = axes
        ha_core = self.grid_ha[..., inn.n_halpha_ // 2]
        ca_core = self.grid_ca[..., inn.n_ca8542_ // 2]
        axes[0].imshow(ha_core, origin="lower", cmap="gray")
        axes[0].set_title("Hα core")
        axes[1].imshow(ca_core, origin="lower", cmap="gray")
        axes[1].set_title("Ca II 8542 core")
        self._t_img = axes[2].imshow(np.log10(self.summary["temperature"].values[..., 0]),
                                     origin="lower", cmap="inferno")
        self.map_fig.colorbar(self._t_img, ax=axes[2], label="log$_{10}$ T (median)")
        self._markers = [ax.plot([], [], "c+", ms=12, mew=2)[0] for ax in axes]
        self.map_fig.tight_layout()
        self.map_fig.canvas.mpl_connect("button_press_event", self._on_click)
        self.height.observe(lambda change: self._draw_t_map(), names="value")
        canvas = self.map_fig.canvas
        self.widget = widgets.VBox([canvas if isinstance(canvas, widgets.DOMWidget)
                                    else widgets.Output(), self.height, self.readout,
                                    self.output, self.image, self.table])
        self._draw_t_map()
        ny, nx = ha_core.shape
        self.select(ny // 2, nx // 2)

    def _draw_t_map(self) -> None:
        j = self.height.value
        t = np.log10(self.summary["temperature"].values[..., j])
        self._t_img.set_data(t)
        if np.isfinite(t).any():
            self._t_img.set_clim(np.nanmin(t), np.nanmax(t))
        self.map_axes[2].set_title(f"median T at {self.inn.heights_[j] / 1e8:.2f} Mm")
        self.map_fig.canvas.draw_idle()

    def select(self, iy: int, ix: int) -> None:
        """Show the posterior of pixel ``(iy, ix)``."""
        iy, ix = clip_pixel(iy, ix, self.grid_ha.shape)
        inn = self.inn
        q = int(self.summary["quality"].values[iy, ix])
        self.readout.value = (f"pixel y={iy} x={ix} | quality {q} | round-trip RMS "
                              f"{float(self.summary['round_trip_rms'].values[iy, ix]):.3f}")
        for m in self._markers:
            m.set_data([ix], [iy])
        self.map_fig.canvas.draw_idle()
        with self.output:
            self.output.clear_output()
            if q & 7:
                print(f"pixel flagged ({self.summary['quality'].attrs['flag_meanings']}): {q}")
                return
        prof = (self.grid_ha[iy, ix], self.grid_ca[iy, ix])
        draws = inn.sample(prof, self.n_draws, seed=self.seed)
        obs = inn._as_y(prof)
        rt = inn.round_trip(prof, self.n_round_trip, seed=self.seed + 1)
        truth = None
        if self.truth is not None:
            truth = {k: self.truth[k].values[iy, ix] for k in ("n_e", "temperature", "v_los")}
        self.image.value = png_bytes(plot_pixel_posterior(inn, draws, obs, rt, truth))
        self.table.value = asymmetry_table(inn, obs, rt)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
