"""Shared fixtures: a small real Ising dataset prepared once by a real Dask LocalCluster.

Helper functions live in tests/helpers.py (`from helpers import ...`), not here: sub-folders have
conftest.py files of their own and only one module can be imported as `conftest`.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from helpers import small, tmpfs


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> tuple[Path, list[str]]:
    """(store path, overrides that reproduce it) for a prepared small dataset."""
    from pipeline.config import load_config
    from pipeline.data.prepare import prepare

    out = tmp_path_factory.mktemp("small")
    overrides = small(out)
    cfg = load_config("demo", overrides)
    return prepare(cfg.data, cfg.to_dict(), log=lambda *a: None), overrides


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A real 8 MiB filesystem of its own, for full-disk faults."""
    with tmpfs(tmp_path / "disk", "size=8m") as disk:
        yield disk
