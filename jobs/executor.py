"""From a ClusterConfig to a submitit executor, after checking the request against the cluster.

    backend = resolve_backend(cluster)            # "slurm" | "local" | "debug"
    validate(cluster, backend)                    # UserError naming the setting, nothing submitted
    ex = make_executor(cluster, backend, folder, name="train", binds=[data, outputs])

One rank per GPU: tasks_per_node = gpus_per_node (one on CPU-only nodes, unless set). Ranks are
srun tasks; `srun --mpi=<cluster.mpi>` wires Horovod's MPI through PMIx/PMI2, no mpirun in the job.
"""
from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import ClusterConfig
from pipeline.core.errors import UserError

# Training time the job must get before the checkpoint signal; below this a job would be
# signalled before (or right after) it starts, checkpoint nothing and requeue forever.
MIN_TRAIN_S = 60


# Files only their owner may read (issue 25): submitit's `<id>_submission.sh` and
# `<id>_submitted.pkl` carry cluster.setup's lines and the job's config, secrets included (an
# `export WANDB_API_KEY=...`), as OpenSSH keeps its secrets 0600 in a 0700 folder.
PRIVATE_UMASK = 0o077


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """While submitit writes a job's folder, and while we write its record: folders 0700, files
    0600. sbatch passes the submitting umask on to the job (SLURM_UMASK), so its logs and what it
    writes are private too; a local job inherits it from this process."""
    old = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(old)


def resolve_backend(cluster: ClusterConfig) -> str:
    if cluster.executor != "auto":
        return cluster.executor
    return "slurm" if shutil.which("sbatch") else "local"


def tasks_per_node(cluster: ClusterConfig) -> int:
    return cluster.tasks_per_node or max(1, cluster.gpus_per_node)


