"""Shared fixtures: a small real Ising dataset prepared once by a real Dask LocalCluster."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")

# Small but real: 16x16 lattices, short burn-in; 640 samples in 10 generation tasks, 4 shards.
SMALL = ["data.params.lattice=16", "data.params.burn_in=40", "data.params.decorrelation=4",
         "data.n_samples=640", "data.chunk_size=64", "data.shard_size=128",
         "data.dask.n_workers=2", "data.dask.progress=false", "model.image_size=16"]


def small(tmp: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp}", *SMALL, *extra]


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> tuple[Path, list[str]]:
    """(store path, overrides that reproduce it) for a prepared small dataset."""
    from pipeline.config import load_config
    from pipeline.data.prepare import prepare

    out = tmp_path_factory.mktemp("small")
    overrides = small(out)
    cfg = load_config("demo", overrides)
    return prepare(cfg.data, cfg.to_dict(), log=lambda *a: None), overrides


def hpcforge(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
