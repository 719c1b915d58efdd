"""Issue 25: records that match the run, and no evidence destroyed. A resume keeps each step's
metrics row once (the resumed history); damaged checkpoints are moved aside, never trained over;
when all are damaged resume=auto refuses; train does not read a store a prepare is writing."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from helpers import hpcforge
from test_checkpoint import _flip_in_largest_record

RUN = ["train.dist.backend=none", "train.dist.nproc=1", "train.batch_size=16", "train.max_steps=6",
       "train.checkpoint.every_steps=2", "train.checkpoint.keep=5", "train.logger.log_every=1",
       "train.logger.images_every=0", "train.logger.mode=disabled"]


def _train(store: tuple, out: Path, *extra: str):
    path, overrides = store
    return hpcforge("train", *overrides[1:], f"data.path={path}", f"output_dir={out}", *RUN, *extra)


def _steps(out: Path) -> list[int]:
    lines = (out / "train" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.fixture(scope="module")
def trained(small_store, tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6 and a metrics row per step."""
    out = tmp_path_factory.mktemp("trained")
    r = _train(small_store, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _copy(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out, out / "train" / "checkpoints"


def test_resume_past_a_damaged_checkpoint_sets_it_aside_and_keeps_each_step_once(
        small_store, trained, tmp_path):
    out, ckpts = _copy(trained, tmp_path)
    steps_before = _steps(out)
    assert steps_before == sorted(set(steps_before)) and steps_before[-1] == 6
    newest = ckpts / "step-00000006.pt"
    os.unlink(ckpts / "last.pt")  # (a hard link of it: keep the damaged bytes in one file)
    _flip_in_largest_record(newest)
    damaged = newest.read_bytes()
    r = _train(small_store, out, "train.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "step-00000004.pt at step 4" in r.stdout, r.stdout
    aside = ckpts / "step-00000006.pt.damaged"
    assert aside.read_bytes() == damaged  # the evidence, untouched
    assert _steps(out) == steps_before  # rows of steps 5-6 once: the resumed ones


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(small_store, trained, tmp_path):
    out, ckpts = _copy(trained, tmp_path)
    for link in ("last.pt", "best.pt", "final.pt"):
        (ckpts / link).unlink(missing_ok=True)
    steps = sorted(ckpts.glob("step-*.pt"))
    assert len(steps) == 3
    damaged = {}
    for p in steps:
        _flip_in_largest_record(p)
        damaged[p.name] = p.read_bytes()
    metrics = (out / "train" / "metrics.jsonl").read_bytes()
    r = _train(small_store, out, "train.resume=auto")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    [line] = [x for x in r.stderr.splitlines() if x.startswith("hpcforge: error:")]
    assert "every checkpoint in" in line and "train.resume=never" in line, line
    assert all(f"{name}.damaged" in line for name in damaged), line
    assert "Traceback" not in r.stderr
    assert not list(ckpts.glob("step-*.pt"))
    assert {p.name: p.read_bytes() for p in ckpts.glob("*.damaged")} == \
        {f"{n}.damaged": b for n, b in damaged.items()}
    assert (out / "train" / "metrics.jsonl").read_bytes() == metrics  # nothing retrained


def test_train_refuses_a_store_a_prepare_is_writing(small_store, tmp_path):
    from pipeline.data.lock import store_lock
    store, _ = small_store
    lock = Path(store).with_name(Path(store).name + ".lock")
    with store_lock(lock, Path(store), log=print):  # held by this (live) process
        r = _train(small_store, tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"is being prepared by pid {os.getpid()} on host " in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_resumed_offline_wandb_run_holds_each_step_once(small_store, tmp_path):
    """The W&B side of 'each step once' (issue 25): a run that got to step 6 but whose step-6
    checkpoint is gone resumes at step 4; what `wandb sync` would upload (`wandb/*/*.wandb`)
    then holds steps 1-6 once, as metrics.jsonl does, and the first sitting's file is kept.
    Validation rows (steps 2, 4, 6) are among the re-logged ones: their step was written as 16.0
    once, which W&B refused on the resume, and the new sitting's run lost every later step."""
    from wandb_records import history
    out, offline = tmp_path / "run", ["train.logger.mode=offline", "train.val_every=2"]
    assert _train(small_store, out, *offline).returncode == 0
    (out / "train" / "checkpoints" / "step-00000006.pt").unlink()
    r = _train(small_store, out, *offline, "train.resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-00000004.pt at step 4" in r.stdout and "W&B stopped" not in r.stdout, r.stdout
    assert all(type(s) is int for s in _steps(out)) and _steps(out).count(4) == 2  # train + val
    wandb_dir = out / "train" / "wandb"
    # wandb sync's own pattern, one file once (latest-run links to a folder; wandb/cli/beta_sync.py)
    [uploaded] = {p.resolve() for p in wandb_dir.glob("*/*.wandb")}
    [kept] = {p.resolve() for p in wandb_dir.glob("*/*.wandb.superseded")}
    assert kept.parent != uploaded.parent and kept.name == uploaded.name + ".superseded"
    logged = {row["_step"]: row for row in history(uploaded)}
    assert sorted(logged) == list(range(1, 7)) and len(history(uploaded)) == 6
    for line in (out / "train" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert all(logged[row["step"]][k] == v for k, v in row.items() if k != "step"), row
