"""train.profile (issue 28, point 3): where each rank's step time goes, from real short runs, and
a torch.profiler trace that Perfetto and chrome://tracing open (Chrome trace JSON)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import hpcforge

from pipeline.analysis.report import report
from pipeline.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.runtime.dist import init_distributed
from pipeline.train.assembly import build
from pipeline.train.loop import fit
from pipeline.train.profile import PARTS

LOG_EVERY = 4


def _run(store, out: Path, *extra: str) -> list[dict]:
    path, overrides = store
    cfg = load_config("demo", overrides[1:] + [
        f"output_dir={out}", f"data.path={path}", "train.dist.backend=none", "train.batch_size=32",
        "train.logger.mode=disabled", f"train.logger.log_every={LOG_EVERY}",
        "train.logger.images_every=0", "train.max_steps=12", "train.threads=1", *extra])
    fit(build(cfg, init_distributed(cfg.train.dist)))
    return [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]


def _check_shares(row: dict, prefix: str) -> None:
    shares = {k: row[f"{prefix}{k}"] for k in (*PARTS, "other")}
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(v >= 0 for k, v in shares.items() if k != "other"), shares
    # the parts are disjoint and cover the step: what none of them holds is small, never negative
    assert -0.01 <= shares["other"] <= 0.25, shares
    assert shares["forward"] > 0.05 and shares["backward"] > 0.05 and shares["optimizer"] > 0


def test_profile_steps_logs_the_share_of_each_part_of_the_step(small_store, tmp_path):
    rows = [r for r in _run(small_store, tmp_path, "train.profile=steps") if "profile/forward" in r]
    assert [r["step"] for r in rows] == [4, 8, 12]
    for row in rows:
        _check_shares(row, "profile/")
        _check_shares(row, "profile/rank0/")
    assert not (tmp_path / "train" / "profile").exists()  # no trace asked for
    page = report([tmp_path], tmp_path / "report.html").read_text()
    assert "Where step time went" in page  # the report's figure of the shares


def test_profile_off_by_default_logs_and_writes_nothing(small_store, tmp_path):
    rows = _run(small_store, tmp_path)
    assert rows and not any(k.startswith("profile/") for r in rows for k in r)
    assert not (tmp_path / "train" / "profile").exists()
    assert "Where step time went" not in report([tmp_path], tmp_path / "r.html").read_text()


def test_profile_trace_writes_chrome_trace_json_of_the_chosen_steps(small_store, tmp_path):
    rows = _run(small_store, tmp_path, "train.profile=trace", "train.profile_steps=[5,2]")
    assert any("profile/backward" in r for r in rows)  # the shares too
    trace = json.loads((tmp_path / "train" / "profile" / "trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    # torch numbers profiler steps from 0: steps 5 and 6 of the run, and only those
    assert {n for n in names if str(n).startswith("ProfilerStep#")} == {"ProfilerStep#4",
                                                                      "ProfilerStep#5"}
    assert {"forward", "backward", "optimizer", "logging"} <= names
    assert any(str(n).startswith("aten::") for n in names)  # torch's own ops inside them


def test_profile_steps_needs_a_first_step_and_a_count(small_store, tmp_path):
    with pytest.raises(ConfigError, match=r"train.profile_steps=\[5\]: expected two numbers"):
        load_config("demo", ["train.profile=trace", "train.profile_steps=[5]"])


@pytest.mark.mpi
@pytest.mark.slow
def test_two_ranks_each_log_their_own_shares_with_the_allreduce_wait(small_store, tmp_path):
    path, overrides = small_store
    r = hpcforge("train", *overrides[1:], f"output_dir={tmp_path}", f"data.path={path}",
                 "train.dist.backend=horovod", "--nproc", "2", "train.batch_size=32",
                 "train.logger.mode=disabled", f"train.logger.log_every={LOG_EVERY}",
                 "train.logger.images_every=0", "train.max_steps=8", "train.profile=steps",
                 "train.threads=1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text()
            .splitlines()]
    rows = [r for r in rows if "profile/forward" in r]
    assert [r["step"] for r in rows] == [4, 8]
    for row in rows:
        for rank in (0, 1):
            _check_shares(row, f"profile/rank{rank}/")
        assert row["profile/allreduce"] == pytest.approx(
            (row["profile/rank0/allreduce"] + row["profile/rank1/allreduce"]) / 2)
