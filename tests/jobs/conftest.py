"""A real Slurm cluster for tests/jobs: two fake nodes (n1, n2) with accounting, started once per
session by scripts/slurm_cluster.py (apt-installs Debian's Slurm if missing) and stopped by pid.

Tests that need Slurm's commands but no running cluster (submitit refuses to build a Slurm executor
without `srun` on PATH) ask for `slurm_commands`, which only installs the packages: a fresh machine
passes them whichever test runs first.

Set HPCFORGE_SLURM_CONF=<slurm.conf of a cluster you started with `scripts/slurm_cluster.py up`>
to reuse it while iterating; the session then leaves it running.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cluster_module():
    spec = importlib.util.spec_from_file_location("hpcforge_slurm_cluster",
                                                  ROOT / "scripts" / "slurm_cluster.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while being defined
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def slurm_commands() -> str:
    """Path of `srun`, after apt-installing Debian's Slurm packages if any is missing (~15 s once)."""
    _cluster_module().install()
    missing = [c for c in ("srun", "sbatch", "scontrol", "sacct") if shutil.which(c) is None]
    assert not missing, f"Slurm's packages are installed but {missing} are not on PATH"
    return shutil.which("srun")


@pytest.fixture(scope="session")
def slurm(slurm_commands):
    """SLURM_CONF of a running two-node cluster, set in os.environ for submitit and the CLI."""
    before = os.environ.get("SLURM_CONF")
    reuse = os.environ.get("HPCFORGE_SLURM_CONF")
    cluster, root = None, None
    if reuse:
        os.environ["SLURM_CONF"] = reuse
        assert subprocess.run(["scontrol", "ping"], capture_output=True).returncode == 0, \
            f"HPCFORGE_SLURM_CONF={reuse}: its slurmctld does not answer"
    else:
        root = Path(tempfile.mkdtemp(prefix="hpcforge-slurm-"))
        cluster = _cluster_module().Cluster(root)
        os.environ.update(cluster.up())
    yield os.environ["SLURM_CONF"]
    if cluster is not None:
        cluster.down()
        shutil.rmtree(root, ignore_errors=True)
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before


@pytest.fixture
def jobs_dir(tmp_path) -> Path:
    """A fresh submitit folder per test."""
    return tmp_path / "jobs"


@pytest.fixture
def cli():
    """Run the real `hpcforge` CLI in a subprocess (environment included: SLURM_CONF)."""
    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hpcforge", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    return run


@pytest.fixture
def submit(cli):
    """`hpcforge submit ... --json` -> the submitted jobs, failing the test on a non-zero exit."""
    def run(*args: str) -> list[dict]:
        r = cli("submit", *args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])
    return run


def sacct_state(job_id: str) -> str:
    from jobs.records import sacct
    rows = [r for r in sacct(job_id) if r["JobID"] == job_id]
    return rows[0]["State"] if rows else "PENDING"


def wait_state(job_id: str, states: set[str], timeout: float = 240) -> str:
    """Poll Slurm's accounting until the job reaches one of `states`."""
    t0, state = time.monotonic(), "?"
    while time.monotonic() - t0 < timeout:
        state = sacct_state(job_id)
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {state} after {timeout} s (wanted {states})")


@pytest.fixture
def slurm_tools():
    """Waiting helpers as a fixture (test modules here import nothing from conftest files)."""
    from jobs.records import scontrol_job

    class Tools:
        state = staticmethod(sacct_state)
        wait = staticmethod(wait_state)
        show = staticmethod(scontrol_job)
    return Tools
