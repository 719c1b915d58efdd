"""Issue 25: a killed rank is named by hpcforge's own line (mpirun's block says "PID 0"), with
the checkpoint to resume from. A real SIGKILL to one of two real ranks."""
from __future__ import annotations

import os
import re
import signal

import pytest

from test_watchdog import cleanup, start_training, wait_for_checkpoint

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def test_a_killed_rank_is_named_with_the_last_good_checkpoint(small_store, tmp_path):
    proc = start_training(small_store, tmp_path)
    ranks = []
    try:
        ranks = wait_for_checkpoint(proc, tmp_path)
        victim = ranks[1]
        os.kill(victim["pid"], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode not in (0, 75), err[-3000:]
        ours = re.findall(r"hpcforge: error: .*", err)
        assert len(ours) == 1, err[-3000:]
        assert ours[0].startswith(f"hpcforge: error: rank 1 on {victim['host']} (pid "
                                  f"{victim['pid']}) ended first, at step "), ours[0]
        m = re.search(r"the last good checkpoint is (\S+); resume with train.resume=auto", ours[0])
        assert m and os.path.isfile(m.group(1)) and "/train/checkpoints/step-" in m.group(1)
    finally:
        cleanup(proc, [r["pid"] for r in ranks])
