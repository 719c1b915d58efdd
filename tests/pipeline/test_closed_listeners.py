"""Issue 25, on one real 2-rank ddp run (`hpcforge train --nproc 2`), shared by both tests:
1. a one-node run opens no listener on a network address: every process of the run (our
   launcher, mpirun, the ranks, W&B's service) listens on loopback or not at all, but for
   mpirun's own bootstrap (oob) listener, which Open MPI 4.1 binds to the wildcard addresses
   whatever oob_tcp_if_include says (orte/mca/oob/tcp/oob_tcp_listener.c; docs/security.md);
2. a rank killed with SIGKILL is named by hpcforge's own line (mpirun's block says "PID 0"), with
   the checkpoint to resume from."""
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


@pytest.fixture(scope="module")
def killed_run(small_store, tmp_path_factory) -> SimpleNamespace:
    """The run's listening sockets once it trains, then what it says after rank 1's SIGKILL."""
    out = tmp_path_factory.mktemp("ddp")
    proc = start_training(small_store, out, "train.dist.backend=ddp")
    ranks = []
    try:
        ranks = wait_for_checkpoint(proc, out)
        tree = {p: psutil.Process(p).name() for p in process_tree(proc.pid)}
        sockets = listening(tree)
        with open(f"/proc/{ranks[0]['pid']}/environ", "rb") as f:  # what mpirun tells its ranks
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        return SimpleNamespace(sockets=sockets, tree=tree, ranks=ranks, code=proc.returncode,
                               err=err, hnp_uri=env[b"OMPI_MCA_orte_hnp_uri"].decode())
    finally:
        cleanup(proc, [r["pid"] for r in ranks])


def test_a_one_node_ddp_run_listens_on_loopback_only(killed_run):
    sockets, ranks = killed_run.sockets, {r["pid"] for r in killed_run.ranks}
    assert {"mpirun", "wandb-core"} <= set(killed_run.tree.values()), killed_run.tree
    [mpirun] = [p for p, name in killed_run.tree.items() if name == "mpirun"]
    # The exception, and only it: mpirun's oob listener, one per address family; its IPv4 port
    # is the one mpirun gives its ranks (orte_hnp_uri), and only as 127.0.0.1 (oob_tcp_if_include)
    oob = [s for s in sockets if s[0] == mpirun and s[1] in ("0.0.0.0", "::")]
    assert [s for s in sockets if s[1] not in LOOPBACK_ADDRS] == oob, (sockets, killed_run.tree)
    assert sorted(s[1] for s in oob) in ([], ["::"], ["0.0.0.0"], ["0.0.0.0", "::"]), oob
    told = re.findall(r"tcp6?://([^;]+)", killed_run.hnp_uri)  # e.g. 1234.0;tcp://127.0.0.1:5678
    assert told and all(re.fullmatch(r"127\.0\.0\.1:\d+", a) for a in told), killed_run.hnp_uri
    assert all(f"127.0.0.1:{port}" in told for _, ip, port in oob if ip == "0.0.0.0"), told
    assert any(s[0] in ranks for s in sockets), sockets  # gloo's pairs: on loopback


def test_a_killed_rank_is_named_with_the_last_good_checkpoint(killed_run):
    victim, err = killed_run.ranks[1], killed_run.err
    assert killed_run.code not in (0, 75), err[-3000:]
    ours = re.findall(r"hpcforge: error: .*", err)
    assert len(ours) == 1, err[-3000:]
    assert ours[0].startswith(f"hpcforge: error: rank 1 on {victim['host']} (pid "
                              f"{victim['pid']}) ended first, at step "), ours[0]
    m = re.search(r"the last good checkpoint is (\S+); resume with train.resume=auto", ours[0])
    assert m and os.path.isfile(m.group(1)) and "/train/checkpoints/step-" in m.group(1)
    assert "Traceback" not in err, err[-3000:]  # the surviving rank says it in one line
