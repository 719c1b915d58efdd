"""Dask clusters for prepare: joining a running one by address, and Slurm through dask-jobqueue."""
from __future__ import annotations

import pytest
import zarr

from pipeline.config import load_config
from pipeline.core.errors import UserError
from pipeline.data.cluster import dask_client, shape, slurm_cluster
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
