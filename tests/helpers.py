"""Helpers shared by the test modules (importable as `helpers`: pytest puts tests/ on sys.path).

Kept out of conftest.py because several test folders have a conftest.py of their own, and only one
module can be imported under the name `conftest`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests write offline runs only, never upload
os.environ.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")

# Small but real: 16x16 lattices, short burn-in; 640 samples in 10 generation tasks, 4 shards.
SMALL = ["data.params.lattice=16", "data.params.burn_in=40", "data.params.decorrelation=4",
         "data.n_samples=640", "data.chunk_size=64", "data.shard_size=128",
         "data.dask.n_workers=2", "data.dask.progress=false", "model.image_size=16"]


def small(tmp: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp}", *SMALL, *extra]


def hpcforge(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
