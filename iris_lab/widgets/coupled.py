"""Panels of the coupled log(gf) experiment: Fig. 6-like errors and a pixel picker.

Both take the ``xarray.Dataset`` of
:func:`iris_lab.inversion.experiment.run_coupled_experiment`.

* :func:`plot_overview` — the observed spectra with the line positions and
  the perturbed starting atomic data.
* :func:`plot_log_gf_errors` — the error of the inverted log(gf) of every line
  (inverted − exact) against its line depth and against a blending measure
  (distance to the nearest other line): mode 2 as the mean over pixels with
  the pixel-to-pixel spread as error bar, mode 3 and the spatially averaged
  method as points, the perturbed starting values as grey crosses; the
  symbols are coloured by the error of the inverted Δλ (as Fig. 6 of
  Vukadinović et al. 2024).
* :class:`CoupledExplorer` — maps of the field of view (observed continuum,
  true T and mode-3 T at log τ = 0) in one matplotlib figure; with the
  ``ipympl`` backend (``%matplotlib widget``) it is a live canvas and a click
  selects a pixel. The detail image of the selected pixel (T, v_los, B: truth
  and modes 1, 2, 3; the pixel's mode-2 log(gf) errors; Stokes I, Q, U, V
  observed and fitted) is re-rendered as a PNG on every selection, and the
  readout label names the pixel.

Example
-------
>>> from iris_lab.widgets.coupled import CoupledExplorer, plot_log_gf_errors  # doctest: +SKIP
>>> plot_log_gf_errors(ds)                                       # doctest: +SKIP
>>> explorer = CoupledExplorer(ds)                               # doctest: +SKIP
>>> explorer.select(0, 2)                                        # doctest: +SKIP
>>> explorer.widget                                              # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iris_lab.widgets.pixel import (
    MapPicker,
    clip_pixel,
    png_bytes,
)
from iris_lab.widgets.pixel import (
    as_png as as_png,  # re-exported: notebook 03 imports it from here
)

#: Colours of the truth and of the modes in every panel.
COLOURS: dict[str, str] = {"truth": "k", "1": "C0", "2": "C1", "3": "C3", "averaged": "C2",
                           "start": "0.55"}
#: Markers of the modes in the log(gf) error plot.
MARKERS: dict[str, str] = {"2": "o", "3": "s", "averaged": "^", "start": "x"}
_AGAINST = {"depth": ("line_depth", "line depth 1 − I/I$_c$ (mean spectrum)"),
            "blend": ("blend_separation", "distance to the nearest other line [mÅ]")}


def plot_overview(ds: Any, fig: Any = None) -> Any:
    """The problem: observed spectra with the lines, and the perturbed start.

    Left: Stokes I of every pixel (thin) and their mean (thick) with the line
    positions (the reference line in bold). Right: the starting errors of
    log(gf) [dex] and Δλ [mÅ] of every line.

    Parameters
    ----------
    ds
        Result of :func:`~iris_lab.inversion.experiment.run_coupled_experiment`.
    fig
        Figure to draw into (a new one when ``None``).

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> fig = plot_overview(ds)     # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    if fig is None:
        fig = Figure(figsize=(12, 3.6))
    fig.clear()
    ax, ax_gf = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    fig.subplots_adjust(left=0.06, right=0.93, bottom=0.22, top=0.9, wspace=0.3)
    wl = ds["wavelength"].values
    stokes_i = ds["observed"].sel(stokes="I").values.reshape(-1, wl.size)
    ax.plot(wl, stokes_i.T, color="0.7", lw=0.6)
    ax.plot(wl, stokes_i.mean(0), color="k", lw=1.6, label="mean")
    ref = int(ds.attrs.get("reference_line", -1))
    for i, (lam, label) in enumerate(zip(ds["line_wavelength"].values, ds["line"].values,
                                         strict=True)):
        ax.axvline(lam, color="C3" if i == ref else "C0", lw=0.8, ls="--")
        ax.text(lam, 1.0, f" {label}" + (" (ref)" if i == ref else ""), rotation=90,
                fontsize=7, va="top", ha="right", transform=ax.get_xaxis_transform(),
                fontweight="bold" if i == ref else "normal")
    ax.set_xlabel("λ [Å, air]")
    ax.set_ylabel("I / I$_c$(quiet Sun)")
    ax.ticklabel_format(axis="x", useOffset=False)
    ax.set_title(f"Stokes I of the {stokes_i.shape[0]} pixels", fontsize=9)
    pos = np.arange(ds.sizes["line"])
    ax_gf.bar(pos - 0.2, ds["log_gf_start_error"].values, 0.4, color="C0",
              label="Δlog gf [dex]")
    ax_dl = ax_gf.twinx()
    ax_dl.bar(pos + 0.2, 1e3 * ds["dlambda_start_error"].values, 0.4, color="C1",
              label="Δλ [mÅ]")
    ax_gf.axhline(0.0, color="k", lw=0.7)
    ax_gf.set_ylabel("start Δlog gf [dex]", color="C0")
    ax_dl.set_ylabel("start Δλ [mÅ]", color="C1")
    lim = max(float(np.abs(ds["log_gf_start_error"].values).max()), 1e-3) * 1.15
    ax_gf.set_ylim(-lim, lim)
    lim_dl = max(float(np.abs(1e3 * ds["dlambda_start_error"].values).max()), 1e-3) * 1.15
    ax_dl.set_ylim(-lim_dl, lim_dl)
    ax_gf.set_xticks(pos)
    ax_gf.set_xticklabels([str(s).rsplit(" ", 1)[0] + ("*" if i == ref else "")
                           for i, s in enumerate(ds["line"].values)], fontsize=7, rotation=45)
    ax_gf.set_title("perturbed start (* reference line: exact)", fontsize=9)
    return fig


