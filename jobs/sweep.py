"""`hpcforge sweep`: a grid (or list) over any config keys, as one Slurm job array.

    hpcforge sweep -e demo cluster=local_slurm --grid model=vae,autoencoder --grid train.seed=0,1
    hpcforge sweep -e demo --task "model=gan model.data_shape=[1,16,16]" --task "model=vae"

Tasks = every combination of the `--grid` axes, times each `--task` (a set of overrides), on top of
the common overrides. Each task is a full (multi-rank) training run in its own output directory,
logging to one W&B group; the array runs at most `cluster.array_parallelism` tasks at once. A
summary job (`afterany` on the array) writes the table — one row per task: overrides, state, final
metrics — as summary.json/csv/md next to the sweep's record, and as a W&B table in the same group.

The grammar beside Hydra's multirun (`python train.py -m ...`, hydra-submitit-launcher), which
users of this field know; the values are the same, the flags differ:

    Hydra multirun                                  hpcforge sweep
    -m model=vae,autoencoder train.seed=0,1         --grid model=vae,autoencoder --grid train.seed=0,1
    -m 'model.channels=[8,16],[16,32]'              --grid model.channels=[8,16],[16,32]
    -m train.lr=range(1,4)  (sweep functions)       --grid train.lr=1,2,3   (values listed)
    (no list of hand-picked combinations)           --task "model=gan train.lr=2e-4" --task model=vae
    a job per combination (submitit launcher)       one Slurm array, at most cluster.array_parallelism
                                                    at once, plus the summary table job

Kept rather than Hydra's: the swept keys are the ones after `--grid`, so a common override never
becomes an axis by holding a comma (under `-m` Hydra sweeps any `key=a,b`); `--task` lists
combinations a grid cannot; and the configs are composed by pipeline/config.py, not by Hydra.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import itertools
import json
import shlex
from pathlib import Path
from typing import Any

import yaml

from jobs import records
from jobs.executor import make_executor, resolve_backend, submit_error, validate
from jobs.submit import record_for, resolved, slurm_ranks
from jobs.tasks import TrainJob
from pipeline.config import LoggerConfig, parse_overrides
from pipeline.errors import UserError
from pipeline.provenance import git_revision
from pipeline.redaction import redact


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` -> ['a', 'b', '[1,2]']: commas inside brackets belong to a value."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out if v.strip()]


def expand(grid: list[str], tasks: list[str]) -> list[list[str]]:
    """The task list: product of the grid axes, times each explicit task."""
    axes = []
    for axis in grid:
        key, sep, values = axis.partition("=")
        if not sep or not split_values(values):
            raise UserError(f"--grid {axis!r}: expected key=v1,v2,... (e.g. --grid train.seed=0,1,2)")
        axes.append([f"{key}={v}" for v in split_values(values)])
    extra = [_task_words(t) for t in tasks] or [[]]
    combos = [list(c) + e for c in itertools.product(*axes) for e in extra]
    if combos == [[]]:
        raise UserError("hpcforge sweep: nothing to sweep; give --grid key=v1,v2 and/or --task "
                        "'key=value ...'")
    return combos


def _task_words(task: str) -> list[str]:
    """`--task "k=v k2='a b'"`: the overrides of one task, split as a shell would."""
    try:
        return shlex.split(task)
    except ValueError as e:  # an unclosed quote
        raise UserError(f"--task {task!r}: {e}; expected 'key=value key=value', quoting a value "
                        f"with spaces (e.g. --task \"train.seed=1 model.channels='[8, 16]'\")") from None


def sweep(experiment: str, overrides: list[str], grid: list[str], tasks: list[str],
          name: str | None = None, parallel: int | None = None) -> dict[str, Any]:
    """Validate every task's config, then submit the array and its summary job."""
    task_overrides = expand(grid, tasks)  # a malformed --grid/--task is named before anything
    for t in task_overrides:
        parse_overrides(t)
    base = resolved(experiment, overrides)
    backend = resolve_backend(base.cluster)
    if backend != "slurm":
        raise UserError(f"hpcforge sweep runs one Slurm job array, but cluster.executor resolves to "
                        f"{backend}; use a Slurm cluster profile (e.g. cluster=local_slurm)")
    if parallel is not None:
        if parallel < 1:  # cluster.array_parallelism itself is checked as the config loads
            raise UserError(f"--parallel {parallel}: expected at least 1 task at once; pass "
                            f"--parallel 1 or more")
        base.cluster.array_parallelism = parallel
    name = name or base.train.logger.group or \
        f"sweep-{base.experiment}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    sweep_dir = Path(base.output_dir) / "sweeps" / name
    for t in task_overrides:
        bad = [o for o in t if o.startswith("cluster")]
        if bad:
            raise UserError(f"sweep task override {bad[0]}: cluster settings are per sweep (one "
                            f"array), not per task; pass it before --grid/--task")
    jobs = [_task(experiment, overrides, t, i, sweep_dir, base, name) for i, t in enumerate(task_overrides)]
    validate(base.cluster, backend)
    return _submit_array(base, backend, jobs, task_overrides, name, sweep_dir,
                         {"experiment": experiment, "overrides": overrides})


