"""The README's main command: ``iris-lab demo`` writes readable results."""

from __future__ import annotations

import subprocess
import sys

import xarray as xr


def test_demo_command_writes_netcdf_and_png(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "iris_lab.cli", "demo", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    written = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if ": " in line]
    assert any(p.endswith(".nc") for p in written) and any(p.endswith(".png") for p in written)
    for path in written:
        assert (out / path.split("/")[-1]).stat().st_size > 1000, path
    for path in (p for p in written if p.endswith(".nc")):
        with xr.open_dataset(path, engine="h5netcdf") as dataset:
            assert dataset.data_vars, path
            for name, variable in dataset.data_vars.items():
                if variable.dtype.kind == "f":  # physical quantities; flags/indices are ints
                    assert "units" in variable.attrs, f"{path}:{name} has no units"
    for name in ("falc.png", "iris2_maps.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the main job: the raster went through the level-2 writer/reader and IRIS²
    with xr.open_dataset(out / "iris2_result.nc", engine="h5netcdf") as result:
        assert result.attrs["method"] == "iris2_lookup"
        assert result["temperature"].dims == ("y", "x", "log_tau")
        valid = result["quality"].values & 1 == 0  # not masked
        assert valid.mean() > 0.9
        # every unmasked pixel got a finite model from the database
        assert (result["index"].values[valid] >= 0).all()
        assert float(result["temperature"].isnull().values[valid].mean()) == 0.0
