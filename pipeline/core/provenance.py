"""What produced an output: package versions and the code's git revision.

Stored with stores, checkpoints, W&B runs, job records and benchmark tables.
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # pipeline/core/ -> the checkout
PACKAGES = ("hpcforge", "torch", "horovod", "numpy", "zarr", "dask", "wandb")


def versions() -> dict[str, str]:
    """Installed versions (from package metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def git_revision() -> str:
    """HEAD's commit, with `-dirty` when the work tree has changes; 'unknown' outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=30).stdout.strip()
    try:
        rev = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + ("-dirty" if dirty else "")) if rev else "unknown"