def _task(experiment: str, overrides: list[str], extra: list[str], i: int, sweep_dir: Path, base,
          group: str) -> TrainJob:
    fixed = [f"output_dir={sweep_dir / str(i)}", f"data.path={base.data.path}",
             f"train.logger.group={group}", f"cluster.jobs_dir={base.cluster.jobs_dir}"]
    argv = [*overrides, *extra, *fixed]
    cfg = resolved(experiment, argv)  # a bad key in any task fails here, before submitting
    slurm_ranks(cfg, "slurm")
    return TrainJob(cfg, ["-e", experiment, *argv], base.cluster.max_requeues)


def _submit_array(base, backend: str, jobs: list[TrainJob], task_overrides: list[list[str]],
                  name: str, sweep_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    import submitit

    jobs_dir = Path(base.cluster.jobs_dir)
    binds = [str(Path(base.data.path).parent), base.output_dir, str(jobs_dir)]
    ex = make_executor(base.cluster, backend, jobs_dir, f"{name}", binds)
    try:
        with ex.batch():
            submitted = [ex.submit(job) for job in jobs]
    except (submitit.core.utils.FailedJobError, OSError) as e:
        raise submit_error(e, base.cluster) from None
    array_id = str(submitted[0].job_id).split("_")[0]
    rows = []
    for job, fn, t in zip(submitted, jobs, task_overrides):
        folder = Path(job.paths.folder)
        records.write_json(folder / "job.json", record_for(
            "train", str(job.job_id), backend, fn.cfg, base.cluster, None,
            {**extra, "sweep": name, "task_overrides": t}, folder))
        rows.append({"job_id": str(job.job_id), "overrides": t, "output_dir": fn.cfg.output_dir,
                     "logs": str(job.paths.stdout)})
    record = {"job_id": array_id, "kind": "sweep", "name": name, "backend": backend,
              "folder": str(jobs_dir / array_id), "sweep_dir": str(sweep_dir),
              "submitted": records.now(), "command": records.command_line(),
              "git_revision": git_revision(), "parallelism": base.cluster.array_parallelism,
              "tasks": rows, **extra, "config": base.to_dict()}
    summary_cluster = dataclasses.replace(base.cluster, nodes=1, tasks_per_node=1, gpus_per_node=0)
    summary_ex = make_executor(summary_cluster, backend, jobs_dir, f"{name}-summary", binds,
                               dependency=f"afterany:{array_id}")
    summary_job = summary_ex.submit(SweepSummary(record, base.train.logger))
    record["summary_job"] = str(summary_job.job_id)
    record["summary"] = str(sweep_dir / "summary.json")
    records.write_json(jobs_dir / array_id / "sweep.json", redact(record))
    record["_jobs"] = submitted
    record["_summary_job"] = summary_job
    return record


# --------------------------------------------------------------------------- summary
def task_row(task: dict[str, Any], state: str) -> dict[str, Any]:
    """One table row: the task's overrides, its state, and its final metrics."""
    row: dict[str, Any] = {"job_id": task["job_id"], "overrides": " ".join(task["overrides"]),
                           "state": state}
    path = Path(task["output_dir"]) / "train" / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        row["steps"] = summary.get("steps")
        row.update({k: v for k, v in (summary.get("history") or [{}])[-1].items() if k != "epoch"})
        run = summary.get("wandb_run") or ""
        row["wandb_run_id"] = run.rsplit("-", 1)[-1] if run else None
    return row


def write_table(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """summary.json, summary.csv and summary.md; returns the columns."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    out.mkdir(parents=True, exist_ok=True)
    records.write_json(out / "summary.json", {"columns": columns, "rows": rows})
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return columns


class SweepSummary:
    """The job after the array (afterany): collect every task's row, write the table, log it."""

    def __init__(self, record: dict[str, Any], logger: LoggerConfig):
        self.record = {k: v for k, v in record.items() if not k.startswith("_")}
        self.logger = logger

    def __call__(self) -> dict[str, Any]:
        rec = self.record
        state = {r["JobID"]: r["State"] for r in records.sacct(rec["tasks"][0]["job_id"].split("_")[0])}
        rows = [task_row(t, state.get(t["job_id"], "UNKNOWN")) for t in rec["tasks"]]
        out = Path(rec["sweep_dir"])
        columns = write_table(rows, out)
        run_path = self._log_wandb(columns, rows, out)
        print(f"[hpcforge] sweep {rec['name']}: {len(rows)} tasks, summary {out / 'summary.md'}"
              f"{', W&B ' + run_path if run_path else ''}", flush=True)
        print((out / "summary.md").read_text(), flush=True)
        return {"rows": rows, "summary": str(out / "summary.json"), "wandb_run": run_path}

    def _log_wandb(self, columns: list[str], rows: list[dict[str, Any]], out: Path) -> str | None:
        from pipeline.tracking import resolve_mode
        mode = resolve_mode(self.logger.mode)  # auto: online with an API key, else offline
        if mode == "disabled":
            return None
        import wandb
        run = wandb.init(mode=mode, dir=str(out), project=self.logger.project,
                         entity=self.logger.entity, group=self.record["name"],
                         job_type="sweep-summary", name=f"{self.record['name']}-summary",
                         config={"sweep": {k: self.record[k] for k in ("name", "job_id", "command")}},
                         settings=wandb.Settings(console="off"))
        data = [[_cell(r.get(c)) for c in columns] for r in rows]
        run.log({"sweep/summary": wandb.Table(columns=columns, data=data)})
        path = str(Path(run.dir).parent)
        run.finish()
        return path


def _cell(v: Any) -> Any:
    return v if isinstance(v, (int, float, str)) or v is None else yaml.safe_dump(v).strip()
