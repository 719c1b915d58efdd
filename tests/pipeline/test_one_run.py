"""One run, one record (issue 24): a second `hpcforge train` into an output_dir that holds a run
never prunes, overwrites or appends to it; `train.resume=auto` continues the same run, and its
metrics.jsonl keeps one row per step even when the run logged steps past its last checkpoint.
An output_dir that cannot be written (a file in its place, a read-only filesystem) is one line,
exit 2, before any rank starts; under the user's own mpirun, once."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, hpcforge

from pipeline.core.checkpoint import load
from pipeline.runtime.launch import mpi_env, mpirun_command

ONE_RANK = ("train.dist.backend=none", "train.dist.nproc=1", "train.batch_size=32",
            "train.logger.log_every=1", "train.checkpoint.every_steps=2",
            "train.logger.mode=offline")


def _train(out: Path, store: tuple, *extra: str):
    path, overrides = store
    return hpcforge("train", *overrides[1:], f"output_dir={out}", f"data.path={path}",
                    *ONE_RANK, *extra, timeout=300)


def _files(run: Path) -> dict[str, tuple]:
    """Every file under the run with its size and mtime, every link with its target: what a
    refused run must leave as is. A link is not followed: W&B's `debug-core.log` links to
    ~/.cache/wandb/logs/core-debug-<second>.log, the log of a W&B service, which is not the run's:
    every service this user starts in that second writes to it, and a shared service (one whose
    address a parent process left in WANDB_SERVICE) goes on writing after the run has ended."""
    return {str(p.relative_to(run)): (("->", str(p.readlink())) if p.is_symlink()
                                      else (p.stat().st_size, p.stat().st_mtime_ns))
            for p in sorted(run.rglob("*")) if p.is_symlink() or p.is_file()}


def _steps(run: Path) -> list[int]:
    """The step of each training row (one per logged step; figures' metrics have rows of their own)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if any(k.startswith("opt/") for k in r)]


@pytest.fixture(scope="module")
def first(small_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("used")
    r = _train(out, small_store, "train.max_steps=6", "train.seed=1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


@pytest.mark.slow
def test_a_second_run_into_a_used_output_dir_is_refused_and_touches_nothing(first, small_store):
    before = _files(first / "train")
    r = _train(first, small_store, "train.max_steps=2", "train.seed=2")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcforge: error: "), r.stderr
    assert f"output_dir={first}" in lines[0] and "train.resume=auto" in lines[0]
    assert f"output_dir={first}-2" in lines[0]  # a fresh folder that is free, named for the user
    assert _files(first / "train") == before
    # and the same refusal with --nproc 2, before any rank starts: one line, not one per rank
    r = _train(first, small_store, "train.max_steps=2", "train.dist.backend=horovod", "--nproc", "2")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _files(first / "train") == before


def test_train_help_says_what_a_used_output_dir_gets():
    r = hpcforge("train", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "into an output_dir that holds a run is refused" in text
    assert "train.resume=auto continues the run there" in text


@pytest.mark.slow
def test_resume_auto_continues_the_same_run_with_one_row_per_step(first, small_store):
    """The run logged steps 5-6 after its step-4 checkpoint, then lost step 6's (as a crash or
    a preemption between a log and a checkpoint leaves it): resuming from step 4 replaces rows
    5-6 instead of appending a second copy of them."""
    folder = first / "train" / "checkpoints"
    run_id = load(folder / "final.pt")["wandb_run_id"]
    for name in ("step-00000006.pt", "final.pt", "last.pt"):
        (folder / name).unlink()
    r = _train(first, small_store, "train.max_steps=8", "train.seed=1", "train.resume=auto")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "at step 4" in r.stdout
    assert _steps(first / "train") == list(range(1, 9))
    steps = sorted(folder.glob("step-*.pt"))
    assert [p.name for p in steps][-1] == "step-00000008.pt"
    for p in [*steps, folder / "final.pt", folder / "last.pt"]:
        assert load(p)["wandb_run_id"] == run_id, p
    assert load(folder / "final.pt")["step"] == 8
    # W&B writes a folder per resumed session of an offline run, all under the run's one id
    ids = {p.name.rsplit("-", 1)[1] for p in (first / "train" / "wandb").glob("offline-run-*")}
    assert ids == {run_id}


# ---------------------------------------------------------------- an output_dir that cannot be written
@pytest.fixture
def read_only(tmp_path) -> Path:
    """A real read-only filesystem (a tmpfs mounted ro: the tests run as root, whom a chmod does
    not stop); unmounted afterwards."""
    from helpers import tmpfs
    with tmpfs(tmp_path / "ro", "size=1m,ro") as disk:
        yield disk


def _one_error_line(r) -> str:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcforge: error: "), r.stderr[-3000:]
    return lines[0]


def test_a_file_where_the_output_folder_belongs_is_one_line_before_any_rank(small_store, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    line = _one_error_line(_train(blocker, small_store, "train.dist.backend=horovod", "--nproc", "2"))
    assert f"output_dir={blocker}: {blocker} is a file, where a folder is expected" in line
    path, overrides = small_store
    r = hpcforge("prepare", *overrides[1:], f"data.path={blocker}/data/ising2d.zarr")
    assert f"{blocker} is a file, where a folder is expected" in _one_error_line(r)
    assert blocker.read_text() == "not a folder"


def test_a_read_only_output_dir_is_one_line(small_store, read_only):
    line = _one_error_line(_train(read_only / "out", small_store, "train.max_steps=2"))
    assert f"output_dir={read_only / 'out'}: cannot write in {read_only / 'out'}" in line
    assert "Read-only file system" in line and "set output_dir to a folder you can write" in line


@pytest.mark.slow
def test_under_mpirun_a_file_for_output_dir_is_said_once_without_tracebacks(small_store, tmp_path):
    """Ranks started by the user's own mpirun (not --nproc): rank 0 says it, the others leave."""
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    path, overrides = small_store
    cmd = mpirun_command(2, ["train", *overrides[1:], f"output_dir={blocker}", f"data.path={path}",
                             *ONE_RANK[2:], "train.dist.backend=horovod"])
    r = subprocess.run(cmd, cwd=ROOT, env=mpi_env(), capture_output=True, text=True, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("hpcforge: error:")]
    assert r.returncode != 0 and len(errors) == 1, r.stderr[-3000:]
    assert "is a file, where a folder is expected" in errors[0]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
