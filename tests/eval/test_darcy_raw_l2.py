"""`hpcforge evaluate` of a field surrogate reports the relative L2 error twice: of the standardised
pressure the model is trained on (relative_l2) and of the pressure in its stored units
(relative_l2_raw, the FNO paper's metric, issue #15). A real FNO on a real, tiny Darcy store (odd
17 x 17 grid), trained and evaluated through the CLI; both numbers against NumPy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import Config, build
from pipeline.core.checkpoint import load
from pipeline.data.store import normalization, open_store

pytestmark = pytest.mark.slow  # prepares, trains and evaluates through the CLI (3 processes)

SHRINK = ["data.params.resolution=17", "data.n_samples=96", "data.chunk_size=48",
          "data.shard_size=48", "data.val_fraction=0.125", "data.test_fraction=0.3334",
          "data.dask.progress=false", "data.dask.n_workers=1", "data.dask.processes=false"]
TINY_FNO = ["model.modes=4", "model.width=8", "model.n_layers=1", "model.pad=3", "train.epochs=2",
            "train.batch_size=16", "train.dist.backend=none", "train.dist.nproc=1",
            "train.logger.mode=disabled", "train.threads=1"]


def relative_l2(p: np.ndarray, t: np.ndarray) -> float:
    p, t = p.reshape(len(p), -1), t.reshape(len(t), -1)
    return float(np.mean(np.linalg.norm(p - t, axis=1) / np.linalg.norm(t, axis=1)))


def test_evaluate_reports_raw_and_standardised_relative_l2_of_the_pressure(tmp_path, cli):
    common = ["-e", "fno_darcy85", f"output_dir={tmp_path}", f"data.path={tmp_path}/darcy.zarr",
              *SHRINK]
    assert cli("prepare", *common).returncode == 0
    r = cli("train", *common, *TINY_FNO)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = tmp_path / "train" / "checkpoints" / "final.pt"
    r = cli("evaluate", str(ckpt))
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads(ckpt.with_name("final.eval.json").read_text())["metrics"]

    from pipeline.train.trainer import build_model
    state = load(ckpt)   # the weights_only loader: the fno checkpoint holds tensors only
    model = build_model(build(Config, state["config"], "")).eval()
    model.load_state_dict(state["model"])
    store = open_store(tmp_path / "darcy.zarr")
    a, u = (np.asarray(store.variable("test", v)[:], np.float64) for v in ("permeability", "pressure"))
    (ma, sa), (mu, su) = (normalization(store.stats("train", v), "standard")
                          for v in ("permeability", "pressure"))
    with torch.no_grad():
        pred = model(torch.as_tensor((a - ma) / sa, dtype=torch.float32)).numpy().astype(np.float64)
    assert metrics["samples"] == 32    # two whole batches of 16
    assert metrics["relative_l2"] == pytest.approx(relative_l2(pred, (u - mu) / su), rel=1e-4)
    assert metrics["relative_l2_raw"] == pytest.approx(relative_l2(pred * su + mu, u), rel=1e-4)
    # u > 0 inside: its raw norm includes the mean that standardising removes, so the raw error is smaller
    assert metrics["relative_l2_raw"] < metrics["relative_l2"]
