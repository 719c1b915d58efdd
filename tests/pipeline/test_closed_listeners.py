"""Issue 25, on one real 2-rank run (`hpcforge train --nproc 2`) per backend, shared by both tests:
1. a one-node run opens no listener on a network address: every process of the run (our
   launcher, the ranks, W&B's service) listens on loopback or not at all; the ranks start without
   mpirun (whose bootstrap listener Open MPI 4.1 binds to 0.0.0.0 and ::, docs/security.md) and
   meet through a FileStore (ddp) or Horovod's rendezvous server on 127.0.0.1 (Horovod on Gloo);
2. a rank killed with SIGKILL is named by hpcforge's own line, with how it ended and the
   checkpoint to resume from."""
from __future__ import annotations

import os
import re
import signal
from types import SimpleNamespace

import psutil
import pytest
from helpers import LOOPBACK_ADDRS, listening, process_tree
from test_watchdog import cleanup, start_training, wait_for_checkpoint

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


@pytest.fixture(scope="module", params=["ddp", "horovod"])
def killed_run(small_store, tmp_path_factory, request) -> SimpleNamespace:
    """The run's listening sockets once it trains, then what it says after rank 1's SIGKILL."""
    out = tmp_path_factory.mktemp(request.param)
    proc = start_training(small_store, out, f"train.dist.backend={request.param}")
    ranks = []
    try:
        ranks = wait_for_checkpoint(proc, out)
        tree = {p: psutil.Process(p).name() for p in process_tree(proc.pid)}
        sockets = listening(tree)
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        return SimpleNamespace(sockets=sockets, tree=tree, ranks=ranks, code=proc.returncode,
                               err=err, backend=request.param, launcher=proc.pid)
    finally:
        cleanup(proc, [r["pid"] for r in ranks])


def test_a_one_node_run_listens_on_loopback_only(killed_run):
    sockets, ranks = killed_run.sockets, {r["pid"] for r in killed_run.ranks}
    assert "wandb-core" in killed_run.tree.values(), killed_run.tree  # the whole tree was seen
    assert ranks <= set(killed_run.tree), (ranks, killed_run.tree)
    assert [s for s in sockets if s[1] not in LOOPBACK_ADDRS] == [], (sockets, killed_run.tree)
    assert "mpirun" not in killed_run.tree.values(), killed_run.tree  # (its oob: 0.0.0.0 and ::)
    # what does listen, on loopback: ddp's gloo pairs in the ranks; Horovod's rendezvous server
    # in our launcher (Horovod's Gloo pairs keep no listener once connected)
    listeners = ranks if killed_run.backend == "ddp" else {killed_run.launcher}
    assert any(s[0] in listeners for s in sockets), sockets


def test_a_killed_rank_is_named_with_the_last_good_checkpoint(killed_run):
    victim, err = killed_run.ranks[1], killed_run.err
    assert killed_run.code not in (0, 75), err[-3000:]
    ours = re.findall(r"hpcforge: error: .*", err)
    assert len(ours) == 1, err[-3000:]
    assert ours[0].startswith(f"hpcforge: error: rank 1 on {victim['host']} (pid "
                              f"{victim['pid']}) ended first, at step "), ours[0]
    assert "(killed by SIGKILL)" in ours[0] and killed_run.code == 128 + 9, ours[0]
    m = re.search(r"the last good checkpoint is (\S+); resume with train.resume=auto", ours[0])
    assert m and os.path.isfile(m.group(1)) and "/train/checkpoints/step-" in m.group(1)
    assert "Traceback" not in err, err[-3000:]  # the surviving rank says it in one line
