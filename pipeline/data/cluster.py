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
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.config import DaskConfig
from pipeline.core.errors import UserError

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


HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat"


class _HeartbeatOfAClosingWorker(logging.Filter):
    """Drops the worker's "Failed to communicate with scheduler during heartbeat" (an ERROR with a
    ~25-line traceback) while one of this process's workers is closing, and only then.

    Dask's Worker.close stops the heartbeat's periodic callback but does not wait for a heartbeat
    already sent: it then closes its own connection pool, the comm under that heartbeat with it,
    and the heartbeat logs the closed stream (dask/distributed#7105). The scheduler is still up
    at that moment (a LocalCluster closes it only after the worker processes have exited,
    measured). The wider the window, the likelier: under load the scheduler, in the prepare's own
    process, answers heartbeats slowly, and the traceback landed before the CLI's one line after
    a Ctrl-C or a full disk. A heartbeat failing while the worker runs is still logged."""

    def __init__(self):
        super().__init__()
        self.workers: weakref.WeakSet = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        from distributed.core import Status
        if not str(record.msg).startswith(HEARTBEAT_FAILED):
            return True
        return not any(w.status in (Status.closing, Status.closed) for w in list(self.workers))


class QuietWorkerClose(WorkerPlugin):
    """Worker plugin: the heartbeat's closed stream while the worker closes itself is not news
    (`_HeartbeatOfAClosingWorker`). Installed when the worker joins, so nothing has to reach the
    workers on the way out (a busy or interrupted worker answers late, if at all)."""
    name = "hpcforge-quiet-worker-close"

    def setup(self, worker=None) -> None:
        if worker is None:
            return
        logger = logging.getLogger("distributed.worker")
        quiet = next((f for f in logger.filters if isinstance(f, _HeartbeatOfAClosingWorker)),
                     None)
        if quiet is None:
            quiet = _HeartbeatOfAClosingWorker()
            logger.addFilter(quiet)
        quiet.workers.add(worker)


def run_security(folder: Path):
    """TLS for one run's Dask cluster: a self-signed certificate and key made now, for the
    scheduler, the workers and our client alike (what `Security.temporary()` makes, which needs
    the `cryptography` package; `openssl` is on every cluster node). Only peers holding them
    connect: the scheduler requires client certificates signed by this one (`require_encryption`
    refuses plain TCP). The files lie in `folder`, which must be private (0700) and on a
    filesystem the worker jobs see: workers read them from there."""
    from distributed.security import Security
    key, cert = folder / "key.pem", folder / "cert.pem"
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
                        "-subj", "/CN=hpcforge-dask", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"data.dask.cluster=slurm: could not make the run's TLS certificate with "
                        f"openssl ({e}); install openssl, or prepare on a local cluster "
                        f"(data.dask.cluster=local)") from None
    key.chmod(0o600)
    pair = {f"tls_{role}_{part}": str(path) for role in ("client", "scheduler", "worker")
            for part, path in (("cert", cert), ("key", key))}
    return Security(tls_ca_file=str(cert), require_encryption=True, **pair)


def slurm_cluster(d: DaskConfig, tls_dir: Path | None = None):
    """A dask-jobqueue SLURMCluster from config, closed by default (issue 25): TLS with a
    certificate made for this run (`run_security`, its files in `tls_dir`, a new private folder
    beside the worker logs unless given), the scheduler on data.dask.slurm.interface, its
    dashboard on loopback. Nothing is submitted until it is scaled."""
    from dask_jobqueue import SLURMCluster
    s = d.slurm
    if s.jobs < 1 or s.cores < 1 or not 1 <= s.processes <= s.cores:
        raise UserError(f"data.dask.slurm: jobs={s.jobs}, cores={s.cores}, processes={s.processes}; "
                        f"expected jobs >= 1 and 1 <= processes <= cores")
    own = tls_dir is None
    if own:
        beside = Path(s.log_directory or os.getcwd())
        beside.mkdir(parents=True, exist_ok=True)
        tls_dir = Path(tempfile.mkdtemp(prefix=".hpcforge-dask-tls-", dir=beside))  # 0700
    cluster = SLURMCluster(
        cores=s.cores, processes=s.processes, memory=s.memory, queue=s.queue, account=s.account,
        walltime=s.walltime, interface=s.interface, local_directory=s.local_directory,
        log_directory=s.log_directory, job_extra_directives=list(s.job_extra_directives),
        job_script_prologue=list(s.job_script_prologue), protocol="tls://",
        security=run_security(tls_dir), scheduler_options={"dashboard_address": f"{LOOPBACK}:0"})
    if own:  # the certificate goes with the cluster
        weakref.finalize(cluster, shutil.rmtree, tls_dir, True)
    return cluster


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


def _dashboard(client, cluster) -> str:
    """The dashboard's link where it listens: on loopback for clusters we start (the scheduler
    itself may listen on a cluster interface), as the scheduler says for a running one."""
    port = client.scheduler_info(n_workers=0).get("services", {}).get("dashboard")
    if cluster is None or port is None:
        return client.dashboard_link
    return f"http://{LOOPBACK}:{port}/status"


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
        # the address it listens on. Thread workers (processes=false) talk in-process, with no
        # socket to bind, and the in-process transport refuses a host.
        with _workers_ignore_ctrl_c():
            cluster = LocalCluster(n_workers=d.n_workers, threads_per_worker=d.threads_per_worker,
                                   memory_limit=d.memory_limit, processes=d.processes,
                                   dashboard_address=f"{LOOPBACK}:0",
                                   **({"host": LOOPBACK} if d.processes else {}))
        client = Client(cluster)
    interrupted = False
    try:
        workers, slots = shape(d, client)
        client.register_plugin(ZarrInWorkers(slots // workers))
        client.register_plugin(QuietWorkerClose())
        n = len(client.scheduler_info(n_workers=-1)["workers"])
        log(f"dask: {mode} cluster, {n} workers, dashboard {_dashboard(client, cluster)}")
        yield client
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        with _quiet_dask_logs() if interrupted else contextlib.nullcontext():
            client.close()
            if cluster is not None:
                cluster.close()


@contextlib.contextmanager
def _workers_ignore_ctrl_c() -> Iterator[None]:
    """Worker processes started inside ignore SIGINT: a terminal's Ctrl-C goes to its whole
    process group, and each worker printed ~30 lines of traceback before the one line the CLI
    says (issue 24). An ignored signal stays ignored across fork and exec, so the workers start
    so; this process takes Ctrl-C again on the way out and closes them itself (a Ctrl-C during
    the few seconds of start-up is not seen: press it again)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@contextlib.contextmanager
def _quiet_dask_logs() -> Iterator[None]:
    """While an interrupted prepare closes its cluster: Dask's warnings of workers still busy
    ("still alive after 4.0 seconds, killing") are expected, not news."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
