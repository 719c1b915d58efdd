"""`make gpu-check` (issue 26): on a machine without a GPU (this one) it says so in one line and
exits 0. Its GPU rows run only on a GPU node (benchmarks/gpu_check.py)."""
from __future__ import annotations

import os
import subprocess

from helpers import ROOT


def test_gpu_check_on_a_cpu_machine_says_in_one_line_that_it_needs_a_gpu():
    # run as a user types it: under `make test` the inherited MAKELEVEL would make this sub-make
    # print "make[1]: Entering directory" lines on stdout
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    r = subprocess.run(["make", "gpu-check"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    line, = r.stdout.strip().splitlines()
    assert line.startswith("gpu-check: needs a CUDA GPU; torch 2.13.0") and "GPU node" in line, line
    assert not (ROOT / "outputs" / "gpu-check").exists()
