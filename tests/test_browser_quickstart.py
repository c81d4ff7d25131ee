"""Drive notebooks/00_quickstart.ipynb in a real JupyterLab + Chromium.

What it proves: the notebook runs in a live kernel, its ipywidgets render, and
moving the slider with the keyboard changes both the readout label and the
rendered figure. If the slider callback did nothing, the label text and the
figure's PNG bytes would stay the same and the test would fail.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.browser

NOTEBOOK = "notebooks/00_quickstart.ipynb"


def _explorer_label(page) -> str:
    return page.locator(".widget-label", has_text=re.compile(r"^depth \d")).first.inner_text()


def _explorer_image(page) -> str:
    box = page.locator(".widget-vbox", has=page.locator(".widget-slider")).first
    return box.locator("img").first.get_attribute("src")


def test_slider_moves_marker_and_readout(lab):
    page = lab.open(NOTEBOOK)
    lab.run_all(page)
    page.wait_for_selector(".widget-slider .noUi-handle")
    before_label, before_image = _explorer_label(page), _explorer_image(page)
    assert before_label.startswith("depth 60 ")  # the notebook's last cell selects 60
    lab.screenshot(page, "before")

    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    for _ in range(5):
        handle.press("ArrowRight")
    page.wait_for_function(
        "() => [...document.querySelectorAll('.widget-label')]"
        ".some(l => l.textContent.startsWith('depth 65 '))", timeout=60_000)
    page.wait_for_function(
        "old => { const i = [...document.querySelectorAll('.widget-vbox img')];"
        " return i.length > 0 && i.every(x => x.getAttribute('src') !== old); }",
        arg=before_image, timeout=60_000)
    after_label, after_image = _explorer_label(page), _explorer_image(page)
    lab.screenshot(page, "after")

    assert after_label.startswith("depth 65 "), after_label
    assert after_label != before_label
    assert after_image != before_image
