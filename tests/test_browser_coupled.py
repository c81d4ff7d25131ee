"""Drive notebooks/03_coupled_loggf.ipynb in a real JupyterLab + Chromium.

What it proves: the notebook (field of view, synthesis, modes 1/2/3 and the
spatially averaged inversion) runs in a live kernel, the explorer's map canvas
(ipympl) receives a mouse click, and the click selects the pixel under the
mouse: the readout names it and the detail panel (stratifications, log(gf)
errors, Stokes fits) is re-rendered. If the click handler did nothing, the
readout text and the detail PNG would stay the same and the test would fail.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.browser

NOTEBOOK = "notebooks/03_coupled_loggf.ipynb"
START = "pixel y=0 x=2"          # the notebook selects the lower-right pixel of the 3 x 3 map


def test_click_on_map_selects_pixel(lab):
    page = lab.open(NOTEBOOK)
    lab.run_all(page)
    page.wait_for_selector(".jupyter-matplotlib-canvas-div", timeout=120_000)
    page.wait_for_function(
        "s => [...document.querySelectorAll('.widget-label')]"
        ".some(l => l.textContent.startsWith(s))", arg=START, timeout=60_000)
    page.wait_for_function(
        "() => { const i = [...document.querySelectorAll('.widget-vbox img')];"
        " return i.length > 0 && !!i[i.length - 1].getAttribute('src'); }",
        timeout=60_000)
    before_text, before_png = lab.pixel_readout(page), lab.detail_image(page)
    lab.screenshot(page, "coupled_before")

    # first map (continuum) spans figure x 0.01-0.32 and y 0.04-0.84 (from the bottom);
    # (0.06, 0.3 from the top) is the centre of its upper-left pixel (y=2, x=0)
    canvas = page.locator(".jupyter-matplotlib-canvas-div").last
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    assert box is not None and box["width"] > 100
    canvas.click(position={"x": 0.06 * box["width"], "y": 0.3 * box["height"]})
    page.wait_for_function(
        "s => [...document.querySelectorAll('.widget-label')]"
        ".some(l => l.textContent.startsWith('pixel y=') && !l.textContent.startsWith(s))",
        arg=START, timeout=60_000)
    page.wait_for_function(
        "old => { const i = [...document.querySelectorAll('.widget-vbox img')];"
        " return i.length > 0 && i[i.length - 1].getAttribute('src') !== old; }",
        arg=before_png, timeout=60_000)
    after_text = lab.pixel_readout(page)
    page.wait_for_timeout(1500)            # let the canvas redraw its markers
    lab.screenshot(page, "coupled_after_click")
    page.locator(".widget-vbox img").last.scroll_into_view_if_needed()
    lab.screenshot(page, "coupled_detail")
    assert after_text != before_text
    y, x = map(int, re.match(r"pixel y=(\d+) x=(\d+)", after_text).groups())
    assert (y, x) == (2, 0), after_text     # upper-left pixel of the 3 x 3 map
