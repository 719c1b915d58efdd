"""Exit status a requeue can trust: 75 after the checkpoint, however the preemption signal comes."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest
from helpers import LOOPBACK_ADDRS, listening
from test_watchdog import alive, cleanup, start_training, wait_for_checkpoint

from pipeline.core.checkpoint import load
from pipeline.runtime.launch import REQUEUE_EXIT_CODE

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


@pytest.mark.parametrize("sig, backend", [(signal.SIGTERM, "horovod"), (signal.SIGINT, "horovod"),
                                          (signal.SIGTERM, "ddp")])
def test_signal_to_the_whole_process_group_checkpoints_and_exits_75(small_store, tmp_path, sig,
                                                                    backend):
    """What `timeout`, Ctrl-C and many batch wrappers do: signal the launcher's process group.
    (Horovod's ranks start under mpirun, ddp's under our own launcher.)"""
    proc = start_training(small_store, tmp_path, "train.dist.signal_check_s=0",
                          f"train.dist.backend={backend}")
    ranks = []
    try:
        ranks = wait_for_checkpoint(proc, tmp_path)
        sockets = listening([proc.pid, *(r["pid"] for r in ranks)])  # issue 25: MPI on one node
        assert [s for s in sockets if s[1] not in LOOPBACK_ADDRS] == [], sockets
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
        m = re.search(rf"{sig.name}: checkpointed step (\d+) to (\S+); exit 75", out)
        assert m, out[-2000:]  # (passed on as SIGUSR1, named as sent: issue 25)
        last = load(tmp_path / "train" / "checkpoints" / "last.pt")
        assert last["step"] == int(m.group(1)) > 0
        assert "non-zero exit code" not in err and "a rank failed" not in err  # no mpirun block
    finally:
        cleanup(proc, [r["pid"] for r in ranks])


@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_ranks_do_not_outlive_a_launcher_killed_by_sigkill(small_store, tmp_path, backend):
    """mpirun (ddp: each rank) runs in a session of its own; the kernel still ends it with the
    launcher."""
    proc = start_training(small_store, tmp_path, f"train.dist.backend={backend}")
    ranks = []
    try:
        ranks = wait_for_checkpoint(proc, tmp_path)
        proc.kill()  # SIGKILL: the launcher can pass nothing on
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 30
        while any(alive(r["pid"]) for r in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [r["pid"] for r in ranks if alive(r["pid"])]
    finally:
        cleanup(proc, [r["pid"] for r in ranks])
