"""Issue 25: a job's log says what happened without a traceback. Slurm's requeue or preemption
signal reaches every process of the job, W&B's service (wandb-core) included; the run goes on
without W&B with one line, and nothing prints a traceback when the process exits."""
from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT, hpcforge

SCRIPT = """
import os, signal, sys
from pathlib import Path
import psutil
from pipeline.config import LoggerConfig
from pipeline.runtime.tracking import Tracker
tracker = Tracker(LoggerConfig(mode="offline"), Path(sys.argv[1]), {}, active=True)
tracker.log({"loss": 1.0}, step=1)
[core] = [p for p in psutil.Process().children(recursive=True) if p.name() == "wandb-core"]
core.send_signal(signal.SIGTERM)  # as srun passes Slurm's signal on to every task's process
core.wait(30)
tracker.log({"loss": 0.5}, step=2)
assert tracker.run is None
"""


def test_wandb_service_killed_by_the_jobs_signal_leaves_one_line_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("[hpcforge] W&B stopped answering") == 1, r.stdout
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        '{"step": 1, "loss": 1.0}', '{"step": 2, "loss": 0.5}']


@pytest.mark.slow
def test_a_wandb_service_address_inherited_from_elsewhere_is_not_used(small_store, tmp_path):
    """A job submitted from a process running W&B inherits its WANDB_SERVICE (sbatch passes the
    environment on): on the compute node that socket does not exist. The run starts a service of
    its own and its W&B files are complete when it exits."""
    path, overrides = small_store
    gone = "3-1-unix-/tmp/wandb-1-1-1/socket"  # wandb's format: version-pid-unix-socket
    r = hpcforge("train", *overrides[1:], f"output_dir={tmp_path}", f"data.path={path}",
                 "train.dist.backend=none", "train.dist.nproc=1", "train.batch_size=32",
                 "train.max_steps=2", "train.logger.mode=offline", env={"WANDB_SERVICE": gone})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    [run] = (tmp_path / "train" / "wandb").glob("offline-run-*")
    assert (run / f"run-{run.name.rsplit('-', 1)[1]}.wandb").stat().st_size > 0
    assert "W&B stopped answering" not in r.stdout
