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

Sweeps that select (issue 15): `--stages train,evaluate` runs `hpcforge evaluate` on each task's
final checkpoint inside the same array task (jobs/tasks.py TrainJob), and the summary then holds
its metrics as `eval/<name>` columns beside the losses. `--rank-by [min:|max:]METRIC` orders the
table best first and numbers the rows (`rank`): METRIC as evaluate writes it (`w1/energy`,
`classifier/auc`, `relative_l2`) or a training column (`val/loss`); lower is better unless `max:`
says otherwise (`--rank-by max:accuracy`). The prefix is a word, not a sign, so that argparse
never reads the value as an option.

    hpcforge sweep -e demo cluster=local_slurm --grid train.seed=0,1,2 \
        --stages train,evaluate --rank-by w1/energy

Kept rather than Hydra's: the swept keys are the ones after `--grid`, so a common override never
becomes an axis by holding a comma (under `-m` Hydra sweeps any `key=a,b`); `--task` lists
combinations a grid cannot; and the configs are composed by pipeline/config/__init__.py, not by Hydra.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import itertools
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from jobs import records
from jobs.executor import make_executor, private_files, resolve_backend, submit_error, validate
from jobs.submit import record_for, resolved, slurm_ranks
from jobs.tasks import TrainJob
from pipeline.config import LoggerConfig, parse_overrides
from pipeline.core.errors import UserError
from pipeline.core.provenance import git_revision
from pipeline.core.redaction import redact


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


SWEEP_STAGES = (["train"], ["train", "evaluate"])
# Metrics only `hpcforge evaluate` writes (pipeline/analysis/evaluate.py), never the trainer's history.
EVALUATION_ONLY = ("w1/", "w1_reference/", "classifier/", "frechet_", "relative_l2", "anomaly_",
                   "precise/")


@dataclass(frozen=True)
class RankBy:
    """`--rank-by [min:|max:]METRIC`: the summary's order, best task first."""
    metric: str
    higher_is_better: bool = False

    @classmethod
    def parse(cls, text: str) -> RankBy:
        direction, sep, metric = text.partition(":")
        if not sep:
            direction, metric = "min", text
        if direction not in ("min", "max") or not metric.strip():
            raise UserError(f"--rank-by {text!r}: expected METRIC, min:METRIC or max:METRIC "
                            f"(e.g. --rank-by w1/energy, --rank-by max:accuracy)")
        return cls(metric.strip(), direction == "max")

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "direction": "max" if self.higher_is_better else "min"}


def sweep_stages(stages: list[str] | None) -> list[str]:
    stages = list(stages or ["train"])
    if stages not in SWEEP_STAGES:
        raise UserError(f"--stages {','.join(stages)}: a sweep trains each task and may evaluate "
                        f"it; expected train or train,evaluate (prepare the store once before, "
                        f"with `hpcforge prepare` or `hpcforge submit --stages prepare`)")
    return stages


def check_rank_by(rank: RankBy | None, stages: list[str], data_path: str, variable: str) -> None:
    """Refuse at submit time what can be known then: an evaluation metric without the evaluate
    stage, and a W1 metric of an observable the store's source does not define. Any other name
    (a loss) is only known once a task has run: the summary says so if none has it."""
    if rank is None or not rank.metric.startswith(EVALUATION_ONLY):
        return
    if "evaluate" not in stages:
        raise UserError(f"--rank-by {rank.metric}: an evaluation metric, but the sweep's stages "
                        f"are {','.join(stages)}; add --stages train,evaluate")
    kind, _, name = rank.metric.partition("/")
    if kind in ("w1", "w1_reference") and name not in (known := observable_names(data_path, variable)):
        valid = ", ".join(f"{kind}/{k}" for k in known) or "(none: its source declares no observables)"
        raise UserError(f"--rank-by {rank.metric}: evaluate writes no such W1 metric for this "
                        f"store; valid: {valid}")


def observable_names(data_path: str, variable: str) -> list[str]:
    """The scalar observables evaluate compares for the store's source (pipeline/physics/__init__.py),
    computed on two stored samples."""
    from pipeline import physics
    from pipeline.data.store import open_store
    from pipeline.sources import observables
    store = open_store(data_path)
    obs = observables(store.meta.source)
    if obs is None:
        return []
    return list(obs.scalars(physics.physical(obs, store.variable("train", variable)[:2])))


def sweep(experiment: str, overrides: list[str], grid: list[str], tasks: list[str],
          name: str | None = None, parallel: int | None = None, stages: list[str] | None = None,
          rank_by: str | None = None) -> dict[str, Any]:
    """Validate every task's config, then submit the array and its summary job."""
    task_overrides = expand(grid, tasks)  # a malformed --grid/--task is named before anything
    for t in task_overrides:
        parse_overrides(t)
    stages = sweep_stages(stages)
    rank = RankBy.parse(rank_by) if rank_by is not None else None
    base = resolved(experiment, overrides)
    check_rank_by(rank, stages, base.data.path, base.data.inputs["x"])
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
    jobs = [_task(experiment, overrides, t, i, sweep_dir, base, name, "evaluate" in stages)
            for i, t in enumerate(task_overrides)]
    validate(base.cluster, backend)
    return _submit_array(base, backend, jobs, task_overrides, name, sweep_dir,
                         {"experiment": experiment, "overrides": overrides, "stages": stages,
                          "rank_by": rank.to_dict() if rank else None})