def _slurm_query(*cmd: str) -> list[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        first = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
        raise UserError(f"`{' '.join(cmd)}` failed ({first}); is the "
                        f"Slurm controller reachable? (check `sinfo`, or use cluster.executor=local)")
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


def partitions() -> tuple[list[str], str | None]:
    """The cluster's partitions and its default one (marked `*` by sinfo)."""
    names = _slurm_query("sinfo", "-h", "-o", "%P")
    default = next((n.rstrip("*") for n in names if n.endswith("*")), None)
    return sorted({n.rstrip("*") for n in names}), default


def partition_gres(partition: str) -> list[str]:
    """Generic resources (e.g. gpu:a100:4) the nodes of `partition` offer; '(null)' is none."""
    return [g for g in _slurm_query("sinfo", "-h", "-p", partition, "-o", "%G") if g != "(null)"]


def validate(cluster: ClusterConfig, backend: str) -> None:
    """Refuse a request the cluster cannot run, before anything is submitted."""
    c = cluster
    if c.nodes < 1:
        raise UserError(f"cluster.nodes={c.nodes}: expected at least 1 node; set cluster.nodes=1 or more")
    for key in ("gpus_per_node", "tasks_per_node", "mem_gb", "max_requeues"):
        if getattr(c, key) < 0:
            raise UserError(f"cluster.{key}={getattr(c, key)}: expected >= 0")
    if c.cpus_per_task < 1:
        raise UserError(f"cluster.cpus_per_task={c.cpus_per_task}: expected at least 1")
    if c.gpus_per_node and c.tasks_per_node not in (0, c.gpus_per_node):
        raise UserError(f"cluster.tasks_per_node={c.tasks_per_node} with cluster.gpus_per_node="
                        f"{c.gpus_per_node}: one rank per GPU expected; set tasks_per_node=0")
    if c.timeout_min * 60 - c.signal_delay_s < MIN_TRAIN_S:
        raise UserError(
            f"cluster.timeout_min={c.timeout_min} is too short to checkpoint: the checkpoint signal "
            f"comes cluster.signal_delay_s={c.signal_delay_s} s before the limit, leaving "
            f"{c.timeout_min * 60 - c.signal_delay_s} s (< {MIN_TRAIN_S} s) to train; expected "
            f"timeout_min >= {-(-(c.signal_delay_s + MIN_TRAIN_S) // 60)} or a smaller signal_delay_s")
    if c.container and "://" not in c.container and not Path(c.container).exists():
        raise UserError(f"cluster.container={c.container}: no such image file; build it from "
                        f"containers/Apptainer.def or give its path (or docker://...)")
    if backend == "slurm":
        _validate_slurm(c)


def _validate_slurm(c: ClusterConfig) -> None:
    if shutil.which("sbatch") is None:
        raise UserError("cluster.executor=slurm but `sbatch` is not on PATH; run on the cluster's "
                        "login node, or use cluster.executor=local")
    names, default = partitions()
    if c.partition is not None and c.partition not in names:
        raise UserError(f"cluster.partition={c.partition}: no such partition on this cluster; "
                        f"available: {', '.join(names)} (check `sinfo`)")
    partition = c.partition or default
    if c.gpus_per_node and partition and not any("gpu" in g for g in partition_gres(partition)):
        raise UserError(
            f"cluster.gpus_per_node={c.gpus_per_node}: partition {partition} offers no GPUs "
            f"(its nodes have no gpu generic resource); set cluster.gpus_per_node=0 or pick a GPU "
            f"partition with cluster.partition=...")


def slurm_parameters(c: ClusterConfig, name: str) -> dict:
    """AutoExecutor's slurm_* parameters for this request."""
    params: dict = {
        "name": name, "nodes": c.nodes, "tasks_per_node": tasks_per_node(c),
        "cpus_per_task": c.cpus_per_task, "timeout_min": c.timeout_min,
        "slurm_signal_delay_s": c.signal_delay_s, "slurm_setup": list(c.setup),
        "slurm_array_parallelism": c.array_parallelism,
        # A dependent job whose dependency failed is cancelled, not left pending forever.
        "slurm_additional_parameters": {"kill-on-invalid-dep": "yes", **c.sbatch_extra},
    }
    optional = {"slurm_partition": c.partition, "slurm_account": c.account, "slurm_qos": c.qos,
                "slurm_constraint": c.constraint, "gpus_per_node": c.gpus_per_node or None,
                "mem_gb": c.mem_gb or None}
    params.update({k: v for k, v in optional.items() if v is not None})
    if c.mpi:
        params["slurm_srun_args"] = [f"--mpi={c.mpi}"]
    return params


def container_python(c: ClusterConfig, binds: list[str]) -> str:
    """The python command inside the container: `apptainer exec --nv --bind ... image python`."""
    paths = sorted({str(Path(b).resolve()) for b in [*binds, *c.binds]})
    bind = ["--bind", ",".join(paths)] if paths else []
    # No --cleanenv: the ranks need Slurm's SLURM_* and submitit's variables inside.
    return shlex.join(["apptainer", "exec", "--nv", *bind, c.container, "python"])


def make_executor(c: ClusterConfig, backend: str, folder: Path, name: str, binds: list[str],
                  dependency: str | None = None):
    """A submitit executor writing its logs under `folder/%j/` (one folder per job)."""
    import submitit

    folder = Path(folder) / "%j"
    if backend == "debug":
        ex = submitit.AutoExecutor(folder=folder, cluster="debug")
        ex.update_parameters(name=name, timeout_min=c.timeout_min)
        return ex
    if backend == "local":
        ex = submitit.AutoExecutor(folder=folder, cluster="local")
        ex.update_parameters(name=name, timeout_min=c.timeout_min, nodes=1, tasks_per_node=1)
        return ex
    python = container_python(c, binds) if c.container else None
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_python=python,
                               slurm_max_num_timeout=c.max_requeues)
    params = slurm_parameters(c, name)
    if dependency:
        params["slurm_additional_parameters"]["dependency"] = dependency
    ex.update_parameters(**params)
    return ex


def submit_error(e: Exception, c: ClusterConfig) -> UserError:
    """sbatch's refusal as one line naming the setting it concerns."""
    text = " ".join(str(e).split())
    if "Invalid generic resource" in text or "gres" in text.lower():
        return UserError(f"cluster.gpus_per_node={c.gpus_per_node}: the cluster refused the GPU "
                         f"request (sbatch: Invalid generic resource specification); this "
                         f"partition has no GPUs: set cluster.gpus_per_node=0 or a GPU partition")
    if "invalid partition" in text.lower():
        return UserError(f"cluster.partition={c.partition}: sbatch says invalid partition; "
                         f"check `sinfo`")
    if "account" in text.lower():
        return UserError(f"cluster.account={c.account}: sbatch refused it ({text[-200:]})")
    return UserError(f"sbatch refused the job: {text[-300:]}")

