"""A frozen rank of a Slurm job ends the job (real Slurm from tests/jobs/conftest.py, real SIGSTOP)."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from test_slurm import ENDED, job_args, log_of

pytestmark = pytest.mark.slow
TIMEOUT_S = 15  # train.dist.timeout_s


def test_stopped_rank_fails_the_job_within_timeout_naming_it(slurm, small_store, tmp_path,
                                                              jobs_dir, submit, slurm_tools):
    out = tmp_path / "run"
    [job] = submit(*job_args(small_store, out, jobs_dir, "cluster.tasks_per_node=2",
                             "train.epochs=1000", "train.checkpoint.every_steps=2",
                             "train.logger.images_every=0", f"train.dist.timeout_s={TIMEOUT_S}"))
    last, ranks = out / "train" / "checkpoints" / "last.pt", []
    try:
        deadline = time.monotonic() + 240
        while not last.exists():
            assert time.monotonic() < deadline, f"no checkpoint:\n{log_of(job)}"
            assert slurm_tools.state(job["job_id"]) not in ENDED, log_of(job)
            time.sleep(0.5)
        ranks = json.loads((out / "train" / "ranks.json").read_text())
        os.kill(ranks[1]["pid"], signal.SIGSTOP)
        t0 = time.monotonic()
        state = slurm_tools.wait(job["job_id"], ENDED, timeout=TIMEOUT_S + 120)
        elapsed = time.monotonic() - t0
        print(f"slurm: SIGSTOP to job {state} in {elapsed:.1f} s (timeout_s={TIMEOUT_S})")
        assert state == "FAILED" and elapsed < TIMEOUT_S + 30, (state, elapsed)
        log = log_of(job)
        assert (f"watchdog: rank 1 on {ranks[1]['host']} (pid {ranks[1]['pid']}) made no progress"
                in log), log[-3000:]
        assert f"the last good checkpoint is {out / 'train' / 'checkpoints' / 'step-'}" in log
    finally:
        for r in ranks:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(r["pid"], sig)
                except ProcessLookupError:
                    pass
