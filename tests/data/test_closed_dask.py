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
