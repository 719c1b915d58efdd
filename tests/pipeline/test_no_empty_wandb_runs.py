"""No empty W&B runs (issue 24, point 5): a run that fails before its first step leaves no W&B run
behind (offline runs are synced later, and each such folder became an empty run in the project).
Real offline W&B files; the failure is real too (data the model cannot take, met at the first batch)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import hpcforge, wandb_cores

from pipeline.config import LoggerConfig
from pipeline.runtime.tracking import Tracker

ONE_RANK = ("train.dist.backend=none", "train.dist.nproc=1", "train.batch_size=32",
            "train.logger.mode=offline", "train.max_steps=2")


@pytest.mark.slow
def test_a_run_failing_at_its_first_batch_leaves_no_wandb_run(small_store, tmp_path):
    path, overrides = small_store
    data = [o for o in overrides if o.startswith("data.")]   # (the mlp has no model.image_size)
    r = hpcforge("train", *data, f"output_dir={tmp_path}", f"data.path={path}",
                 *ONE_RANK, "model=mlp", "model.in_features=10", "model.out_features=2",
                 "data.inputs={x: spins, y: phase}", timeout=300)
    assert r.returncode == 2 and "does not fit model=mlp" in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path / "train").rglob("offline-run-*"))
    assert not (tmp_path / "train" / "wandb").exists()


def test_discard_removes_the_open_run_and_keeps_an_earlier_one(tmp_path):
    """In the same folder, a run that logged stays; the one discarded goes with its links."""
    cfg = LoggerConfig(mode="offline")
    kept = Tracker(cfg, tmp_path, {"lr": 0.1}, active=True)
    kept.log({"loss": 1.0}, step=1)
    kept.finish({"loss": 1.0})
    before = sorted(p.name for p in (tmp_path / "wandb").iterdir())
    failed = Tracker(cfg, tmp_path, {"lr": 0.1}, active=True)
    assert Path(failed.run_path).is_dir()
    failed.discard()
    assert not Path(str(failed.run_path or "gone")).exists() and failed.run is None
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in runs] == [kept.run_id]
    assert all(p.exists() for p in (tmp_path / "wandb").iterdir())   # no link left dangling
    assert {p.name for p in (tmp_path / "wandb").iterdir()} <= set(before)
    assert wandb_cores()  # wandb's service, started by this process (the next test)


def test_the_service_the_test_above_started_is_stopped_before_the_next_test():
    """conftest's guard: the W&B service the Trackers above started in this process is gone, so a
    later test's `hpcforge` starts its own, and its run is over when it exits."""
    assert "WANDB_SERVICE" not in os.environ and not wandb_cores()
