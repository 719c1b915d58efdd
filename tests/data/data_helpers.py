"""Helpers for the data tests (a module of its own: `conftest` names clash across test folders)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.config import load_config


def import_config(tmp: Path, source: str, path: Path | str, *extra: str, address: str | None = None):
    """A config importing `path` (variables field, label) into tmp/data/<source>.zarr."""
    join = [f"data.dask.scheduler={address}"] if address else []
    return load_config("demo", [
        f"output_dir={tmp}", "data=import_netcdf", f"data.source={source}",
        f"data.params.path={path}", "data.params.variables=[field]", "data.params.labels=[label]",
        "data.params.sample_axis=0", "data.params.dtypes={}", "data.inputs={x: field}",
        "data.chunk_size=16", "data.shard_size=32", "data.val_fraction=0.2",
        "data.dask.progress=false", *join, *extra])


def sample_hashes(arrays: dict[str, np.ndarray]) -> list[str]:
    """Sorted per-sample hashes over all variables: equal multisets of samples compare equal."""
    n = len(next(iter(arrays.values())))
    return sorted(hashlib.sha256(b"".join(np.ascontiguousarray(arrays[k][i]).tobytes()
                                          for k in sorted(arrays))).hexdigest() for i in range(n))


def stored(store, splits=("train", "val", "test")) -> dict[str, np.ndarray]:
    """Every split of a store concatenated, per variable."""
    have = [s for s in splits if store.meta.splits[s]]
    return {k: np.concatenate([store.split(s)[k][:] for s in have]) for k in store.split("train")}
