"""Shared fixtures: a small real Ising dataset prepared once by a real Dask LocalCluster.

Helper functions live in tests/helpers.py (`from helpers import ...`), not here: sub-folders have
conftest.py files of their own and only one module can be imported as `conftest`.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

from helpers import small, tmpfs, wandb_cores


@pytest.fixture(scope="session")
def small_store(tmp_path_factory) -> tuple[Path, list[str]]:
    """(store path, overrides that reproduce it) for a prepared small dataset."""
    from pipeline.config import load_config
    from pipeline.data.prepare import prepare

    out = tmp_path_factory.mktemp("small")
    overrides = small(out)
    cfg = load_config("demo", overrides)
    return prepare(cfg.data, cfg.to_dict(), log=lambda *a: None), overrides


@pytest.fixture(autouse=True)
def _no_wandb_service_outlives_its_test():
    """A test that starts W&B in this process (a `Tracker`) starts wandb's service, a `wandb-core`
    child, and wandb leaves its address in os.environ["WANDB_SERVICE"] for child processes to
    share. A later test's `hpcforge` would inherit it and, before hpcforge dropped an inherited
    address, logged through this process's service: its run was not over when its process exited
    (CI saw a finished run's debug-core.log grow a second later, in the middle of a "touches
    nothing" check). Stop that service after the test, and restore the variable."""
    before = os.environ.get("WANDB_SERVICE")
    yield
    if "wandb" in sys.modules and wandb_cores():
        with contextlib.suppress(Exception, SystemExit):
            sys.modules["wandb"].teardown()
    if before is None:
        os.environ.pop("WANDB_SERVICE", None)
    else:
        os.environ["WANDB_SERVICE"] = before


@pytest.fixture
def small_disk(tmp_path) -> Path:
    """A real 8 MiB filesystem of its own, for full-disk faults."""
    with tmpfs(tmp_path / "disk", "size=8m") as disk:
        yield disk
