"""Panels of the mode-1 LTE inversion of a Hinode/SP Fe I 6301/6302 cube.

Everything but :func:`plot_observation` takes the ``xarray.Dataset`` of
:func:`iris_lab.inversion.lte.invert_hinode_mode1`: dims ``(y, x)``,
``observed`` and ``fit`` ``(y, x, stokes, wavelength)``, ``chi2_reduced``,
``start``, the maps ``temperature``, ``v_los``, ``b_field``, ``inclination``
at ``log_tau_map`` −1 and 0, and the noise σ in ``attrs["noise_sigma"]``.

* :func:`plot_observation` — the observed continuum map and the Stokes
  I, Q, U, V of every pixel with their mean.
* :func:`plot_maps` — the inverted T, v_los, |B| and inclination at
  log τ = −1 and 0 with χ²_ν.
* :func:`residual_table` — rms residual / σ and share of χ² per Stokes
  parameter, per pixel or summarised over the pixels.
* :func:`plot_hinode_pixel` — one pixel: Stokes I, Q, U, V observed and
  fitted, and below each the residual in units of σ.
* :class:`HinodeExplorer` — maps (observed continuum, T at log τ = 0, |B| at
  log τ = −1, v_los at log τ = 0, χ²_ν) in one matplotlib figure; with the
  ``ipympl`` backend (``%matplotlib widget``) a click selects a pixel, whose
  :func:`plot_hinode_pixel` panel is re-rendered as a PNG below a readout
  label.

Example
-------
>>> from iris_lab.widgets.hinode import HinodeExplorer, residual_table  # doctest: +SKIP
>>> residual_table(ds)                                     # doctest: +SKIP
>>> explorer = HinodeExplorer(ds)                          # doctest: +SKIP
>>> explorer.select(0, 4)                                  # doctest: +SKIP
>>> explorer.widget                                        # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np

from iris_lab.io.hinode import TELLURIC_HALF_WIDTH, telluric_free
from iris_lab.widgets.pixel import MapPicker, clip_pixel, png_bytes

#: Stokes parameters in the order of the ``stokes`` dimension.
STOKES: tuple[str, ...] = ("I", "Q", "U", "V")


def _fitted_mask(wavelength: np.ndarray, half_width: float = TELLURIC_HALF_WIDTH) -> np.ndarray:
    """``(4, n_wavelength)`` True where a sample enters χ² (telluric O2 out of Stokes I)."""
    mask = np.ones((4, wavelength.size), dtype=bool)
    mask[0] = telluric_free(wavelength, half_width)
    return mask


def _colour_range(values: Any, symmetric: bool) -> tuple[float, float]:
    """Finite min and max of ``values``; symmetric about 0 (velocities) when asked."""
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    if symmetric:
        lim = max(abs(lo), abs(hi), 1e-3)
        return -lim, lim
    return lo, hi


def _require_map(ds: Any) -> None:
    """Refuse a result over a list of pixels: these panels need its (y, x) maps."""
    dims = ds["chi2_reduced"].dims
    if dims != ("y", "x"):
        raise ValueError(f"a (y, x) result is needed, got dims {dims}: invert all pixels "
                         "(invert_hinode_mode1 without pixels=)")


def _normalised_residual(ds: Any) -> np.ndarray:
    """``(observed − fit) / σ`` with shape ``(y, x, stokes, wavelength)``."""
    sigma = float(ds.attrs["noise_sigma"])
    return (np.asarray(ds["observed"].values) - np.asarray(ds["fit"].values)) / sigma


def _start_names(ds: Any) -> list[str]:
    meanings = str(ds["start"].attrs.get("flag_meanings", "")).split()
    return meanings


def _start_name(ds: Any, y: int, x: int) -> str:
    if "start" not in ds:
        return "?"
    index = int(ds["start"].values[y, x])
    names = _start_names(ds)
    return names[index] if 0 <= index < len(names) else str(index)


def residual_table(ds: Any, summary: bool = True,
                   telluric_half_width: float = TELLURIC_HALF_WIDTH) -> Any:
    """rms residual / σ and share of χ² per Stokes parameter.

    The residual is ``(observed − fit) / noise_sigma`` over the samples that
    enter χ²: all of Q, U, V and Stokes I outside ±``telluric_half_width``
    around the telluric O2 lines. The share of χ² weights the squared
    residuals with ``attrs["stokes_weight"]`` (as the inversion does; equal
    weights when absent), so the four shares of a pixel add up to one.

    Parameters
    ----------
    ds
        Result of :func:`~iris_lab.inversion.lte.invert_hinode_mode1`.
    summary
        ``True``: one row per Stokes parameter with the median, minimum and
        maximum over the pixels of rms/σ, the median share of χ², and the
        median rms of the observed profile itself / σ (the residual of a
        zero model: near 1 for a parameter without signal above the noise).
        ``False``: one row per pixel (index ``y``, ``x``) with the rms/σ of
        I, Q, U, V and ``chi2_reduced``.
    telluric_half_width
        Half width [Å] of the windows left out of Stokes I; 0 keeps all.

    Returns
    -------
    pandas.DataFrame

    Example
    -------
    >>> import numpy as np, xarray as xr
    >>> obs = np.zeros((1, 2, 4, 3))
    >>> fit = obs.copy()
    >>> fit[..., 0, :] = 0.02                       # Stokes I off by 20 σ everywhere
    >>> ds = xr.Dataset({"observed": (("y", "x", "stokes", "wavelength"), obs),
    ...                  "fit": (("y", "x", "stokes", "wavelength"), fit),
    ...                  "chi2_reduced": (("y", "x"), np.ones((1, 2)))},
    ...                 coords={"stokes": list("IQUV"), "wavelength": [6301.0, 6301.1, 6303.0]},
    ...                 attrs={"noise_sigma": 1e-3})
    >>> residual_table(ds)["rms/σ median"].round(6).tolist()
    [20.0, 0.0, 0.0, 0.0]
    """
    import pandas as pd

    _require_map(ds)
    wave = np.asarray(ds["wavelength"].values, dtype=float)
    mask = _fitted_mask(wave, telluric_half_width)
    resid2 = _normalised_residual(ds) ** 2                               # (y, x, 4, w)
    ny, nx = resid2.shape[:2]
    n = mask.sum(-1)
    rms = np.sqrt(np.where(mask, resid2, 0.0).sum(-1) / np.maximum(n, 1))  # (y, x, 4)
    weight = np.asarray(ds.attrs.get("stokes_weight", np.ones(4)), dtype=float).reshape(4)
    chi2 = weight * np.where(mask, resid2, 0.0).sum(-1)
    total = chi2.sum(-1, keepdims=True)
    share = np.divide(chi2, total, out=np.zeros_like(chi2), where=total > 0)
    if not summary:
        index = pd.MultiIndex.from_product([range(ny), range(nx)], names=["y", "x"])
        table = pd.DataFrame(rms.reshape(ny * nx, 4), index=index, columns=list(STOKES))
        if "chi2_reduced" in ds:
            table["chi2_reduced"] = np.asarray(ds["chi2_reduced"].values).ravel()
        return table
    observed2 = (np.asarray(ds["observed"].values) / float(ds.attrs["noise_sigma"])) ** 2
    signal = np.sqrt(np.where(mask, observed2, 0.0).sum(-1) / np.maximum(n, 1))
    flat, flat_share = rms.reshape(-1, 4), share.reshape(-1, 4)
    return pd.DataFrame({"rms/σ median": np.median(flat, 0), "rms/σ min": flat.min(0),
                         "rms/σ max": flat.max(0), "χ² share median": np.median(flat_share, 0),
                         "observed rms/σ median": np.median(signal.reshape(-1, 4), 0)},
                        index=pd.Index(list(STOKES), name="stokes"))


def _mark_lines(ax: Any, stokes_i: bool) -> None:
    from iris_lab.io.hinode import FE_6301, FE_6302, TELLURIC_O2

    for lam in (FE_6301, FE_6302):
        ax.axvline(lam, color="0.75", lw=0.6, ls="--", zorder=0)
    if stokes_i:
        for t in TELLURIC_O2:
            ax.axvspan(t - TELLURIC_HALF_WIDTH, t + TELLURIC_HALF_WIDTH, color="0.9", lw=0,
                       zorder=0)


def plot_hinode_pixel(ds: Any, y: int, x: int, fig: Any = None) -> Any:
    """Stokes I, Q, U, V of one pixel, observed and fitted, with residuals / σ.

    Top row: observed (dots) and fitted (line) Stokes I, Q, U, V in units of
    the quiet-Sun continuum; bottom row: ``(observed − fit) / σ`` with the
    ±1 σ band. Each title gives the parameter's rms residual / σ (over the
    samples that enter χ², see :func:`residual_table`). Grey bands in Stokes
    I: telluric O2 windows, left out of the fit; dashed: the Fe I lines.

    Parameters
    ----------
    ds
        Result of :func:`~iris_lab.inversion.lte.invert_hinode_mode1`.
    y, x
        The pixel.
    fig
        Figure to draw into (a new one when ``None``).

    Returns
    -------
    matplotlib.figure.Figure

    Example
    -------
    >>> fig = plot_hinode_pixel(ds, 0, 4)     # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    _require_map(ds)

    if fig is None:
        fig = Figure(figsize=(13, 5.4))
    fig.clear()
    axes = fig.subplots(2, 4, sharex=True, gridspec_kw={"height_ratios": [1.6, 1]})
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.1, top=0.87, wspace=0.3, hspace=0.1)
    wave = np.asarray(ds["wavelength"].values, dtype=float)
    mask = _fitted_mask(wave)
    obs = np.asarray(ds["observed"].values[y, x])
    fit = np.asarray(ds["fit"].values[y, x])
    resid = _normalised_residual(ds)[y, x]
    for k, s in enumerate(STOKES):
        ax, ax_r = axes[0, k], axes[1, k]
        _mark_lines(ax, k == 0)
        _mark_lines(ax_r, k == 0)
        ax.plot(wave, obs[k], ".", color="k", ms=3, label="observed")
        ax.plot(wave, fit[k], color="C3", lw=1.1, label="fit")
        rms = float(np.sqrt(np.mean(resid[k][mask[k]] ** 2)))
        ax.set_title(f"Stokes {s} · rms residual {rms:.2f} σ", fontsize=9)
        ax_r.axhspan(-1.0, 1.0, color="C0", alpha=0.15, lw=0)
        ax_r.axhline(0.0, color="k", lw=0.6)
        ax_r.plot(wave, resid[k], ".-", color="C0", ms=2.5, lw=0.6)
        ax_r.set_xlabel("λ [Å, air]")
        ax_r.ticklabel_format(axis="x", useOffset=False)
        ax_r.tick_params(axis="x", labelsize=7)
    axes[0, 0].set_ylabel("I / I$_c$(quiet Sun)")
    axes[1, 0].set_ylabel("(obs − fit) / σ")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    chi2 = float(ds["chi2_reduced"].values[y, x]) if "chi2_reduced" in ds else float("nan")
    fig.suptitle(f"pixel y={y} x={x} · χ²_ν {chi2:.3g} · start {_start_name(ds, y, x)} · "
                 f"σ = {float(ds.attrs['noise_sigma']):.2e} I$_c$", fontsize=10)
    return fig


