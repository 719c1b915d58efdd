"""Issue 25: no Dask service open to the network. A local cluster answers this host only (and
says where its dashboard really is); a Slurm one speaks TLS with a certificate made for the run,
so a client without it is refused."""
from __future__ import annotations

import os
import re
import urllib.request

import pytest

from helpers import LOOPBACK_ADDRS, listening, process_tree
from pipeline.config import load_config
from pipeline.data.cluster import dask_client

SMALL = ["data.dask.progress=false", "data.dask.n_workers=2"]


def test_local_cluster_listens_on_loopback_only_and_its_printed_link_answers():
    cfg = load_config("demo", SMALL)
    lines: list[str] = []
    with dask_client(cfg.data.dask, log=lines.append) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        sockets = listening(process_tree(os.getpid()))
        link = re.search(r"dashboard (\S+)", lines[-1]).group(1)
        with urllib.request.urlopen(link, timeout=10) as page:
            assert page.status == 200
    assert len(sockets) >= 4, sockets  # scheduler, dashboard, two workers (and their nannies)
    assert [s for s in sockets if s[1] not in LOOPBACK_ADDRS] == []


def test_slurm_cluster_scheduler_speaks_tls_and_refuses_clients_without_the_runs_certificate(
        tmp_path):
    """The scheduler `data.dask.cluster=slurm` starts (dask-jobqueue's, nothing submitted):
    on the configured interface, TLS only; a plain client and one with a certificate of its
    own are refused, ours gets in; the certificate's folder and key are private."""
    from distributed import Client
    from pipeline.data.cluster import run_security, slurm_cluster
    cfg = load_config("demo", [*SMALL, "data.dask.cluster=slurm", "data.dask.slurm.interface=lo",
                               f"data.dask.slurm.log_directory={tmp_path}"])
    cluster = slurm_cluster(cfg.data.dask)
    try:
        address = cluster.scheduler_address
        assert address.startswith("tls://127.0.0.1:"), address
        assert "--tls-key" in cluster.job_script() and "--protocol tls://" in cluster.job_script()
        [tls] = tmp_path.glob(".hpcforge-dask-tls-*")
        assert tls.stat().st_mode & 0o777 == 0o700
        assert (tls / "key.pem").stat().st_mode & 0o777 == 0o600
        plain = address.replace("tls://", "tcp://")
        with pytest.raises((OSError, TimeoutError)):
            Client(plain, timeout="3s")
        (tmp_path / "foreign").mkdir()
        with pytest.raises((OSError, TimeoutError)):
            Client(address, security=run_security(tmp_path / "foreign"), timeout="3s")
        with Client(address, security=cluster.security, timeout="10s") as ours:
            assert ours.scheduler_info()["address"] == address
    finally:
        cluster.close()
