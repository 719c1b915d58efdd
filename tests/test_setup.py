"""The one-command setup: idempotent, and the Horovod it built has PyTorch, MPI and Gloo."""
from __future__ import annotations

import subprocess

from helpers import ROOT


def _setup() -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def test_second_setup_reuses_everything():
    assert _setup().returncode == 0   # a no-op under `make test`, which has just set up
    r = _setup()
    assert r.returncode == 0, r.stderr
    assert "installing" not in r.stderr and "building" not in r.stderr   # nothing redone


def test_horovod_check_build_lists_pytorch_mpi_gloo():
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "horovodrun"), "--check-build"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for line in ("[X] PyTorch", "[X] MPI", "[X] Gloo"):
        assert line in r.stdout, r.stdout
