"""Issue 25: a secret a job needs (cluster.setup's `export WANDB_API_KEY=...`) is in submitit's
submission script and pickle; nobody but the owner may read those files or list their folder."""
from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from helpers import files_holding

pytestmark = pytest.mark.slow  # the session's Slurm cluster (~15 s to start, shared)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_carrying_a_secret_are_private_to_their_owner(slurm, small_store, tmp_path):
    from jobs.submit import submit
    store, overrides = small_store
    jobs_dir, secret = tmp_path / "jobs", "wandb-s3cr3t-2525"
    # Held for an hour (sbatch --begin): nothing runs, the test sees what submission wrote.
    [job] = submit("demo", [*overrides[1:], f"data.path={store}", f"output_dir={tmp_path / 'run'}",
                            "cluster=local_slurm", f"cluster.jobs_dir={jobs_dir}",
                            f"cluster.setup=[export WANDB_API_KEY={secret}]",
                            "cluster.sbatch_extra.begin=now+3600"])
    try:
        holders = [h.split(":")[0] for h in files_holding(jobs_dir, [secret])]
        names = sorted(Path(h).name for h in holders)
        assert any(n.endswith("_submission.sh") for n in names), names  # the job needs it
        assert any(n.endswith("_submitted.pkl") for n in names), names
        for path in [jobs_dir, *jobs_dir.rglob("*")]:
            want = 0o700 if path.is_dir() else 0o600
            assert _mode(path) & 0o077 == 0, f"{path}: mode {oct(_mode(path))}"
            if path.is_dir() or str(path.relative_to(jobs_dir)) in holders:
                assert _mode(path) == want, f"{path}: mode {oct(_mode(path))}, expected {oct(want)}"
    finally:
        subprocess.run(["scancel", job.job_id], capture_output=True, timeout=60)
