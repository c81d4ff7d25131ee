"""Pixel selection shared by the map widgets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def clip_pixel(iy: int, ix: int, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(iy, ix)`` clipped into the first two axes of ``shape``, as ints."""
    ny, nx = shape[:2]
    return int(np.clip(iy, 0, ny - 1)), int(np.clip(ix, 0, nx - 1))


class ClickSelect:
    """A click inside any axes selects the pixel under it via ``self.select(iy, ix)``."""

    def _on_click(self, event) -> None:
        if event.inaxes is None or event.xdata is None:
            return
        self.select(int(round(event.ydata)), int(round(event.xdata)))


def map_view(figure: Any, on_click: Callable[[Any], None]) -> tuple[Any, bool]:
    """The widget that shows a map figure, and whether it is clickable.

    With the ipympl backend the figure's own canvas (header, toolbar and
    footer hidden, fixed size) with ``on_click`` connected to mouse presses;
    otherwise an empty ``ipywidgets.Image`` for the caller to fill with a PNG.

    Example
    -------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> view, clickable = map_view(plt.figure(), lambda event: None)
    >>> clickable, type(view).__name__
    (False, 'Image')
    """
    import ipywidgets as widgets

    canvas = figure.canvas
    if not type(canvas).__module__.startswith("ipympl"):
        return widgets.Image(format="png"), False
    canvas.header_visible = False
    canvas.toolbar_visible = False
    canvas.footer_visible = False
    canvas.resizable = False
    canvas.mpl_connect("button_press_event", on_click)
    return canvas, True