def plot_log_gf_errors(ds: Any, against: str | tuple[str, ...] = ("depth", "blend"),
                       fig: Any = None) -> Any:
    """Error of the inverted log(gf) per line against line depth / blending.

    Parameters
    ----------
    ds
        Result of :func:`~iris_lab.inversion.experiment.run_coupled_experiment`.
    against
        ``"depth"`` (line depth of the mean spectrum), ``"blend"`` (distance
        to the nearest other line) or both (one panel each).
    fig
        Figure to draw into (a new one when ``None``).

    Returns
    -------
    matplotlib.figure.Figure
        Mode 2: mean over pixels ± standard deviation over pixels (error
        bars); mode 3 and the averaged method: their global values (± σ when
        computed); grey crosses: the perturbed start. Colour: Δλ error [mÅ]
        of the same mode. The reference line (exact data, not fitted) is
        marked by a dotted vertical line.

    Example
    -------
    >>> fig = plot_log_gf_errors(ds, against="depth")     # doctest: +SKIP
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    kinds = (against,) if isinstance(against, str) else tuple(against)
    for kind in kinds:
        if kind not in _AGAINST:
            raise ValueError(f"against must be 'depth' or 'blend', got {kind!r}")
    if fig is None:
        fig = Figure(figsize=(5.2 * len(kinds) + 1.2, 4.0))
    fig.clear()
    axes = np.atleast_1d(fig.subplots(1, len(kinds), sharey=True))
    modes = [str(m) for m in ds["mode"].values if str(m) != "1"]
    ref = int(ds.attrs.get("reference_line", -1))
    n_lines = ds.sizes["line"]
    free = np.arange(n_lines) != ref
    errors = {m: (ds["log_gf_error"].sel(mode=m).values, ds["log_gf_spread"].sel(mode=m).values,
                  1e3 * ds["dlambda_error"].sel(mode=m).values) for m in modes}
    errors["start"] = (ds["log_gf_start_error"].values, np.full(n_lines, np.nan),
                       1e3 * ds["dlambda_start_error"].values)
    dl_all = np.concatenate([v[2][free] for v in errors.values()])
    dl_max = float(np.nanmax(np.abs(dl_all))) if np.isfinite(dl_all).any() else 1.0
    norm = TwoSlopeNorm(0.0, -max(dl_max, 1e-3), max(dl_max, 1e-3))
    order = ["start"] + modes
    mappable = None
    for ax, kind in zip(axes, kinds, strict=True):
        var, xlabel = _AGAINST[kind]
        xv = np.asarray(ds[var].values, dtype=float)
        finite_x = xv[np.isfinite(xv)]
        span = float(np.ptp(finite_x)) if finite_x.size > 1 else 1.0
        shift = 0.012 * (span if span > 0 else 1.0)
        for j, m in enumerate(order):
            gf, spread, dl = errors[m]
            xs = xv[free] + (j - (len(order) - 1) / 2) * shift
            if np.isfinite(spread[free]).any():
                ax.errorbar(xs, gf[free], yerr=np.nan_to_num(spread[free]), fmt="none",
                            ecolor=COLOURS.get(m, "k"), elinewidth=1, capsize=2, alpha=0.8,
                            zorder=1)
            label = {"start": "start (perturbed)", "averaged": "spatially averaged"}.get(
                m, f"mode {m}")
            if m == "start":
                ax.scatter(xs, gf[free], marker="x", color=COLOURS["start"], s=30,
                           label=label, zorder=2)
            else:
                mappable = ax.scatter(xs, gf[free], c=dl[free], cmap="coolwarm", norm=norm,
                                      marker=MARKERS.get(m, "o"), s=46,
                                      edgecolors=COLOURS.get(m, "k"), linewidths=1.4,
                                      label=label, zorder=3)
        ax.axhline(0.0, color="k", lw=0.7)
        if 0 <= ref < n_lines and np.isfinite(xv[ref]):
            ax.axvline(xv[ref], color="k", ls=":", lw=1.0)
            ax.text(xv[ref], 0.98, f"{ds['line'].values[ref]} (reference)", rotation=90,
                    transform=ax.get_xaxis_transform(), fontsize=6, va="top", ha="right")
        for i in np.flatnonzero(free):
            if np.isfinite(xv[i]):
                ax.text(xv[i], 0.98, str(ds["line"].values[i]), rotation=90, fontsize=6,
                        transform=ax.get_xaxis_transform(), va="top", ha="right",
                        color="0.4")
        ax.set_xlabel(xlabel)
        if kind == "blend" and finite_x.size and finite_x.max() / max(finite_x.min(), 1e-9) > 20:
            ax.set_xscale("log")
    axes[0].set_ylabel("Δlog gf = inverted − exact [dex]")
    axes[0].legend(fontsize=7, loc="best")
    if mappable is not None:
        fig.colorbar(mappable, ax=list(axes), label="Δλ error [mÅ]", pad=0.02)
    fig.suptitle("log(gf) errors per line (mode 2: mean ± spread over pixels)", fontsize=9)
    return fig


def plot_pixel(ds: Any, y: int, x: int, fig: Any = None,
               modes: tuple[str, ...] = ("1", "2", "3")) -> Any:
    """Stratifications and Stokes fits of one pixel.

    Top row: T, v_los and |B| against log τ (truth and the inverted
    atmospheres of ``modes``) and the pixel's own mode-2 log(gf) errors next
    to the global mode-3 ones. Bottom row: Stokes I, Q, U, V observed (dots)
    and fitted.

    Parameters
    ----------
    ds
        Result of :func:`~iris_lab.inversion.experiment.run_coupled_experiment`.
    y, x
        The pixel.
    fig
        Figure to draw into (a new one when ``None``).
    modes
        Which inversions to overplot (those in ``ds``).

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> fig = plot_pixel(ds, 1, 1)     # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    if fig is None:
        fig = Figure(figsize=(13, 6.2))
    fig.clear()
    axes = fig.subplots(2, 4)
    fig.subplots_adjust(left=0.055, right=0.99, bottom=0.09, top=0.93, wspace=0.32,
                        hspace=0.42)
    have = [m for m in modes if m in [str(v) for v in ds["mode"].values]]
    lt = ds["log_tau"].values
    for ax, (name, scale, title) in zip(axes[0, :3], (
            ("temperature", 1e-3, "T [kK]"), ("v_los", 1e-5, "v$_{los}$ [km/s]"),
            ("b_field", 1.0, "|B| [G]")), strict=True):
        ax.plot(lt, ds[f"{name}_true"].values[y, x] * scale, color=COLOURS["truth"], lw=2,
                label="truth")
        for m in have:
            ax.plot(lt, ds[name].sel(mode=m).values[y, x] * scale, color=COLOURS[m], lw=1.2,
                    label=f"mode {m}")
        ax.set_xlabel("log τ$_{500}$")
        ax.set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=7)
    ax = axes[0, 3]
    n_lines = ds.sizes["line"]
    pos = np.arange(n_lines)
    ref = int(ds.attrs.get("reference_line", -1))
    bars = [("start", ds["log_gf_start_error"].values, COLOURS["start"])]
    if "2" in [str(v) for v in ds["mode"].values]:
        bars.append(("mode 2, this pixel", ds["log_gf_error_pixel"].values[y, x],
                     COLOURS["2"]))
    if "3" in [str(v) for v in ds["mode"].values]:
        bars.append(("mode 3 (global)", ds["log_gf_error"].sel(mode="3").values, COLOURS["3"]))
    width = 0.8 / len(bars)
    for j, (label, values, colour) in enumerate(bars):
        ax.bar(pos + (j - (len(bars) - 1) / 2) * width, values, width, color=colour,
               label=label)
    ax.axhline(0.0, color="k", lw=0.7)
    ax.set_xticks(pos)
    ax.set_xticklabels([str(s).rsplit(" ", 1)[0] + ("*" if i == ref else "")
                        for i, s in enumerate(ds["line"].values)], fontsize=7, rotation=45)
    ax.set_title("Δlog gf [dex] (* reference)", fontsize=9)
    ax.legend(fontsize=7)
    wl = ds["wavelength"].values
    obs = ds["observed"].values[y, x]
    for k, (ax, s) in enumerate(zip(axes[1], "IQUV", strict=True)):
        ax.plot(wl, obs[k], ".", color=COLOURS["truth"], ms=3, label="observed")
        for m in have:
            ax.plot(wl, ds["fit"].sel(mode=m).values[y, x, k], color=COLOURS[m], lw=1.0,
                    label=f"mode {m}")
        ax.set_title(f"Stokes {s}", fontsize=9)
        ax.set_xlabel("λ [Å, air]")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.tick_params(axis="x", labelsize=7)
    axes[1, 0].legend(fontsize=7)
    return fig


