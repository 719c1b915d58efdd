"""A u -> v surrogate from a user's NetCDF-3 file of (time, y, x) fields (issue 24; README "Bring
your own data"): fields stored without a channel axis train a U-Net through the real CLI, and
`evaluate` scores the field in its stored units beside predicting the train mean, with field panels."""
from __future__ import annotations

import pytest
from helpers import hpcforge

from benchmarks.own_data import write_netcdf3
from pipeline.analysis.evaluate import evaluate


@pytest.mark.slow
def test_a_netcdf3_time_y_x_surrogate_trains_a_unet_and_evaluates_in_its_units(tmp_path):
    nc = tmp_path / "fields.nc"
    write_netcdf3(nc, n=96, size=16)
    assert nc.read_bytes()[:4] == b"CDF\x01"                       # NetCDF-3 classic
    data = ["data=import_netcdf", f"data.params.path={nc}", "data.params.variables=[u,v]",
            "data.params.dtypes={}", "data.params.sample_axis=time", "data.inputs.x=u",
            "data.inputs.y=v", f"data.path={tmp_path / 'fields.zarr'}", "data.chunk_size=32",
            "data.dask.n_workers=1", "data.dask.progress=false", f"output_dir={tmp_path}"]
    r = hpcforge("prepare", *data)
    assert r.returncode == 0, r.stderr[-2000:]
    r = hpcforge("train", *data, "model=unet", "model.depth=2", "model.base_width=8",
                 "train.max_steps=3", "train.batch_size=16", "train.dist.backend=none",
                 "train.dist.nproc=1", "train.logger.mode=disabled")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = evaluate(tmp_path / "train" / "checkpoints" / "final.pt")
    m = result["metrics"]
    assert result["split"] == "test" and m["samples"] == 10        # test_fraction 0.1 of 96
    assert {"rmse", "rmse_baseline", "r2", "relative_l2_raw"} <= set(m)
    assert (tmp_path / "train" / "checkpoints" / "final.eval" / "fields.png").is_file()
