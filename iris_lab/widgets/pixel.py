"""Pixel selection shared by the map widgets."""

from __future__ import annotations

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
