"""`hpcforge bench` runs a real 2-rank allreduce comparison and writes one JSON table."""
from __future__ import annotations

import json

import pytest

from helpers import hpcforge


@pytest.mark.mpi
@pytest.mark.slow
def test_bench_quick_writes_ratio_table(tmp_path):
    out = tmp_path / "bench.json"
    r = hpcforge("bench", "--quick", "--only", "allreduce", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.loads(out.read_text())
    rows = table["results"]
    assert [row["case"] for row in rows] == ["1 MB x 2 ranks", "16 MB x 2 ranks", "64 MB x 2 ranks"]
    for row in rows:
        assert row["value"] > 0 and row["baseline"] > 0
        assert row["ratio"] == pytest.approx(row["value"] / row["baseline"], rel=0.01)
    assert table["environment"]["cores"] >= 1
    assert table["environment"]["versions"]["horovod"] == "0.28.1"
    assert "ratio" in r.stdout and "cores=" in r.stdout


def test_bench_refuses_an_unknown_benchmark_name():
    r = hpcforge("bench", "--only", "allreduce,nope")
    assert r.returncode == 2
    assert "bench --only nope: no such benchmark; choose from allreduce, trainer" in r.stderr


def test_bench_attention_is_a_row_of_the_table(tmp_path):
    """The SDPA study (benchmarks/attention.py) runs through `hpcforge bench` like the others."""
    out = tmp_path / "bench.json"
    r = hpcforge("bench", "--quick", "--only", "attention", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    [row] = json.loads(out.read_text())["results"]
    assert row["benchmark"] == "attention" and row["value"] > 0 and row["baseline"] > 0
    assert row["ratio"] == pytest.approx(row["value"] / row["baseline"], rel=0.05)  # 1 round


def test_bench_rows_of_profile_off_and_the_scaling_model(monkeypatch):
    """The trainer benchmark's two issue-28 rows from given measurements (the real model and
    timer; the all-reduce rows stand in for benchmarks/allreduce.py's 2-rank job)."""
    from benchmarks import run
    row = run._profile_off_row(250.0)  # a 4 ms step
    assert row["benchmark"] == "profile-off" and 0 < row["value"] < 100 and row["baseline"] == 4000
    mb = 2 ** 20
    rows = [{"case": f"{n} MB x 2 ranks", "baseline": n / (2 * 50e-6 + n * mb / 2e9)}
            for n in (1, 16, 64)]
    monkeypatch.setattr(run, "bench_allreduce", lambda quick: rows)
    row = run._scaling_model_row(True, one_rank_samples_s=600.0, measured=1.59)
    assert row["benchmark"] == "scaling-model" and row["baseline"] == 1.59
    assert 1.9 < row["value"] <= 2.0  # 0.7 MB of ResNet gradients against a 53 ms step


def test_ddp_vs_horovod_is_the_median_of_pairs_run_back_to_back_in_alternating_order(monkeypatch):
    """The row pairs one ddp and one Horovod job at a time, alternating which runs first, and
    takes the median of the pairs' ratios (the 2-rank jobs stand in for benchmarks/trainer.py)."""
    from benchmarks import run
    calls, speeds = [], iter([90.0, 100.0, 110.0, 100.0, 100.0, 80.0, 95.0, 100.0])
    monkeypatch.setattr(run, "_mpi_json", lambda n, module, args: calls.append((n, args)) or
                        {"steps_per_s": next(speeds)})
    got = run._ddp_vs_horovod("STORE", "resnet", "ResNet 16x16", "300", pairs=4)
    assert [args[2] for _, args in calls] == ["ddp", "horovod", "horovod", "ddp"] * 2
    assert all(n == 2 and args == ["trainer", "STORE", args[2], "300", "resnet"]
               for n, args in calls)
    # pairs: ddp/hvd = 90/100, 100/110, 100/80, 100/95 -> ratios 0.9, 0.909, 1.25, 1.053
    assert got["ratio"] == pytest.approx((0.90909 + 1.05263) / 2, rel=1e-3)
    assert got["case"] == "ResNet 16x16, 2 ranks" and got["target"] == ">= 1.0"
