"""`hpcforge submit`: one run, or a chain of stages, as Slurm jobs that start without blocking.

    records = submit("demo", ["cluster=local_slurm", "cluster.nodes=2"], stages=["prepare", "train"])

Each stage is one job; a later stage depends on the one before it with `afterok`, so training never
starts on a dataset whose preparation failed (Slurm cancels it: kill-on-invalid-dep).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import records
from jobs.executor import (make_executor, private_files, resolve_backend, submit_error,
                           tasks_per_node, validate)
from jobs.tasks import EvaluateJob, PrepareJob, TrainJob, final_checkpoint
from pipeline.config import ClusterConfig, Config, load_config
from pipeline.core.errors import UserError
from pipeline.core.provenance import git_revision
from pipeline.core.redaction import redact

STAGES = ("prepare", "train", "evaluate")


@dataclass
class Submitted:
    stage: str
    job_id: str
    backend: str
    record: Path          # <jobs_dir>/<job id>/job.json
    logs: Path            # rank 0's stdout
    job: Any = None       # the submitit Job (in this process only)


def resolved(experiment: str, overrides: list[str]) -> Config:
    """The config with absolute paths: jobs may run from another directory (or a container)."""
    cfg = load_config(experiment, overrides)
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    cfg.data.path = str(Path(cfg.data.path).resolve())
    cfg.cluster.jobs_dir = str(Path(cfg.cluster.jobs_dir).resolve())
    return cfg


def slurm_ranks(cfg: Config, backend: str) -> None:
    """On Slurm the ranks are srun's tasks (nodes x tasks_per_node), whatever train.dist.nproc
    says; the recorded config says what ran."""
    if backend == "slurm":
        cfg.train.dist.nproc = cfg.cluster.nodes * tasks_per_node(cfg.cluster)


def check_stages(stages: list[str], backend: str) -> None:
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UserError(f"--stages {','.join(stages)}: unknown stage(s) {', '.join(unknown) or '(none)'}; "
                        f"valid: {', '.join(STAGES)}, in that order (e.g. --stages prepare,train)")
    if list(stages) != sorted(stages, key=STAGES.index) or len(set(stages)) != len(stages):
        raise UserError(f"--stages {','.join(stages)}: expected each stage once, in the order "
                        f"{' -> '.join(STAGES)}")
    if len(stages) > 1 and backend != "slurm":
        raise UserError(f"--stages {','.join(stages)}: chaining needs Slurm dependencies, but "
                        f"cluster.executor resolves to {backend}; run the stages one by one "
                        f"(`hpcforge prepare`, then `hpcforge submit`)")


def stage_cluster(stage: str, c: ClusterConfig, cfg: Config) -> ClusterConfig:
    """Prepare and evaluate are one task on one node; prepare's Dask workers get the cores."""
    if stage == "train":
        return c
    dask = cfg.data.dask
    cpus = max(c.cpus_per_task, dask.n_workers * dask.threads_per_worker) if stage == "prepare" \
        else c.cpus_per_task
    gpus = min(1, c.gpus_per_node) if stage == "evaluate" else 0
    return dataclasses.replace(c, nodes=1, tasks_per_node=1, gpus_per_node=gpus, cpus_per_task=cpus)


def job_for(stage: str, cfg: Config, experiment: str, overrides: list[str]):
    argv = ["-e", experiment, *overrides, f"output_dir={cfg.output_dir}", f"data.path={cfg.data.path}"]
    if stage == "prepare":
        return PrepareJob(cfg)
    if stage == "train":
        return TrainJob(cfg, argv, cfg.cluster.max_requeues)
    return EvaluateJob(str(final_checkpoint(cfg)))


def submit(experiment: str, overrides: list[str], stages: list[str] | None = None) -> list[Submitted]:
    """Validate, then submit each stage; returns at once (nothing waits for the jobs)."""
    stages = list(stages or ["train"])
    cfg = resolved(experiment, overrides)
    backend = resolve_backend(cfg.cluster)
    slurm_ranks(cfg, backend)
    check_stages(stages, backend)
    clusters = {s: stage_cluster(s, cfg.cluster, cfg) for s in stages}
    for c in clusters.values():
        validate(c, backend)
    out: list[Submitted] = []
    for stage in stages:
        dependency = f"afterok:{out[-1].job_id}" if out else None
        out.append(submit_one(stage, cfg, clusters[stage], backend, job_for(stage, cfg, experiment, overrides),
                              dependency, {"experiment": experiment, "overrides": overrides}))
    return out


def submit_one(stage: str, cfg: Config, cluster: ClusterConfig, backend: str, fn, dependency: str | None,
               extra: dict[str, Any]) -> Submitted:
    import submitit

    jobs_dir = Path(cfg.cluster.jobs_dir)
    binds = [str(Path(cfg.data.path).parent), cfg.output_dir, str(jobs_dir)]
    ex = make_executor(cluster, backend, jobs_dir, f"{cfg.experiment}-{stage}", binds, dependency)
    with private_files():  # the submission script and pickle hold cluster.setup's secrets
        try:
            job = ex.submit(fn)
        except (submitit.core.utils.FailedJobError, OSError) as e:
            raise submit_error(e, cluster) from None
        record = record_for(stage, str(job.job_id), backend, cfg, cluster, dependency, extra,
                            Path(job.paths.folder))
        path = records.write_json(Path(job.paths.folder) / "job.json", record)
    return Submitted(stage, str(job.job_id), backend, path, Path(job.paths.stdout), job)


def record_for(stage: str, job_id: str, backend: str, cfg: Config, cluster: ClusterConfig,
               dependency: str | None, extra: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The job's record (job.json), secrets redacted: the job itself gets them, the record not."""
    record = {"job_id": job_id, "stage": stage, "backend": backend, "folder": str(folder),
              "submitted": records.now(), "command": records.command_line(),
              "git_revision": git_revision(), "depends_on": dependency,
              "ranks": cluster.nodes * tasks_per_node(cluster), "nodes": cluster.nodes,
              "output_dir": cfg.output_dir, **extra,
              "cluster": dataclasses.asdict(cluster), "config": cfg.to_dict()}
    return redact(record)
