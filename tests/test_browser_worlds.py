"""Drive notebooks/02_nlte_worlds.ipynb in a real JupyterLab + Chromium.

What it proves: the notebook runs top to bottom in a live kernel, the family
browser's widgets render, and moving the member slider with the keyboard
re-draws the atmosphere figure. If the callback did nothing, the figure's PNG
bytes would stay the same and the test would fail.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

NOTEBOOK = "notebooks/02_nlte_worlds.ipynb"


def _browser_image(page) -> str:
    return page.locator(".widget-output img").first.get_attribute("src")


def test_member_slider_redraws_the_atmosphere(lab):
    page = lab.open(NOTEBOOK)
    lab.run_all(page)
    page.wait_for_selector(".widget-slider .noUi-handle")
    page.wait_for_selector(".widget-output img")
    before = _browser_image(page)
    assert page.locator(".widget-dropdown select").first.input_value() == "plage"
    lab.screenshot(page, "before")

    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    for _ in range(3):
        handle.press("ArrowRight")
    page.wait_for_function(
        "old => { const i = document.querySelector('.widget-output img');"
        " return i !== null && i.getAttribute('src') !== old; }",
        arg=before, timeout=60_000)
    lab.screenshot(page, "after")
    assert _browser_image(page) != before
