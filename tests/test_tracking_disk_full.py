"""A full disk under the run's W&B files, metrics.jsonl or summary.json: one line naming the path
and the fix, exit status 2, and the checkpoint written before is kept. Real full disks: an 8 MiB
tmpfs (the tests run as root)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers import hpcforge

from pipeline.config import LoggerConfig
from pipeline.core.errors import UserError


def fill(disk: Path) -> Path:
    """Write zeros until the filesystem refuses: nothing is left for anyone."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(64 << 10))
        except OSError as e:
            assert e.errno == 28
    return filler


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line_and_keeps_the_checkpoint(small_store, small_disk):
    store, _ = small_store
    args = ["train", f"data.path={store}", f"output_dir={small_disk / 'run'}", "model.image_size=16",
            "train.dist.nproc=1", "train.batch_size=32", "train.logger.log_every=2"]
    r = hpcforge(*args, "train.epochs=1", timeout=300)
    assert r.returncode == 0, r.stderr
    last = small_disk / "run" / "train" / "checkpoints" / "last.pt"
    before = _sha(last)
    filler = fill(small_disk)

    r = hpcforge(*args, "train.epochs=2", "train.resume=auto", timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr and "Logging error" not in r.stderr, r.stderr
    assert lines[0].startswith(f"hpcforge: error: disk full writing {small_disk / 'run' / 'train'}")
    assert "free space" in lines[0] and "train.resume=auto" in lines[0]
    assert _sha(last) == before  # the checkpoint of the first run is untouched

    filler.unlink()  # room again: the same command continues from that checkpoint
    r = hpcforge(*args, "train.epochs=2", "train.resume=auto", timeout=300)
    assert r.returncode == 0, r.stderr
    assert '"steps": 32' in (small_disk / "run" / "train" / "summary.json").read_text()


def test_disk_filling_up_during_the_run_names_the_file(small_disk, capfd):
    """Metrics, W&B's files and summary.json on a disk that fills while the run is open."""
    from pipeline.runtime.tracking import Tracker

    run_dir = small_disk / "train"
    tracker = Tracker(LoggerConfig(mode="offline"), run_dir, {"lr": 0.1}, active=True)
    tracker.log({"loss": 1.0}, step=1)
    fill(small_disk)
    with pytest.raises(UserError, match=rf"disk full writing {run_dir / 'metrics.jsonl'} "
                                        r"\(No space left on device\); free space"):
        for step in range(2, 2000):  # the page cache of the open file absorbs a few lines
            tracker.log({"loss": 1.0}, step=step)
    assert tracker.run is None  # W&B was closed without a word
    with pytest.raises(UserError, match=rf"disk full writing {run_dir / 'summary.json'}"):
        tracker.write_json(run_dir / "summary.json", {"steps": 2})
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err


def test_w_and_b_files_on_a_full_disk_are_named(small_disk, capfd):
    from pipeline.runtime.tracking import Tracker

    run_dir = small_disk / "train"
    tracker = Tracker(LoggerConfig(mode="offline"), run_dir, {"lr": 0.1}, active=True)
    fill(small_disk)
    with pytest.raises(UserError, match=rf"disk full writing {tracker.run_path}"):
        tracker.finish({"loss": 1.0})
    err = capfd.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err, err
