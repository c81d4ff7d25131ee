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
    before_text, before_png = lab.wait_for_explorer(page, START)
    lab.screenshot(page, "coupled_before")

    # first map (continuum) spans figure x 0.01-0.32 and y 0.04-0.84 (from the bottom);
    # (0.06, 0.3 from the top) is the centre of its upper-left pixel (y=2, x=0)
    after_text = lab.click_map(page, 0.06, 0.3, START, before_png)
    page.wait_for_timeout(1500)            # let the canvas redraw its markers
    lab.screenshot(page, "coupled_after_click")
    page.locator(".widget-vbox img").last.scroll_into_view_if_needed()
    lab.screenshot(page, "coupled_detail")
    assert after_text != before_text
    y, x = map(int, re.match(r"pixel y=(\d+) x=(\d+)", after_text).groups())
    assert (y, x) == (2, 0), after_text     # upper-left pixel of the 3 x 3 map
