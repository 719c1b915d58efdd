"""Sweeps that select (issue 15): `--stages train,evaluate` and `--rank-by` on a real Slurm cluster,
the refusals at submit time, and the ranking rule itself."""
from __future__ import annotations

import json
import math

import pytest

from jobs.sweep import RankBy, rank_rows
from pipeline.core.errors import UserError


def _args(small_store, tmp_path, *extra: str) -> list[str]:
    store, overrides = small_store
    return [*[o for o in overrides[1:] if not o.startswith("model.")], f"data.path={store}",
            f"output_dir={tmp_path}", "cluster=local_slurm", f"cluster.jobs_dir={tmp_path / 'jobs'}",
            *extra]


@pytest.mark.slow
def test_sweep_evaluates_each_task_and_ranks_the_summary_by_an_evaluation_metric(
        slurm, small_store, tmp_path, cli, slurm_tools):
    args = _args(small_store, tmp_path, "model=dcgan", "model.image_size=16",
                 "model.channels=[32,16]", "train.epochs=1", "train.batch_size=32",
                 "train.logger.mode=offline")
    r = cli("sweep", *args, "--grid", "train.seed=0,1", "--stages", "train,evaluate",
            "--rank-by", "w1/energy", "--name", "select", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["stages"] == ["train", "evaluate"] and rec["rank_by"] == {"metric": "w1/energy",
                                                                        "direction": "min"}
    assert slurm_tools.wait(rec["summary_job"], {"COMPLETED", "FAILED", "CANCELLED"},
                            timeout=500) == "COMPLETED"
    out = tmp_path / "sweeps" / "select"
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert all(row["state"] == "COMPLETED" for row in rows), rows
    # Each task's own evaluate output, in its row beside the losses.
    for row in rows:
        task = next(t for t in rec["tasks"] if t["job_id"] == row["job_id"])
        written = json.loads((tmp_path / "sweeps" / "select" / task["output_dir"].rsplit("/", 1)[-1]
                              / "train" / "checkpoints" / "final.eval.json").read_text())["metrics"]
        assert row["eval/w1/energy"] == written["w1/energy"]
        assert 0.0 <= row["eval/classifier/auc"] <= 1.0
        assert any(k.startswith("val/") for k in row)
    values = [row["eval/w1/energy"] for row in rows]
    assert values == sorted(values) and [row["rank"] for row in rows] == [1, 2]
    assert summary["rank_by"]["metric"] == "w1/energy" and rows[0]["job_id"] in summary["ranking"]
    assert summary["columns"][0] == "rank" and "ranked by eval/w1/energy" in (out / "summary.md").read_text()
    [table] = list(out.rglob("*.table.json"))
    logged = json.loads(table.read_text())
    assert [r[logged["columns"].index("rank")] for r in logged["data"]] == [1, 2]


@pytest.mark.parametrize("extra, expected", [
    (["--stages", "train,evaluate", "--rank-by", "w1/energi"],
     "--rank-by w1/energi: evaluate writes no such W1 metric for this store; valid: w1/magnetization, "
     "w1/abs_magnetization, w1/energy"),
    (["--rank-by", "classifier/auc"],
     "--rank-by classifier/auc: an evaluation metric, but the sweep's stages are train; add "
     "--stages train,evaluate"),
    (["--rank-by", "precise/model/w1_ratio/abs_magnetization"],   # issue #23's ranking metric
     "--rank-by precise/model/w1_ratio/abs_magnetization: an evaluation metric, but the sweep's "
     "stages are train; add --stages train,evaluate"),
    (["--rank-by", "best:w1/energy"], "expected METRIC, min:METRIC or max:METRIC"),
    (["--stages", "prepare,train"], "expected train or train,evaluate"),
])
def test_sweep_refuses_what_it_can_know_at_submit_time(small_store, tmp_path, cli, extra, expected):
    r = cli("sweep", *_args(small_store, tmp_path), "--grid", "train.seed=0,1", *extra)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("hpcforge: error: ") and expected in r.stderr, r.stderr
    assert not (tmp_path / "jobs").exists()  # nothing submitted


def test_rank_rows_orders_by_direction_and_leaves_tasks_without_the_metric_last():
    rows = [{"job_id": "1_0", "overrides": "a", "eval/accuracy": 0.7},
            {"job_id": "1_1", "overrides": "b"},                       # failed: no metrics
            {"job_id": "1_2", "overrides": "c", "eval/accuracy": 0.9},
            {"job_id": "1_3", "overrides": "d", "eval/accuracy": math.nan}]
    best_first, line = rank_rows(rows, RankBy.parse("max:accuracy"))
    assert [(r["rank"], r["job_id"]) for r in best_first] == [(1, "1_2"), (2, "1_0"), (None, "1_1"),
                                                              (None, "1_3")]
    assert line == "ranked by eval/accuracy, highest first; best: task 1_2 (c) = 0.9"
    lowest, _ = rank_rows(rows, RankBy.parse("min:accuracy"))
    assert [r["job_id"] for r in lowest][:2] == ["1_0", "1_2"]
    # A training column when no evaluation has the name; the summary says when none has it.
    by_loss, _ = rank_rows([{"job_id": "0", "overrides": "", "val/loss": 2.0},
                            {"job_id": "1", "overrides": "", "val/loss": 1.0}], RankBy.parse("val/loss"))
    assert [r["job_id"] for r in by_loss] == ["1", "0"]
    same, line = rank_rows(rows, RankBy.parse("w1/energy"))
    assert same == rows and line.startswith("rank-by w1/energy: no task has this metric")
    with pytest.raises(UserError, match="expected METRIC, min:METRIC or max:METRIC"):
        RankBy.parse("max:")