def _task(experiment: str, overrides: list[str], extra: list[str], i: int, sweep_dir: Path, base,
          group: str, evaluate: bool) -> TrainJob:
    fixed = [f"output_dir={sweep_dir / str(i)}", f"data.path={base.data.path}",
             f"train.logger.group={group}", f"cluster.jobs_dir={base.cluster.jobs_dir}"]
    argv = [*overrides, *extra, *fixed]
    cfg = resolved(experiment, argv)  # a bad key in any task fails here, before submitting
    slurm_ranks(cfg, "slurm")
    return TrainJob(cfg, ["-e", experiment, *argv], base.cluster.max_requeues, evaluate)


def _submit_array(base, backend: str, jobs: list[TrainJob], task_overrides: list[list[str]],
                  name: str, sweep_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    with private_files():  # the tasks' scripts and pickles hold cluster.setup's secrets
        return _submit_array_files(base, backend, jobs, task_overrides, name, sweep_dir, extra)


def _submit_array_files(base, backend: str, jobs: list[TrainJob], task_overrides: list[list[str]],
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
    evaluation = Path(task["output_dir"]) / "train" / "checkpoints" / "final.eval.json"
    if evaluation.is_file():  # --stages train,evaluate
        metrics = json.loads(evaluation.read_text())["metrics"]
        row.update({f"eval/{k}": v for k, v in metrics.items() if _number(v)})
    return row


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def rank_rows(rows: list[dict[str, Any]], rank: RankBy) -> tuple[list[dict[str, Any]], str]:
    """The rows best first by `rank.metric`, numbered from 1 in a `rank` column; tasks without
    the metric (failed, or NaN) follow unranked in task order. The metric is looked up as an
    evaluation column (eval/<metric>) first, then as a training column of that name. Returns the
    rows and a line saying what decided the order."""
    column = next((c for c in (f"eval/{rank.metric}", rank.metric)
                   if any(_number(r.get(c)) for r in rows)), None)
    if column is None:
        return rows, (f"rank-by {rank.metric}: no task has this metric; rows in task order "
                      f"(columns: {', '.join(dict.fromkeys(k for r in rows for k in r))})")
    ranked = sorted((r for r in rows if _number(r.get(column))), key=lambda r: r[column],
                    reverse=rank.higher_is_better)
    unranked = [r for r in rows if not _number(r.get(column))]
    out = [{"rank": i, **r} for i, r in enumerate(ranked, 1)] + [{"rank": None, **r} for r in unranked]
    best = "highest" if rank.higher_is_better else "lowest"
    return out, (f"ranked by {column}, {best} first; best: task {out[0]['job_id']} "
                 f"({out[0]['overrides']}) = {out[0][column]:.4g}")


def write_table(rows: list[dict[str, Any]], out: Path, extra: dict[str, Any] | None = None) -> list[str]:
    """summary.json (with `extra`), summary.csv and summary.md; returns the columns."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    out.mkdir(parents=True, exist_ok=True)
    records.write_json(out / "summary.json", {"columns": columns, "rows": rows, **(extra or {})})
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    if extra and extra.get("ranking"):
        md += ["", extra["ranking"]]
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
        extra: dict[str, Any] = {}
        if rec.get("rank_by"):
            rank = RankBy(rec["rank_by"]["metric"], rec["rank_by"]["direction"] == "max")
            rows, extra["ranking"] = rank_rows(rows, rank)
            extra["rank_by"] = rec["rank_by"]
        out = Path(rec["sweep_dir"])
        columns = write_table(rows, out, extra)
        run_path = self._log_wandb(columns, rows, out)
        print(f"[hpcforge] sweep {rec['name']}: {len(rows)} tasks, summary {out / 'summary.md'}"
              f"{', W&B ' + run_path if run_path else ''}", flush=True)
        if "ranking" in extra:
            print(f"[hpcforge] {extra['ranking']}", flush=True)
        print((out / "summary.md").read_text(), flush=True)
        return {"rows": rows, "summary": str(out / "summary.json"), "wandb_run": run_path}

    def _log_wandb(self, columns: list[str], rows: list[dict[str, Any]], out: Path) -> str | None:
        from pipeline.runtime.tracking import own_service, resolve_mode
        mode = resolve_mode(self.logger.mode)  # auto: online with an API key, else offline
        if mode == "disabled":
            return None
        import wandb
        own_service()
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
