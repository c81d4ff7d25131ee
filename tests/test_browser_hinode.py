"""Drive notebooks/08_hinode_sp.ipynb in a real JupyterLab + Chromium.

What it proves: the notebook (real Hinode/SP sample, noise estimate, mode-1
LTE inversion of all 25 pixels, maps and residual table) runs in a live
kernel, the explorer's map canvas (ipympl) receives a mouse click, and the
click selects the pixel under the mouse: the readout names it and the detail
panel (Stokes I, Q, U, V with fit and residuals / σ) is re-rendered. If the
click handler did nothing, the readout text and the detail PNG would stay the
same and the test would fail.
"""

from __future__ import annotations

import re

import pytest

from iris_lab.widgets.iris2 import map_axes_positions

pytestmark = pytest.mark.browser

NOTEBOOK = "notebooks/08_hinode_sp.ipynb"
START = "pixel y=0 x=4"          # the notebook selects the lower-right pixel of the 5 x 5 map
N_MAPS, NY, NX = 5, 5, 5         # the explorer's maps and the size of the field of view
TARGET = (3, 1)                  # the pixel clicked: upper left of the centre


def _pixel_centre(y: int, x: int) -> tuple[float, float]:
    """Canvas fractions (from the left, from the top) of the centre of pixel (y, x)
    on the first map (origin lower left, image stretched over its axes box)."""
    left, bottom, width, height = map_axes_positions(N_MAPS)[0]
    return left + width * (x + 0.5) / NX, 1.0 - (bottom + height * (y + 0.5) / NY)


def test_click_on_map_selects_pixel(lab):
    page = lab.open(NOTEBOOK)
    lab.run_all(page)
    before_text, before_png = lab.wait_for_explorer(page, START)
    assert before_text.startswith(START) and "χ²_ν" in before_text and "start" in before_text
    page.locator(".jupyter-matplotlib-canvas-div").last.scroll_into_view_if_needed()
    page.wait_for_timeout(1000)            # let the canvas draw before the screenshot
    lab.screenshot(page, "hinode_before")

    after_text = lab.click_map(page, *_pixel_centre(*TARGET), START, before_png)
    page.wait_for_timeout(1500)            # let the canvas redraw its markers
    lab.screenshot(page, "hinode_after_click")
    page.locator(".widget-vbox img").last.scroll_into_view_if_needed()
    lab.screenshot(page, "hinode_detail")
    assert after_text != before_text
    y, x = map(int, re.match(r"pixel y=(\d+) x=(\d+)", after_text).groups())
    assert (y, x) == TARGET, after_text