class CoupledExplorer(MapPicker):
    """Maps of the experiment's field of view; click a pixel for its details.

    Parameters
    ----------
    ds
        Result of :func:`~iris_lab.inversion.experiment.run_coupled_experiment`.
    modes
        Inversions shown in the detail panels.

    Attributes
    ----------
    widget : ipywidgets.VBox
        Map canvas (or a PNG without ipympl), readout label and detail image.
    readout : ipywidgets.Label
        ``"pixel y=.. x=.. · family · χ²_ν ..."``.
    detail : ipywidgets.Image
    selected : tuple[int, int]

    Example
    -------
    >>> explorer = CoupledExplorer(ds)       # doctest: +SKIP
    >>> explorer.select(2, 0)                # doctest: +SKIP
    >>> explorer.readout.value               # doctest: +SKIP
    'pixel y=2 x=0 · granule · ...'
    """

    def __init__(self, ds: Any, modes: tuple[str, ...] = ("1", "2", "3")) -> None:
        self.ds = ds
        self.modes = modes
        self.shape = (ds.sizes["y"], ds.sizes["x"])
        self.selected = (self.shape[0] // 2, self.shape[1] // 2)
        k0 = int(np.argmin(np.abs(ds["log_tau"].values)))
        lam_c = float(ds["continuum"].attrs.get("wavelength", np.nan))
        maps = [(ds["continuum"].values, f"I$_c$ at {lam_c:.2f} Å", "gray"),
                (ds["temperature_true"].values[..., k0] / 1e3, "true T(log τ=0) [kK]", "inferno")]
        if "3" in [str(v) for v in ds["mode"].values]:
            maps.append((ds["temperature"].sel(mode="3").values[..., k0] / 1e3,
                         "mode 3 T(log τ=0) [kK]", "inferno"))
        t_range = np.nanpercentile(np.concatenate([m[0].ravel() for m in maps[1:]]), [0, 100])
        self._build([(data, title, cmap, *(t_range if cmap == "inferno" else (None, None)))
                     for data, title, cmap in maps], figsize=(2.6 * len(maps), 2.6))
        self.select(*self.selected)

    def select(self, y: int, x: int) -> None:
        """Select pixel ``(y, x)``: move the markers, update readout and detail image."""
        self.selected = clip_pixel(y, x, self.shape)
        y, x = self.selected
        self._move_markers(y, x)
        ds = self.ds
        chi2 = " ".join(f"{m}: {float(ds['chi2_reduced'].sel(mode=m).values[y, x]):.3g}"
                        for m in self.modes if m in [str(v) for v in ds["mode"].values])
        self.readout.value = (f"pixel y={y} x={x} · {ds['family'].values[y, x]} · "
                              f"χ²_ν {chi2}")
        self.detail.value = png_bytes(plot_pixel(ds, y, x, modes=self.modes))
