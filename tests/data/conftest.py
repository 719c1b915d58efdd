"""Fixtures for the data tests: one real Dask LocalCluster that prepares join by address."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def dask_address():
    """A real distributed.LocalCluster (2 worker processes) started here, shared by the tests; on
    loopback, as the pipeline's own local cluster (test_closed_dask lists this process tree's
    listeners, and this cluster is in it)."""
    from distributed import LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster.scheduler_address


