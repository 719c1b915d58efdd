"""A user's own CaloGAN-style tree (issue 24, point 2): calo/{eplus,gamma,piplus}/*.h5 whose files
hold layer_0 (N, 3, 96), layer_1 (N, 12, 12), layer_2 (N, 12, 6) and energy (N, 1), written here
with h5py, prepared by a real Dask cluster with label_from=parent_dir. The model's shape keys the
config leaves unset come from that store (mlp, cnn, resnet and the tower model)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.own_data import write_calo_tree
from pipeline.config import load_config
from pipeline.core.errors import UserError
from pipeline.data.loader import ShardedLoader
from pipeline.data.prepare import prepare
from pipeline.data.store import open_store
from pipeline.train.assembly import build_model
from pipeline.train.trainer import check_before_start

LAYERS = ["layer_0", "layer_1", "layer_2"]


@pytest.fixture(scope="module")
def calo_store(tmp_path_factory, dask_address):
    tmp = tmp_path_factory.mktemp("calo_tree")
    write_calo_tree(tmp / "calo", files=2, per_file=20)          # 120 showers
    cfg = load_config("calo_tree_pid", [
        f"output_dir={tmp}", f"data.params.path={tmp / 'calo' / '*' / '*.h5'}",
        f"data.path={tmp / 'calo_tree.zarr'}", "data.chunk_size=32", "data.shard_size=32",
        "data.dask.cluster=address", f"data.dask.scheduler={dask_address}",
        "data.dask.progress=false"])
    return open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None)), tmp


def _resolved(calo_store, tmp_path, *overrides):
    store, _ = calo_store
    cfg = load_config("calo_tree_pid", [f"data.path={store.path}", f"output_dir={tmp_path}",
                                        *overrides])
    return cfg, check_before_start(cfg)


def _first_batch(cfg):
    store = open_store(cfg.data.path)
    return next(iter(ShardedLoader(store, "train", cfg.data.inputs, 8, normalize="standard")))


def test_the_tree_is_one_store_of_three_classes_with_the_layers_as_stored(calo_store):
    store, _ = calo_store
    assert store.meta.classes == {"eplus": 0, "gamma": 1, "piplus": 2}
    shapes = {v: store.variable("train", v).shape[1:] for v in [*LAYERS, "energy"]}
    assert shapes == {"layer_0": (3, 96), "layer_1": (12, 12), "layer_2": (12, 6), "energy": (1,)}
    assert sum(store.meta.splits.values()) == 120 and store.meta.splits["test"] > 0


@pytest.mark.parametrize("family,overrides,expected", [
    ("tower", [], {"layer_shapes": ((3, 96), (12, 12), (12, 6)), "n_outputs": 3}),
    ("mlp", [], {"in_features": 288 + 144 + 72, "out_features": 3}),
    ("cnn", ["data.inputs={x: layer_1, y: label}"], {"in_channels": 1, "n_outputs": 3}),
    ("cnn", ["data.inputs={x: layer_0, y: label}", "model.channels=[8]"],   # a (3, 96) image
     {"in_channels": 1, "n_outputs": 3}),
    ("resnet", ["data.inputs={x: layer_1, y: label}", "model.channels=[8, 16]",
                "model.blocks_per_stage=[1, 1]"], {"in_channels": 1, "n_outputs": 3}),
    ("tower", ["data.inputs={x: [layer_0, layer_1, layer_2], y: energy}", "model.loss=mse"],
     {"layer_shapes": ((3, 96), (12, 12), (12, 6)), "n_outputs": 1}),
    ("mlp", ["data.inputs={x: layer_2, y: energy}", "model.loss=mse"],
     {"in_features": 72, "out_features": 1}),
])
def test_shape_keys_left_unset_come_from_the_store_and_the_model_takes_a_batch(
        calo_store, tmp_path, family, overrides, expected):
    cfg, filled = _resolved(calo_store, tmp_path, f"model={family}", *overrides)
    assert filled == expected
    assert {k: getattr(cfg.model.params, k) for k in expected} == expected
    assert all(cfg.to_dict()["model"][k] == v or tuple(map(tuple, cfg.to_dict()["model"][k])) == v
               for k, v in expected.items())          # what checkpoints and W&B record
    batch = _first_batch(cfg)
    losses = build_model(cfg).losses(batch, "model")
    assert torch.isfinite(losses["loss"])


def test_shape_keys_the_config_sets_are_kept_and_a_wrong_class_count_still_refused(
        calo_store, tmp_path):
    cfg, filled = _resolved(calo_store, tmp_path, "model=mlp", "model.in_features=504")
    assert filled == {"out_features": 3} and cfg.model.params.in_features == 504
    with pytest.raises(UserError, match="set model.n_outputs=3"):
        _resolved(calo_store, tmp_path / "b", "model.n_outputs=10")


def test_a_val_split_too_small_for_one_batch_per_rank_is_said_not_skipped_silently(
        calo_store, tmp_path, capsys):
    """Issue 24: validation was skipped without a word (no val/loss, no best.pt)."""
    from pipeline.runtime.dist import init_distributed
    from pipeline.train.assembly import build
    store, _ = calo_store
    n = store.meta.splits["val"]
    cfg = load_config("calo_tree_pid", [f"data.path={store.path}", f"output_dir={tmp_path}",
                                        f"train.batch_size={n + 1}", "train.dist.backend=none",
                                        "train.dist.nproc=1", "train.logger.mode=disabled"])
    run = build(cfg, init_distributed(cfg.train.dist))
    assert run.val_loader is None
    assert (f"no validation: the val split's {n} samples fill no batch of {n + 1} on each of 1 "
            f"ranks" in capsys.readouterr().out)
