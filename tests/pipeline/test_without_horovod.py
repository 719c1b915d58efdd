"""Horovod optional at run time (issue 26, point 3). Horovod is hidden for real: a package named
`horovod` first on PYTHONPATH (so in every rank mpirun starts too) whose import fails, as a missing
or broken build does, and which notes each attempt in a file. Then `train.dist.backend=horovod`
refuses in one line naming ddp before any rank starts, and the demo trains on 2 ddp ranks without
ever trying Horovod."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, hpcforge, small

SHIM = """import os
with open({tried!r}, "a") as f:
    f.write(f"{{os.getpid()}}\\n")
raise ImportError("horovod hidden by tests/pipeline/test_without_horovod.py")
"""


@pytest.fixture
def no_horovod(tmp_path) -> tuple[dict[str, str], Path]:
    """(the environment that hides Horovod, the file each import attempt writes its pid to)."""
    shim, tried = tmp_path / "hide" / "horovod", tmp_path / "horovod-tried.txt"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(SHIM.format(tried=str(tried)))
    env = {"PYTHONPATH": os.pathsep.join([str(shim.parent), str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", "import horovod.torch"], env={**os.environ, **env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "hidden by" in r.stderr, r.stderr   # the shim works
    tried.unlink()
    return env, tried


def test_the_horovod_backend_refuses_in_one_line_naming_ddp_before_any_rank(no_horovod, tmp_path):
    env, tried = no_horovod
    r = hpcforge("train", "-e", "demo", *small(tmp_path / "out"), "train.dist.backend=horovod",
                 env=env)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("hpcforge: error: train.dist.backend=horovod"), lines[0]
    assert "hidden by" in lines[0] and "train.dist.backend=ddp" in lines[0], lines[0]
    # refused by the command itself, before any rank (or the check of the data) started
    assert len(tried.read_text().split()) == 1   # one process tried Horovod: the command's
    assert not (tmp_path / "out").exists()


@pytest.mark.mpi
@pytest.mark.slow   # ~25 s: two ranks start, train an epoch and write W&B files
def test_the_demo_trains_on_two_ddp_ranks_without_horovod(no_horovod, small_store, tmp_path):
    env, tried = no_horovod
    store, overrides = small_store
    r = hpcforge("train", "-e", "demo", *overrides[1:], f"output_dir={tmp_path}",
                 f"data.path={store}", "train.dist.backend=ddp", "train.epochs=1", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] > 0
    assert len(set(summary["weights_sha256_per_rank"])) == 1   # the ranks agree
    assert not tried.exists(), "a rank tried to import horovod on the ddp backend"
