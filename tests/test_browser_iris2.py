"""Drive notebooks/05_iris2.ipynb in a real JupyterLab + Chromium.

What it proves: the notebook runs in a live kernel, the explorer's map canvas
(ipympl) receives a mouse click on a map, and the click selects another pixel:
the readout names the new pixel and the detail panel (profiles, model with σ)
is re-rendered. Moving the log τ slider changes the readout's log τ. If the
click or the slider callbacks did nothing, the readout text and the detail PNG
would stay the same and the test would fail.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.browser

NOTEBOOK = "notebooks/05_iris2.ipynb"


def test_click_on_map_selects_pixel_and_slider_moves_log_tau(lab):
    page = lab.open(NOTEBOOK)
    lab.run_all(page)
    page.wait_for_selector(".jupyter-matplotlib-canvas-div", timeout=120_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-label')]"
        ".some(l => l.textContent.startsWith('pixel y=15 x=20'))", timeout=60_000)
    before_text, before_png = lab.pixel_readout(page, last=False), lab.detail_image(page)
    lab.screenshot(page, "before")

    # first map (k2v intensity) spans figure x 0.01-0.15 and y 0.04-0.84 (from the bottom)
    canvas = page.locator(".jupyter-matplotlib-canvas-div").last
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    canvas.click(position={"x": 0.04 * box["width"], "y": 0.3 * box["height"]})
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-label')]"
        ".some(l => l.textContent.startsWith('pixel y=') &&"
        " !l.textContent.startsWith('pixel y=15 x=20'))", timeout=60_000)
    page.wait_for_function(
        "old => { const i = [...document.querySelectorAll('.widget-vbox img')];"
        " return i.length > 0 && i[i.length - 1].getAttribute('src') !== old; }",
        arg=before_png, timeout=60_000)
    after_text = lab.pixel_readout(page, last=False)
    lab.screenshot(page, "after_click")
    assert after_text != before_text
    y, x = map(int, re.match(r"pixel y=(\d+) x=(\d+)", after_text).groups())
    assert x < 15 and y > 15, after_text  # left and upper part of a 30 x 40 map

    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    handle.press("ArrowRight")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-label')]"
        ".some(l => l.textContent.startsWith('pixel y=') && l.textContent.endsWith('log τ -2.8'))",
        timeout=60_000)
    lab.screenshot(page, "after_slider")
