"""Evaluation counts every sample and speaks the task's language (issue 24): the partial last
batch is scored; a regression gets RMSE, MAE and R² in the target's units beside predicting the
train mean, and a predicted-vs-true figure; a classifier's confusion matrix and per-class accuracy
carry the class names of the store's class table. In process, on checkpoints of untrained models
written in the trainer's format (the numbers are checked against NumPy, not judged)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, r2_score

from pipeline.analysis.evaluate import evaluate
from pipeline.config import load_config
from pipeline.core.checkpoint import save_atomic
from pipeline.data.prepare import prepare
from pipeline.data.store import normalization, open_store
from pipeline.train.trainer import build_model


def _checkpoint(cfg, path) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg)
    save_atomic({"model": model.state_dict(), "config": cfg.to_dict(), "step": 0}, path)
    return model.eval()


def _predict(model, store, split: str, variable: str, how: str) -> np.ndarray:
    x = np.asarray(store.variable(split, variable)[:], np.float64)
    shift, scale = (np.reshape(a, (1, -1) + (1,) * (x.ndim - 2))  # per channel (axis 1)
                    for a in normalization(store.stats("train", variable), how))
    with torch.no_grad():
        return model(torch.as_tensor((x - shift) / scale, dtype=torch.float32)).numpy()


def test_a_regression_scores_every_sample_in_the_targets_units(small_store, tmp_path, capsys):
    """128 val samples in batches of 48: two full batches and one of 32, all scored."""
    path, overrides = small_store
    data = [o for o in overrides if o.startswith("data.")]   # (the mlp has no model.image_size)
    cfg = load_config("demo", [*data, f"data.path={path}", f"output_dir={tmp_path}",
                               "model=mlp", "model.in_features=256", "model.out_features=1",
                               "model.loss=mse", "data.inputs={x: spins, y: energy}",
                               "train.batch_size=48", "train.logger.mode=disabled"])
    model = _checkpoint(cfg, tmp_path / "final.pt")
    result = evaluate(tmp_path / "final.pt")
    store = open_store(path)
    y = np.asarray(store.variable("val", "energy")[:], np.float64)
    pred = _predict(model, store, "val", "spins", cfg.data.normalize)[:, 0]
    m = result["metrics"]
    assert result["split"] == "val" and m["samples"] == len(y) == 128
    assert m["loss"] == pytest.approx(np.mean((pred - y) ** 2), rel=1e-5)   # every sample's mean
    assert m["rmse"] == pytest.approx(np.sqrt(np.mean((pred - y) ** 2)), rel=1e-5)
    assert m["mae"] == pytest.approx(mean_absolute_error(y, pred), rel=1e-5)
    assert m["r2"] == pytest.approx(r2_score(y, pred), rel=1e-5)
    train_mean = np.mean(store.variable("train", "energy")[:], dtype=np.float64)
    assert m["rmse_baseline"] == pytest.approx(np.sqrt(np.mean((train_mean - y) ** 2)), rel=1e-6)
    assert m["r2_baseline"] == pytest.approx(r2_score(y, np.full_like(y, train_mean)), abs=1e-9)
    assert (tmp_path / "final.eval" / "predicted_vs_true.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "evaluating on the val split instead (128 samples" in out and "data.test_fraction=0.1" in out
    said = next(n for n in result["notes"] if n.startswith("regression of energy"))
    assert f"RMSE {m['rmse']:.4g}" in said and f"train mean: {m['rmse_baseline']:.4g}" in said


def _write_tree(root) -> None:
    """CaloGAN-style eplus/ gamma/ piplus/ folders of .h5 files: 13 events per particle."""
    import h5py
    rng = np.random.default_rng(0)
    for k, particle in enumerate(("eplus", "gamma", "piplus")):
        (root / particle).mkdir(parents=True)
        with h5py.File(root / particle / "showers.h5", "w") as f:
            f.create_dataset("shower", data=(rng.random((13, 3, 4)) + k).astype(np.float32))


def test_a_classifier_reports_per_class_accuracy_under_the_stores_class_names(tmp_path):
    _write_tree(tmp_path / "calo")
    cfg = load_config("demo", [
        f"output_dir={tmp_path}", "data=import_netcdf", "data.source=hdf5",
        f"data.params.path={tmp_path / 'calo' / '*' / '*.h5'}", "data.params.variables=[shower]",
        "data.params.labels=[]", "data.params.label_from=parent_dir", "data.params.sample_axis=0",
        "data.params.dtypes={}", "data.inputs={x: shower, y: label}", "data.chunk_size=16",
        "data.shard_size=32", "data.val_fraction=0.2", "data.test_fraction=0.25",
        "data.dask.progress=false", "data.dask.n_workers=1", "model=mlp", "model.in_features=12",
        "model.out_features=3", "train.batch_size=4", "train.logger.mode=disabled"])
    store = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    model = _checkpoint(cfg, tmp_path / "final.pt")
    result = evaluate(tmp_path / "final.pt")
    y = store.variable("test", "label")[:]
    pred = _predict(model, store, "test", "shower", cfg.data.normalize).argmax(1)
    m = result["metrics"]
    assert result["split"] == "test" and m["samples"] == len(y) == 10   # 4 + 4 + 2
    assert m["accuracy"] == pytest.approx(np.mean(pred == y), abs=1e-6)
    for name, label in store.meta.classes.items():
        assert m[f"accuracy/{name}"] == pytest.approx(np.mean(pred[y == label] == label)), name
    assert "accuracy per class: eplus" in " ".join(result["notes"])
    # the scorecard's references (pipeline.analysis.report): the most common class's share, and chance
    assert m["accuracy_majority"] == pytest.approx(np.bincount(y).max() / len(y))
    assert m["accuracy_chance"] == pytest.approx(1 / 3)


def test_several_variables_as_one_input_train_and_evaluate(small_store, tmp_path):
    """data.inputs.x=[spins, energy] (issue 24: "expected str, got list"): an MLP on the joined
    (B, 256 + 1) input trains through the CLI and its checkpoint evaluates."""
    from helpers import hpcforge
    path, overrides = small_store
    data = [o for o in overrides if o.startswith("data.")]
    r = hpcforge("train", *data, f"data.path={path}", f"output_dir={tmp_path}", "model=mlp",
                 "model.in_features=257", "model.out_features=2",
                 "data.inputs={x: [spins, energy], y: phase}", "train.max_steps=3",
                 "train.batch_size=32", "train.dist.backend=none", "train.dist.nproc=1",
                 "train.logger.mode=disabled")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = evaluate(tmp_path / "train" / "checkpoints" / "final.pt")
    assert result["metrics"]["samples"] == 128 and 0 <= result["metrics"]["accuracy"] <= 1
