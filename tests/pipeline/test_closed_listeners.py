"""Issue 25: a one-node run (`hpcforge train --nproc 2`) opens no listener on a network address:
the ranks' rendezvous, their gloo/MPI transports and the launcher listen on loopback or not at
all. (mpirun's own bootstrap listener is OpenMPI 4.1's: it binds the wildcard address whatever
oob_tcp_if_include says, measured; README "Security".)"""
from __future__ import annotations

import os
import signal

import pytest

from helpers import LOOPBACK_ADDRS, listening
from pipeline.launch import REQUEUE_EXIT_CODE
from test_watchdog import cleanup, start_training, wait_for_checkpoint

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


def test_a_one_node_ddp_run_listens_on_loopback_only(small_store, tmp_path):
    proc = start_training(small_store, tmp_path, "train.dist.backend=ddp")
    ranks = []
    try:
        ranks = wait_for_checkpoint(proc, tmp_path)
        pids = [proc.pid, *(r["pid"] for r in ranks)]
        sockets = listening(pids)
        assert [s for s in sockets if s[1] not in LOOPBACK_ADDRS] == [], sockets
        assert any(s[0] != proc.pid for s in sockets), sockets  # gloo's pairs: on loopback
        os.killpg(proc.pid, signal.SIGTERM)  # the same run ends as a preemption does
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    finally:
        cleanup(proc, [r["pid"] for r in ranks])
