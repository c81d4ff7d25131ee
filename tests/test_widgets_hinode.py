"""Fast tests of the Hinode/SP panels on a small synthetic result (no inversion)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import xarray as xr

from iris_lab.widgets.hinode import (
    HinodeExplorer,
    plot_hinode_pixel,
    plot_maps,
    residual_table,
)

SIGMA = 1e-3
START_NAMES = ("quiet_v+0.0_azimuth_qu", "penumbra_v+0.0_azimuth_qu")


def _result(ny: int = 3, nx: int = 4) -> xr.Dataset:
    """The layout of ``invert_hinode_mode1`` with known residuals / σ.

    Stokes I is off by ``2 (y + 1)`` σ at every fitted sample, Q by 1 σ,
    U by 0 and V by ±0.5 σ alternately; the telluric O2 samples of I are off
    by 1000 σ (they must be left out of the statistics).
    """
    wave = 6300.9 + 0.1 * np.arange(24)
    telluric = [int(np.argmin(np.abs(wave - t))) for t in (6302.0005, 6302.7640)]
    wave[telluric] = 6302.0005, 6302.7640                # on the telluric O2 lines
    rng = np.random.default_rng(0)
    fit = np.tile(np.array([1.0, 0.0, 0.0, 0.0])[:, None], (ny, nx, 1, wave.size))
    fit = fit + 0.01 * rng.standard_normal(fit.shape)
    obs = fit.copy()
    obs[:, :, 0, :] += 2.0 * SIGMA * (np.arange(ny) + 1.0)[:, None, None]
    obs[:, :, 0, telluric] += 1000.0 * SIGMA
    obs[:, :, 1, :] += SIGMA
    obs[:, :, 3, :] += 0.5 * SIGMA * (-1.0) ** np.arange(wave.size)
    dims = ("y", "x")
    maps = dims + ("log_tau_map",)
    ds = xr.Dataset(
        {"chi2_reduced": (dims, 1.0 + np.arange(ny * nx, dtype=float).reshape(ny, nx)),
         "temperature": (maps, rng.uniform(5000.0, 6500.0, (ny, nx, 2))),
         "v_los": (maps, rng.normal(0.0, 1e5, (ny, nx, 2))),
         "b_field": (maps, rng.uniform(0.0, 300.0, (ny, nx, 2))),
         "inclination": (maps, rng.uniform(0.0, np.pi, (ny, nx, 2))),
         "start": (dims, (np.arange(ny * nx) % 2).reshape(ny, nx),
                   {"flag_meanings": " ".join(START_NAMES)}),
         "observed": (dims + ("stokes", "wavelength"), obs),
         "fit": (dims + ("stokes", "wavelength"), fit)},
        coords={"log_tau_map": [-1.0, 0.0], "stokes": list("IQUV"),
                "wavelength": ("wavelength", wave, {"units": "Angstrom"}),
                "parameter": ["temperature_0", "b_field_0"],
                "best_fit": (("y", "x", "parameter"), np.zeros((ny, nx, 2)))},
        attrs={"noise_sigma": SIGMA, "stokes_weight": [1.0, 4.0, 4.0, 2.0]})
    return ds


def test_residual_table_per_pixel_and_summary():
    ds = _result()
    per_pixel = residual_table(ds, summary=False)
    assert per_pixel.shape == (12, 5)
    assert per_pixel.loc[(2, 1), "I"] == pytest.approx(6.0)
    assert per_pixel.loc[(0, 3), "chi2_reduced"] == pytest.approx(4.0)
    np.testing.assert_allclose(per_pixel["Q"], 1.0)
    np.testing.assert_allclose(per_pixel["U"], 0.0, atol=1e-12)
    np.testing.assert_allclose(per_pixel["V"], 0.5)

    summary = residual_table(ds)
    assert list(summary.index) == ["I", "Q", "U", "V"]
    np.testing.assert_allclose(summary["rms/σ median"], [4.0, 1.0, 0.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(summary["rms/σ min"], [2.0, 1.0, 0.0, 0.5], atol=1e-12)
    np.testing.assert_allclose(summary["rms/σ max"], [6.0, 1.0, 0.0, 0.5], atol=1e-12)
    # χ² share of the middle row (I at 4 σ on 22 fitted samples; Q weight 4, V weight 2)
    chi2 = np.array([16.0 * 22, 4.0 * 24, 0.0, 2.0 * 0.25 * 24])
    np.testing.assert_allclose(summary["χ² share median"], chi2 / chi2.sum())
    assert summary["χ² share median"].sum() == pytest.approx(1.0)
    # keeping the telluric samples lets the 1000-σ outliers in
    assert residual_table(ds, telluric_half_width=0.0).loc["I", "rms/σ median"] > 100.0


def test_explorer_select_updates_readout_and_detail():
    ds = _result()
    explorer = HinodeExplorer(ds)
    assert not explorer.interactive                    # Agg: the maps are a PNG
    assert len(explorer.map_axes) == 5
    explorer.select(0, 3)
    first_text, first_png = explorer.readout.value, bytes(explorer.detail.value)
    first_map = bytes(explorer.map_view.value)
    assert first_text == f"pixel y=0 x=3 · χ²_ν 4 · start {START_NAMES[1]}"
    assert first_png[:4] == b"\x89PNG"
    explorer.select(2, 0)
    assert explorer.selected == (2, 0)
    assert explorer.readout.value == f"pixel y=2 x=0 · χ²_ν 9 · start {START_NAMES[0]}"
    assert bytes(explorer.detail.value) != first_png
    assert bytes(explorer.map_view.value) != first_map        # the marker moved
    assert [float(v[0]) for v in explorer._markers[0].get_data()] == [0.0, 2.0]
    explorer.select(99, -5)                                    # clipped into the map
    assert explorer.selected == (2, 0)


def test_explorer_click_selects_pixel_under_mouse():
    explorer = HinodeExplorer(_result())

    class Event:
        inaxes, xdata, ydata = explorer.map_axes[2], 2.2, 0.9

    explorer._on_click(Event())
    assert explorer.selected == (1, 2)
    assert explorer.readout.value.startswith("pixel y=1 x=2 ")


def test_continuum_map_given_or_from_line_free_stokes_i():
    ds = _result()
    continuum = xr.DataArray(np.full((3, 4), 0.97), dims=("y", "x"))
    explorer = HinodeExplorer(ds, continuum=continuum)
    assert explorer.map_axes[0].images[0].get_array().mean() == pytest.approx(0.97)
    default = HinodeExplorer(ds).map_axes[0].images[0].get_array()
    assert default.shape == (3, 4) and abs(float(default.mean()) - 1.0) < 0.02


def test_pixel_titles_give_rms_per_stokes():
    fig = plot_hinode_pixel(_result(), 1, 2)
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles == ["Stokes I · rms residual 4.00 σ", "Stokes Q · rms residual 1.00 σ",
                      "Stokes U · rms residual 0.00 σ", "Stokes V · rms residual 0.50 σ"]
    assert "pixel y=1 x=2" in fig._suptitle.get_text()
    assert len(plot_maps(_result()).axes) > 10


def test_panels_refuse_a_result_over_a_pixel_list():
    """A result of ``invert_hinode_mode1(pixels=...)`` has a ``pixel`` dimension:
    the map panels say so instead of failing on a reshape."""
    flat = _result().stack(pixel=("y", "x")).reset_index("pixel", drop=True)
    flat = flat.transpose("pixel", ...)
    for call in (lambda: HinodeExplorer(flat), lambda: plot_hinode_pixel(flat, 0, 0),
                 lambda: residual_table(flat, summary=False)):
        with pytest.raises(ValueError, match="invert all pixels"):
            call()
