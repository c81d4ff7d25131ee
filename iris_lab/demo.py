"""The main job on embedded data: ``iris-lab demo``.

Writes labelled netCDF results and PNG figures into one folder and returns
their paths. Steps:

1. the shipped FAL-C reference atmosphere → ``falc.nc`` and ``falc.png``.

Example
-------
>>> from iris_lab.demo import run_demo
>>> outputs = run_demo("demo_out")          # doctest: +SKIP
>>> sorted(outputs)                         # doctest: +SKIP
['reference atmosphere (netCDF)', 'reference atmosphere (PNG)']
"""

from __future__ import annotations

from pathlib import Path


def reference_atmosphere_step(out: Path) -> dict[str, Path]:
    """Write FAL-C as netCDF and plot it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iris_lab.atmosphere import Atmosphere
    from iris_lab.widgets.atmosphere import plot_atmosphere

    falc = Atmosphere.reference("falc")
    nc_path = falc.to_netcdf(out / "falc.nc")
    fig = plot_atmosphere(falc, "height")
    fig.suptitle("FAL-C (Fontenla, Avrett & Loeser 1993)", y=1.02)
    png_path = out / "falc.png"
    fig.savefig(png_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"reference atmosphere (netCDF)": nc_path, "reference atmosphere (PNG)": png_path}


def run_demo(out: str | Path = "iris_lab_demo") -> dict[str, Path]:
    """Run every demo step; returns ``{description: path}`` of what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    outputs.update(reference_atmosphere_step(out))
    return outputs