def plot_observation(obs: Any, fig: Any = None) -> Any:
    """The observed cube: continuum map and the Stokes profiles of every pixel.

    Parameters
    ----------
    obs
        Result of :func:`iris_lab.io.hinode.read_hinode_sp` (``spectra``
        ``(y, x, stokes, wavelength)`` and ``continuum_intensity``).
    fig
        Figure to draw into (a new one when ``None``).

    Returns
    -------
    matplotlib.figure.Figure
        Left: the continuum map; right: Stokes I, Q, U, V of every pixel
        (thin grey) and their mean (black), the Fe I lines dashed, the
        telluric O2 windows shaded in Stokes I.

    Example
    -------
    >>> fig = plot_observation(read_hinode_sp(path))     # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    if fig is None:
        fig = Figure(figsize=(14, 3.2))
    fig.clear()
    axes = fig.subplots(1, 5, gridspec_kw={"width_ratios": [0.8, 1, 1, 1, 1]})
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.17, top=0.88, wspace=0.35)
    cont = np.asarray(obs["continuum_intensity"].values)
    image = axes[0].imshow(cont, origin="lower", cmap="gray", interpolation="nearest")
    fig.colorbar(image, ax=axes[0], fraction=0.046, pad=0.03)
    axes[0].set_title("continuum I$_c$ / I$_c$(quiet Sun)", fontsize=9)
    axes[0].set_xlabel("x [pixel]")
    axes[0].set_ylabel("y [pixel]")
    wave = np.asarray(obs["wavelength"].values, dtype=float)
    spectra = np.asarray(obs["spectra"].values).reshape(-1, 4, wave.size)
    for k, (ax, s) in enumerate(zip(axes[1:], STOKES, strict=True)):
        _mark_lines(ax, k == 0)
        ax.plot(wave, spectra[:, k].T, color="0.7", lw=0.5)
        ax.plot(wave, spectra[:, k].mean(0), color="k", lw=1.4)
        ax.set_title(f"Stokes {s}/I$_c$: {spectra.shape[0]} pixels, mean", fontsize=9)
        ax.set_xlabel("λ [Å, air]")
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.tick_params(axis="x", labelsize=7)
    return fig


#: Quantities of :func:`plot_maps`: variable, scale, label, colour map.
_MAP_QUANTITIES = (("temperature", 1.0, "T [K]", "inferno"),
                   ("v_los", 1e-5, "v$_{los}$ [km/s]", "RdBu_r"),
                   ("b_field", 1.0, "|B| [G]", "viridis"),
                   ("inclination", 180.0 / np.pi, "inclination [°]", "twilight"))


def plot_maps(ds: Any, fig: Any = None) -> Any:
    """Inverted maps at log τ = −1 and 0, and χ²_ν.

    Parameters
    ----------
    ds
        Result of :func:`~iris_lab.inversion.lte.invert_hinode_mode1`.
    fig
        Figure to draw into (a new one when ``None``).

    Returns
    -------
    matplotlib.figure.Figure
        Rows: log τ = −1 and 0; columns: T, v_los (positive: red-shift,
        away from the observer), |B| and inclination (one colour scale per
        column), and χ²_ν in the last column of the first row.

    Example
    -------
    >>> fig = plot_maps(ds)     # doctest: +SKIP
    """
    from matplotlib.figure import Figure

    if fig is None:
        fig = Figure(figsize=(14, 5.4))
    fig.clear()
    axes = fig.subplots(2, 5)
    fig.subplots_adjust(left=0.04, right=0.97, bottom=0.05, top=0.9, wspace=0.35,
                        hspace=0.3)
    taus = [float(v) for v in ds["log_tau_map"].values]
    for j, (name, scale, label, cmap) in enumerate(_MAP_QUANTITIES):
        values = np.asarray(ds[name].values, dtype=float) * scale         # (y, x, tau)
        lo, hi = _colour_range(values, symmetric=name == "v_los")
        for i, tau in enumerate(taus):
            image = axes[i, j].imshow(values[..., i], origin="lower", cmap=cmap, vmin=lo,
                                      vmax=hi, interpolation="nearest")
            axes[i, j].set_title(f"{label} at log τ={tau:g}", fontsize=9)
            fig.colorbar(image, ax=axes[i, j], fraction=0.046, pad=0.03)
    image = axes[0, 4].imshow(ds["chi2_reduced"].values, origin="lower", cmap="magma",
                              interpolation="nearest")
    axes[0, 4].set_title("χ²_ν", fontsize=9)
    fig.colorbar(image, ax=axes[0, 4], fraction=0.046, pad=0.03)
    axes[1, 4].set_axis_off()
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("mode-1 LTE inversion (origin lower left: y up, x right)", fontsize=10)
    return fig


def _continuum_map(ds: Any, continuum: Any) -> np.ndarray:
    """The continuum map given, or the median observed Stokes I in line-free windows."""
    if continuum is not None:
        return np.asarray(getattr(continuum, "values", continuum), dtype=float)
    from iris_lab.io.hinode import continuum_windows

    free = continuum_windows(np.asarray(ds["wavelength"].values, dtype=float))
    return np.median(np.asarray(ds["observed"].values)[:, :, 0, free], axis=-1)


class HinodeExplorer(MapPicker):
    """Maps of a Hinode/SP inversion; click a pixel for its Stokes fits.

    Parameters
    ----------
    ds
        Result of :func:`~iris_lab.inversion.lte.invert_hinode_mode1` with all
        pixels (dims ``y``, ``x``).
    continuum
        ``(y, x)`` continuum map of the first panel (e.g.
        ``read_hinode_sp(path)["continuum_intensity"]``); ``None``: the
        median observed Stokes I in the line-free windows.

    Attributes
    ----------
    widget : ipywidgets.VBox
        Map canvas (or a PNG without ipympl), readout label and detail image.
    readout : ipywidgets.Label
        ``"pixel y=.. x=.. · χ²_ν ... · start ..."``.
    detail : ipywidgets.Image
        :func:`plot_hinode_pixel` of the selected pixel.
    selected : tuple[int, int]

    Example
    -------
    >>> explorer = HinodeExplorer(ds)       # doctest: +SKIP
    >>> explorer.select(0, 4)               # doctest: +SKIP
    >>> explorer.readout.value              # doctest: +SKIP
    'pixel y=0 x=4 · χ²_ν 85.1 · start quiet_v+0.0_azimuth_qu'
    """

    def __init__(self, ds: Any, continuum: Any = None) -> None:
        _require_map(ds)
        self.ds = ds
        self.shape = (ds.sizes["y"], ds.sizes["x"])
        self.selected = (self.shape[0] // 2, self.shape[1] // 2)
        k1, k0 = (int(np.argmin(np.abs(ds["log_tau_map"].values - v))) for v in (-1.0, 0.0))
        maps = [(_continuum_map(ds, continuum), "observed I$_c$", "gray", "{:.3f}"),
                (ds["temperature"].values[..., k0], "T(log τ=0) [K]", "inferno", "{:.0f}"),
                (ds["b_field"].values[..., k1], "|B|(log τ=−1) [G]", "viridis", "{:.0f}"),
                (ds["v_los"].values[..., k0] / 1e5, "v$_{los}$(log τ=0) [km/s]", "RdBu_r",
                 "{:+.2f}"),
                (ds["chi2_reduced"].values, "χ²_ν", "magma", "{:.0f}")]
        scaled = []
        for data, title, cmap, fmt in maps:
            data = np.asarray(data, dtype=float)
            lo, hi = _colour_range(data, symmetric=cmap == "RdBu_r")
            scaled.append((data, f"{title}\n{fmt.format(lo)} … {fmt.format(hi)}", cmap, lo, hi))
        # 1.7 in per map: the five maps fit the width of a notebook output at 100 dpi
        self._build(scaled, figsize=(1.7 * len(maps), 2.1), title_size=7)
        self.select(*self.selected)

    def select(self, y: int, x: int) -> None:
        """Select pixel ``(y, x)``: move the markers, update readout and detail image."""
        self.selected = clip_pixel(y, x, self.shape)
        y, x = self.selected
        self._move_markers(y, x)
        chi2 = float(self.ds["chi2_reduced"].values[y, x])
        self.readout.value = (f"pixel y={y} x={x} · χ²_ν {chi2:.3g} · "
                              f"start {_start_name(self.ds, y, x)}")
        self.detail.value = png_bytes(plot_hinode_pixel(self.ds, y, x))
