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
