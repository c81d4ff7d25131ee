"""The main job on embedded data: ``iris-lab demo``.

Writes labelled netCDF results and PNG figures into one folder and returns
their paths. Steps:

1. the shipped FAL-C reference atmosphere → ``falc.nc`` and ``falc.png``;
2. the main job: a synthetic IRIS level-2 raster (held-out NLTE atmospheres,
   IRIS PSF and photon noise, written as FITS) is read back and inverted by the
   IRIS² look-up against the shipped Mg II database → ``iris2_result.nc``
   (model maps, σ, χ², quality, and the truth beside them) and ``iris2_maps.png``.

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


def iris2_step(out: Path, shape: tuple[int, int] = (48, 64), seed: int = 0) -> dict[str, Path]:
    """Synthetic IRIS raster → level-2 FITS → reader → IRIS² look-up → maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from iris_lab.io.iris import read_iris_raster, write_iris_raster
    from iris_lab.methods.iris2 import IRIS2, load_database, synthetic_raster

    data = Path(__file__).parent / "data"
    database = load_database(data / "mgii_database.nc")
    heldout = load_database(data / "mgii_heldout.nc")
    raster, truth, _ = synthetic_raster(heldout, shape, seed=seed, exptime=8.0)
    fits_path = write_iris_raster(raster, out / "synthetic_iris_l2.fits", exptime=8.0)
    observed = read_iris_raster(fits_path)
    result = IRIS2().fit(database).predict(observed)
    for name in ("temperature", "v_los", "v_turb", "n_e"):
        result[f"true_{name}"] = truth[name].transpose(*result[name].dims)
    result.attrs["database_entries"] = int(database.sizes["entry"])
    nc_path = out / "iris2_result.nc"
    result.to_netcdf(nc_path, engine="h5netcdf")

    k2v = observed.sel(wavelength=2796.20, method="nearest")
    panels = [
        (k2v, "Mg II k2v [DN/s]", "gray", {}),
        (result["temperature"].sel(log_tau=-4.0, method="nearest"), "T, IRIS² [K]", "inferno", {}),
        (truth["temperature"].sel(log_tau=-4.0, method="nearest"), "T, truth [K]", "inferno", {}),
        (result["v_los"].sel(log_tau=-4.0, method="nearest") * 1e-5,
         "v_los, IRIS² [km/s]", "RdBu_r", {"vmin": -8, "vmax": 8}),
        (np.log10(result["n_e"].sel(log_tau=-4.0, method="nearest")),
         "log n_e, IRIS² [cm⁻³]", "viridis", {}),
        (np.log10(result["chi2"]), "log χ²", "magma", {}),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    t_range = np.nanpercentile(truth["temperature"].sel(log_tau=-4.0, method="nearest"), [2, 98])
    for ax, (array, title, cmap, kwargs) in zip(axes.flat, panels, strict=True):
        if title.startswith("T,"):
            kwargs = {"vmin": t_range[0], "vmax": t_range[1]}
        image = ax.imshow(np.asarray(array), origin="lower", cmap=cmap, aspect="auto", **kwargs)
        ax.set_title(title + ("" if title.startswith("Mg") or "χ" in title else " at log τ = −4"))
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"Synthetic IRIS raster {shape[0]}×{shape[1]} inverted by IRIS² look-up "
                 f"({database.sizes['entry']} database entries)")
    png_path = out / "iris2_maps.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return {"synthetic IRIS level-2 raster (FITS)": fits_path,
            "IRIS² result (netCDF)": nc_path, "IRIS² maps (PNG)": png_path}


def run_demo(out: str | Path = "iris_lab_demo") -> dict[str, Path]:
    """Run every demo step; returns ``{description: path}`` of what was written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    outputs: dict[str, Path] = {}
    outputs.update(reference_atmosphere_step(out))
    outputs.update(iris2_step(out))
    return outputs
