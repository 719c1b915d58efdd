"""What a submitted job leaves behind, and how `status`, `logs` and `cancel` find it again.

    <jobs_dir>/<job id>/job.json      resolved config, command line, git revision, stage, backend
    <jobs_dir>/<job id>/<id>_<rank>_log.out|err, *_submitted.pkl, *_result.pkl   (submitit's files)
    <jobs_dir>/<array id>/sweep.json  a sweep: its tasks' ids, overrides and output dirs

Submitit's `Job`, rebuilt from the record's folder and id (`job_of`), names the logs and result
files (`job.paths`) and reads results (`job.result()`). Slurm is asked directly only for what
submitit cannot see:
  * `sacct` for the status table: submitit's watcher asks sacct for JobID, State and NodeList
    only, and `status` also shows ExitCode and Elapsed, one row per array task;
  * `scontrol show job` for the controller's live JobState: a cancelled job is COMPLETING there
    before accounting says CANCELLED, which is how a requeue tells scancel from a preemption;
  * `scancel` itself, so that its refusal becomes one line naming the job (submitit's `cancel`
    raises CalledProcessError and leaves scancel's message on the terminal).
A local job's state is its result file, else whether its process lives (submitit's LocalJob
knows its process only in the process that submitted it).
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import pickle_load
from submitit.local.local import LocalJob

from pipeline.core.errors import UserError


def command_line() -> list[str]:
    return ["hpcforge", *sys.argv[1:]] if Path(sys.argv[0]).name in ("hpcforge", "__main__.py") \
        else [sys.executable, *sys.argv]


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Atomic: a reader never sees half a record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)
    return path


def find(jobs_dir: Path, job_id: str) -> dict[str, Any]:
    """The record of job `job_id` (a job, an array task `A_i`, or a sweep's array id)."""
    folder = Path(jobs_dir) / job_id
    for name in ("job.json", "sweep.json"):
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    known = sorted((p.parent.name for p in Path(jobs_dir).glob("*/*.json")), key=_id_key)[-8:]
    raise UserError(f"job {job_id}: no record under {jobs_dir}/ (expected {folder}/job.json); "
                    f"recent jobs: {', '.join(known) or '(none)'}; pass --jobs-dir if it was "
                    f"submitted with another cluster.jobs_dir")


def _id_key(job_id: str) -> tuple[int, ...]:
    return tuple(int(p) for p in job_id.split("_") if p.isdigit())


# --------------------------------------------------------------------------- state
def sacct(job_id: str) -> list[dict[str, str]]:
    """One row per job (or array task): JobID, State, ExitCode, Elapsed, Start, End, NodeList."""
    fields = ["JobID", "State", "ExitCode", "Elapsed", "Start", "End", "NodeList"]
    r = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "--format=" + ",".join(fields)],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise UserError(f"sacct -j {job_id} failed: {r.stderr.strip()}")
    rows = [dict(zip(fields, line.split("|"))) for line in r.stdout.splitlines() if line.strip()]
    for row in rows:  # "CANCELLED by 0" -> "CANCELLED"
        row["State"] = row["State"].split()[0] if row["State"] else "UNKNOWN"
    return rows


def scontrol_job(job_id: str) -> dict[str, str]:
    """Slurm's live view of a job (`scontrol -o show job`: JobState, Restarts, ...), from the
    controller, not accounting; {} when scontrol cannot say."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def local_state(record: dict[str, Any]) -> str:
    result = result_of(record)
    if result is not None:
        return "COMPLETED" if result[0] == "success" else "FAILED"
    try:
        os.kill(int(record["job_id"]), 0)
        return "RUNNING"
    except (ProcessLookupError, ValueError):
        return "UNKNOWN"


def states(record: dict[str, Any]) -> list[dict[str, str]]:
    if record["backend"] == "slurm":
        rows = sacct(record["job_id"])
        if rows:
            return rows
        return [{"JobID": record["job_id"], "State": "PENDING (not yet in accounting)"}]
    return [{"JobID": record["job_id"], "State": local_state(record)}]


def job_of(record: dict[str, Any], rank: int = 0) -> submitit.Job:
    """Submitit's handle on one rank (task) of a recorded job, as any process can rebuild it."""
    cls = submitit.SlurmJob if record["backend"] == "slurm" else LocalJob
    job = cls(folder=record["folder"], job_id=record["job_id"],
              tasks=tuple(range(max(record.get("ranks", 1), rank + 1))))
    return job.task(rank)


def result_of(record: dict[str, Any], rank: int = 0) -> tuple[str, Any] | None:
    """("success", value) or ("error", traceback) for one rank once it wrote its result, else
    None (submitit's `result()` would wait). A success is `job.result()`; a failure is the
    traceback as submitit stored it, since its FailedJobError wraps that in a frame and log paths
    and `status` shows the traceback's last line."""
    job = job_of(record, rank)
    if not job.paths.result_pickle.is_file():
        return None
    if job.exception() is None:
        return "success", job.result()
    return "error", pickle_load(job.paths.result_pickle)[1]


def log_paths(record: dict[str, Any], rank: int = 0) -> tuple[Path, Path]:
    """One rank's stdout and stderr, where submitit writes them."""
    paths = job_of(record, rank).paths
    return paths.stdout, paths.stderr


def cancel(record: dict[str, Any]) -> str:
    if record["backend"] == "slurm":
        r = subprocess.run(["scancel", record["job_id"]], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise UserError(f"scancel {record['job_id']} failed: {r.stderr.strip()}")
        return f"cancel requested for Slurm job {record['job_id']}"
    try:
        os.kill(int(record["job_id"]), 2)  # submitit's local jobs stop on SIGINT
    except (ProcessLookupError, ValueError):
        return f"job {record['job_id']} is not running"
    return f"interrupted local job {record['job_id']}"
