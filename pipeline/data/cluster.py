"""The Dask cluster `prepare` runs on: a LocalCluster, Slurm jobs (dask-jobqueue), or a running one.

    data.dask.cluster=local     LocalCluster(n_workers, threads_per_worker, memory_limit) [default]
    data.dask.cluster=slurm     SLURMCluster from data.dask.slurm (one Slurm job per `jobs`)
    data.dask.cluster=address   join the scheduler at data.dask.scheduler (tcp://host:8786);
                                setting data.dask.scheduler alone also means this

Inside every worker Zarr's own parallelism is capped (ZarrInWorkers): Dask already runs one task
per worker thread, so Zarr's codec thread pool is sized to the worker's threads and Blosc's
internal threads are off; otherwise N workers x (cores) threads oversubscribe the node.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.config import DaskConfig
from pipeline.errors import UserError

ZARR_IO_PER_THREAD = 4   # concurrent chunk reads/writes per Dask thread: hides latency, bounded
LOOPBACK = "127.0.0.1"   # where a local cluster listens: nobody else on the network reaches it


class ZarrInWorkers(WorkerPlugin):
    """Worker plugin: Zarr and Blosc concurrency that fits one Dask worker's threads."""
    name = "hpcforge-zarr-concurrency"

    def __init__(self, threads: int):
        self.threads = max(1, threads)

    def setup(self, worker=None) -> None:
        import numcodecs.blosc
        import zarr
        zarr.config.set({"threading.max_workers": self.threads,
                         "async.concurrency": ZARR_IO_PER_THREAD * self.threads})
        numcodecs.blosc.use_threads = False


def slurm_cluster(d: DaskConfig):
    """A dask-jobqueue SLURMCluster from config; nothing is submitted until it is scaled."""
    from dask_jobqueue import SLURMCluster
    s = d.slurm
    if s.jobs < 1 or s.cores < 1 or not 1 <= s.processes <= s.cores:
        raise UserError(f"data.dask.slurm: jobs={s.jobs}, cores={s.cores}, processes={s.processes}; "
                        f"expected jobs >= 1 and 1 <= processes <= cores")
    return SLURMCluster(
        cores=s.cores, processes=s.processes, memory=s.memory, queue=s.queue, account=s.account,
        walltime=s.walltime, interface=s.interface, local_directory=s.local_directory,
        log_directory=s.log_directory, job_extra_directives=list(s.job_extra_directives),
        job_script_prologue=list(s.job_script_prologue), scheduler_options={"dashboard_address": ":0"})


def shape(d: DaskConfig, client=None) -> tuple[int, int]:
    """(worker processes, task slots) of the cluster; a running one is asked."""
    if client is not None and _mode(d) == "address":
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        return max(1, len(workers)), max(1, sum(w["nthreads"] for w in workers))
    if _mode(d) == "slurm":
        return d.slurm.jobs * d.slurm.processes, d.slurm.jobs * d.slurm.cores
    return d.n_workers, d.n_workers * d.threads_per_worker


def _mode(d: DaskConfig) -> str:
    return "address" if d.scheduler and d.cluster == "local" else d.cluster


def _join(address: str | None):
    from distributed import Client
    if not address:
        raise UserError("data.dask.cluster=address needs data.dask.scheduler=tcp://HOST:PORT; "
                        "set it to your running scheduler's address")
    try:
        return Client(address, timeout="10s")
    except (OSError, TimeoutError) as e:
        raise UserError(f"data.dask.scheduler={address}: no Dask scheduler answered "
                        f"({type(e).__name__}: {e}); start one (`dask scheduler`) or set "
                        f"data.dask.cluster=local") from None


@contextlib.contextmanager
def dask_client(d: DaskConfig, log=print) -> Iterator:
    """A connected Client for the configured cluster; clusters it started are closed after.

    Dask's Nanny writes its workers' settings into this process's own environment before it
    spawns them (distributed.nanny.pre-spawn-environ: MALLOC_TRIM_THRESHOLD_=65536,
    OMP_NUM_THREADS=1, ...) and never takes them back. They are undone on the way out: ranks this
    process starts later (`hpcforge train` after `prepare` in one job, the benchmarks, the tests)
    inherited them, and glibc's trimming at 64 KiB returned memory to the kernel at every step,
    which cost two CPU ranks ~25 % of their steps/s.
    """
    with _environment_restored():
        yield from _dask_client(d, log)


@contextlib.contextmanager
def _environment_restored() -> Iterator[None]:
    """os.environ as it was on entry, again on exit (keys added in between removed)."""
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in before]:
            del os.environ[key]
        os.environ.update(before)


def _dask_client(d: DaskConfig, log) -> Iterator:
    from distributed import Client, LocalCluster
    mode, cluster = _mode(d), None
    if mode == "address":
        client = _join(d.scheduler)
    elif mode == "slurm":
        cluster = slurm_cluster(d)
        cluster.scale(jobs=d.slurm.jobs)
        client = Client(cluster)
        log(f"dask: submitted {d.slurm.jobs} Slurm job(s); waiting up to {d.slurm.wait_s:.0f} s "
            f"for the first worker")
        client.wait_for_workers(1, timeout=d.slurm.wait_s)
    else:
        # Loopback only (issue 25): scheduler, workers and dashboard answer this host alone
        # (the dashboard's /json/identity.json lists workers and folders); its link then is
        # the address it listens on.
        cluster = LocalCluster(n_workers=d.n_workers, threads_per_worker=d.threads_per_worker,
                               memory_limit=d.memory_limit, processes=d.processes,
                               host=LOOPBACK, dashboard_address=f"{LOOPBACK}:0")
        client = Client(cluster)
    try:
        workers, slots = shape(d, client)
        client.register_plugin(ZarrInWorkers(slots // workers))
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        log(f"dask: {mode} cluster, {n} workers, dashboard {client.dashboard_link}")
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
