"""Dask clusters for prepare: joining a running one by address, and Slurm through dask-jobqueue."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import zarr
from helpers import ROOT

from pipeline.config import load_config
from pipeline.core.errors import UserError
from pipeline.data.cluster import (HEARTBEAT_FAILED, QuietWorkerClose, dask_client, shape,
                                   slurm_cluster)
from pipeline.data.prepare import prepare
from pipeline.data.store import open_store

SMALL = ["data.params.lattice=8", "data.params.burn_in=5", "data.params.decorrelation=1",
         "data.n_samples=256", "data.chunk_size=64", "data.shard_size=64", "data.dask.progress=false"]


def test_scheduler_address_joins_the_running_cluster_and_sets_zarr_concurrency(tmp_path,
                                                                               dask_address):
    from distributed import Client
    cfg = load_config("demo", [f"output_dir={tmp_path}", *SMALL,
                               f"data.dask.scheduler={dask_address}"])
    lines: list[str] = []
    store = open_store(prepare(cfg.data, cfg.to_dict(), log=lines.append))
    assert store.meta.splits["train"] + store.meta.splits["val"] == 256
    assert "dask: address cluster, 2 workers" in lines[0]
    with Client(dask_address) as client:                     # the cluster outlives the prepare
        inside = client.run(lambda: (zarr.config.get("threading.max_workers"),
                                     zarr.config.get("async.concurrency")))
    assert sorted(inside.values()) == [(1, 4), (1, 4)]       # 1 Dask thread per worker here


def test_unreachable_scheduler_is_a_clear_error():
    cfg = load_config("demo", ["data.dask.cluster=address", "data.dask.scheduler=tcp://127.0.0.1:9"])
    with pytest.raises(UserError, match=r"data.dask.scheduler=tcp://127.0.0.1:9: no Dask scheduler "
                                        r"answered .*; start one \(`dask scheduler`\)"):
        with dask_client(cfg.data.dask, log=lambda *a: None):
            pass
    cfg = load_config("demo", ["data.dask.cluster=address"])
    with pytest.raises(UserError, match="needs data.dask.scheduler=tcp://HOST:PORT"):
        with dask_client(cfg.data.dask, log=lambda *a: None):
            pass


def test_slurm_cluster_job_script_from_config_without_submitting():
    """dask-jobqueue builds the sbatch script from data.dask.slurm; the real Slurm run is in
    the Slurm tests (tests/slurm), which have the daemons."""
    cfg = load_config("demo", [
        "data.dask.cluster=slurm", "data.dask.slurm.jobs=3", "data.dask.slurm.queue=debug",
        "data.dask.slurm.account=proj", "data.dask.slurm.walltime=00:30:00",
        "data.dask.slurm.cores=8", "data.dask.slurm.memory=32GiB", "data.dask.slurm.processes=2",
        "data.dask.slurm.job_extra_directives=[--exclusive]",
        "data.dask.slurm.job_script_prologue=[source .venv/bin/activate]"])
    cluster = slurm_cluster(cfg.data.dask)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p debug", "#SBATCH -A proj", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=32G", "#SBATCH -t 00:30:00", "#SBATCH --exclusive",
                 "source .venv/bin/activate"):
        assert line in script.splitlines(), line
    assert "--nthreads 4" in script and "--nworkers 2" in script and "--memory-limit 16.00GiB" in script
    assert shape(cfg.data.dask) == (6, 24)     # 3 jobs x 2 workers, 3 jobs x 8 cores
    bad = load_config("demo", ["data.dask.cluster=slurm", "data.dask.slurm.processes=9"])
    with pytest.raises(UserError, match=r"processes=9; expected jobs >= 1 and 1 <= processes <= cores"):
        slurm_cluster(bad.data.dask)


def test_local_cluster_leaves_this_process_environment_as_it_found_it(monkeypatch):
    """Dask's Nanny sets MALLOC_TRIM_THRESHOLD_, OMP_NUM_THREADS, ... in the parent's environment
    to spawn its workers; MPI ranks started afterwards would inherit them (glibc then trims at
    64 KiB: ~25 % fewer training steps/s here). They must be gone once the cluster is closed."""
    import os
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = dict(os.environ)
    cfg = load_config("demo", ["data.dask.n_workers=1", "data.dask.memory_limit=1GiB"])
    with dask_client(cfg.data.dask, log=lambda *a: None) as client:
        # the worker got Dask's settings (the reason they were set) ...
        inside = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"),
                                     os.environ.get("OMP_NUM_THREADS")))
        assert list(inside.values()) == [("65536", "1")]
    assert dict(os.environ) == before  # ... and this process is back as it was


# A prepare that stops (here a full disk) while its scheduler answers heartbeats slowly, as a
# loaded one does: each worker's heartbeat is in flight ~0.45 s of every 0.5 s when it closes.
_CLOSE_UNDER_LOAD = r"""
import asyncio, sys, time
from pipeline.config import load_config
from pipeline.data.cluster import dask_client
cfg = load_config("demo", ["data.dask.n_workers=2", "data.dask.progress=false"])
try:
    with dask_client(cfg.data.dask, log=lambda *a: None) as client:
        scheduler = client.cluster.scheduler
        answer = scheduler.handlers["heartbeat_worker"]
        async def slow(*args, **kwargs):
            await asyncio.sleep(0.45)
            return answer(*args, **kwargs)
        scheduler.handlers["heartbeat_worker"] = slow
        time.sleep(1.5)
        raise OSError(28, "No space left on device")
except OSError:
    print("hpcforge: error: the one line", file=sys.stderr)
"""


def test_workers_closing_with_a_heartbeat_in_flight_print_nothing_after_the_one_line():
    """Dask's worker closes its connections under a heartbeat still waiting for its answer, and
    logged "Failed to communicate with scheduler during heartbeat" with a traceback (before this
    fix: in every run of this test)."""
    run = subprocess.run([sys.executable, "-c", _CLOSE_UNDER_LOAD], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0 and HEARTBEAT_FAILED not in run.stderr, run.stderr[-3000:]
    # Dask's own timestamped log lines aside (the scheduler's, in this process), only ours
    assert [line for line in run.stderr.splitlines() if not line[:4].isdigit()] == [
        "hpcforge: error: the one line"], run.stderr[-3000:]


def test_a_heartbeat_failing_while_the_worker_runs_is_still_logged(caplog):
    from distributed.core import Status

    class Worker:  # what the filter reads of a distributed Worker
        status = Status.running
    worker, logger = Worker(), logging.getLogger("distributed.worker")
    before = list(logger.filters)
    try:
        QuietWorkerClose().setup(worker)
        QuietWorkerClose().setup(worker)                   # registered again: still one filter
        assert len(logger.filters) == len(before) + 1
        with caplog.at_level(logging.INFO, logger="distributed.worker"):
            logger.error(HEARTBEAT_FAILED + ".")
            worker.status = Status.closing
            logger.error(HEARTBEAT_FAILED + ".")
            logger.info("Stopping worker")
        assert [r.getMessage() for r in caplog.records] == [HEARTBEAT_FAILED + ".", "Stopping worker"]
    finally:
        for f in logger.filters[len(before):]:
            logger.removeFilter(f)
