"""What the map widgets share: pixel selection, the map view, markers, PNG rendering."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
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


def png_bytes(fig: Any, dpi: int = 72) -> bytes:
    """A matplotlib figure rendered to PNG bytes.

    Example
    -------
    >>> from matplotlib.figure import Figure
    >>> png_bytes(Figure(figsize=(1, 1)))[:4]
    b'\\x89PNG'
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def as_png(fig: Any, dpi: int = 72) -> Any:
    """An ``IPython.display.Image`` of a figure (works under any matplotlib backend).

    Example
    -------
    >>> from matplotlib.figure import Figure
    >>> type(as_png(Figure(figsize=(1, 1)))).__name__
    'Image'
    """
    from IPython.display import Image

    return Image(data=png_bytes(fig, dpi))


def move_markers(markers: Sequence[Any], y: int, x: int, figure: Any, view: Any,
                 interactive: bool) -> None:
    """Put every marker on pixel ``(y, x)`` and show the map again: redraw the
    ipympl canvas, or re-render the PNG of the ``view`` image widget.

    Example
    -------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> fig, ax = plt.subplots()
    >>> (marker,) = ax.plot([0], [0], "+")
    >>> view, clickable = map_view(fig, lambda event: None)
    >>> move_markers([marker], 3, 5, fig, view, clickable)
    >>> [float(v[0]) for v in marker.get_data()], bytes(view.value[:4])
    ([5.0, 3.0], b'\\x89PNG')
    """
    for marker in markers:
        marker.set_data([x], [y])
    if interactive:
        figure.canvas.draw_idle()
    else:
        view.value = png_bytes(figure)


class MapPicker(ClickSelect):
    """Base of the click-a-pixel explorers: maps of a field of view side by side in
    one figure, a cyan marker on each, a readout label and a detail image.

    A subclass sets ``shape``, ``selected``, calls :meth:`_build` with its maps
    and defines ``select(y, x)``, which calls :meth:`_move_markers` and fills
    ``readout`` and ``detail``. A click inside any map selects the pixel under it.

    Example
    -------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> class Picker(MapPicker):
    ...     def __init__(self, image):
    ...         self.shape, self.selected = image.shape, (0, 0)
    ...         self._build([(image, "map", "gray", None, None)], figsize=(2, 2))
    ...     def select(self, y, x):
    ...         self.selected = clip_pixel(y, x, self.shape)
    ...         self._move_markers(*self.selected)
    ...         self.readout.value = "pixel y={} x={}".format(*self.selected)
    >>> picker = Picker(np.zeros((3, 4)))
    >>> picker.select(5, 1)
    >>> picker.readout.value
    'pixel y=2 x=1'
    """

    def _build(self, maps: Sequence[tuple[Any, str, str, float | None, float | None]],
               figsize: tuple[float, float], title_size: float = 8.0) -> None:
        """Draw ``maps`` (data, title, colour map, vmin, vmax) and assemble ``widget``."""
        import ipywidgets as widgets
        import matplotlib.pyplot as plt

        from iris_lab.widgets.iris2 import map_axes_positions

        self.readout = widgets.Label(value="")
        self.detail = widgets.Image(format="png")
        with plt.ioff():
            self.map_fig = plt.figure(figsize=figsize)
        self.map_axes = [self.map_fig.add_axes(p) for p in map_axes_positions(len(maps))]
        self._markers = []
        for ax, (data, title, cmap, lo, hi) in zip(self.map_axes, maps, strict=True):
            ax.imshow(data, origin="lower", cmap=cmap, aspect="auto", interpolation="nearest",
                      vmin=lo, vmax=hi)
            ax.set_title(title, fontsize=title_size)
            ax.set_xticks([])
            ax.set_yticks([])
            (marker,) = ax.plot([0], [0], "+", color="cyan", ms=12, mew=2)
            self._markers.append(marker)
        self.map_view, self.interactive = map_view(self.map_fig, self._on_click)
        self.widget = widgets.VBox([self.map_view, self.readout, self.detail])

    def _on_click(self, event: Any) -> None:
        if event.inaxes not in self.map_axes or event.xdata is None:
            return
        self.select(int(round(event.ydata)), int(round(event.xdata)))

    def _move_markers(self, y: int, x: int) -> None:
        move_markers(self._markers, y, x, self.map_fig, self.map_view, self.interactive)

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
