"""Issue 25: no moment of a `--nproc` run where a preemption signal falls between two stools.
A SIGTERM to the process group while the ranks start (before they catch signals) or after the
final checkpoint (after they let go of them) gave 138 "a rank failed or was killed"; two Ctrl-C
gave 75. Real ranks, real signals."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest
from test_watchdog import cleanup, start_training, wait_for_checkpoint

from pipeline.core.checkpoint import load
from pipeline.runtime.launch import REQUEUE_EXIT_CODE

pytestmark = [pytest.mark.mpi, pytest.mark.slow,
              # Horovod's ranks start under mpirun, ddp's under our own launcher (LocalRanks)
              pytest.mark.parametrize("backend", ["horovod", "ddp"])]


def test_sigterm_while_the_ranks_start_checkpoints_their_first_step_and_exits_75(small_store,
                                                                                tmp_path, backend):
    proc = start_training(small_store, tmp_path, "train.dist.signal_check_s=0",
                          f"train.dist.backend={backend}")
    try:
        time.sleep(2.0)  # the launcher is up, the ranks are still importing
        assert not (tmp_path / "train" / "checkpoints").exists()
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
        m = re.search(r"SIGTERM: checkpointed step (\d+) to (\S+); exit 75", out)
        assert m, out[-2000:]
        assert load(tmp_path / "train" / "checkpoints" / "last.pt")["step"] == int(m.group(1)) >= 1
        assert "a rank failed" not in err
    finally:
        cleanup(proc, [])


def test_sigterm_after_the_final_checkpoint_leaves_a_finished_run_at_exit_0(small_store, tmp_path,
                                                                            backend):
    proc = start_training(small_store, tmp_path, "train.max_steps=4",
                          f"train.dist.backend={backend}")
    final = tmp_path / "train" / "checkpoints" / "final.pt"
    try:
        deadline = time.monotonic() + 180
        while not final.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        while proc.poll() is None:  # from final.pt on, until the ranks and launcher are gone
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
        assert final.exists()
        assert proc.returncode == 0, err[-3000:]
        assert "a rank failed" not in err
    finally:
        cleanup(proc, [])


def test_two_ctrl_c_end_at_once_with_130_and_one_line(small_store, tmp_path, backend):
    proc = start_training(small_store, tmp_path, "train.dist.signal_check_s=10",  # a slow vote
                          f"train.dist.backend={backend}")
    ranks = []
    try:
        ranks = wait_for_checkpoint(proc, tmp_path)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)  # a person's two presses (at once, the kernel would deliver one)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err[-3000:]
        ours = re.findall(r"hpcforge: .*", err)  # (rank 0's progress bar may precede it)
        assert len(ours) == 1 and "interrupted" in ours[0], err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    finally:
        cleanup(proc, [r["pid"] for r in ranks])
