"""The Zarr v3 store layout hpcforge writes, and the only way it is opened for reading.

    <store>.zarr/            root group; attrs["hpcforge"] holds provenance, splits, statistics,
      train/<variable>       per-shard checksums and, written last, "complete": true
      val/<variable>         one array per variable, all sharing the sample axis
      test/<variable>

A store is written under `<store>.zarr.partial` and renamed into place once complete, so a store
at the final path is always whole; readers still check the marker, and refuse stores that lack it.
"""
from __future__ import annotations

import hashlib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.errors import UserError

FORMAT = "hpcforge-zarr"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


PROVENANCE = ("source", "splits", "checksums", "shuffle")   # what a checkpoint records of its data
# absent in the first v1 stores
LATER = ("invalid", "n_read", "content", "memory_budget", "arrays", "classes")


@dataclass(frozen=True)
class StoreMeta:
    """attrs["hpcforge"] of a complete store, typed: the one place its keys are read (issue 17).

    `to_dict()` gives back the attrs as written, keys this version does not know included, so a
    store or checkpoint made by another version keeps what it had."""
    source: str                                   # data.source that made it
    splits: dict[str, int]                        # samples per split (0: none)
    n_samples: int
    shard_size: int                               # samples per shard (outer chunk)
    chunk_size: int                               # samples per generated chunk
    shuffle: dict[str, Any]                       # algorithm, seed, Dask tasks of the shuffle
    stats: dict[str, dict[str, dict[str, Any]]]   # split -> variable -> min/max/mean/std
    checksums: dict[str, str]                     # "<split>/<shard>" -> sha256 (shard_checksum)
    config: dict[str, Any]                        # the resolved config, redacted
    versions: dict[str, str]
    created: str
    seconds: float                                # wall time of the prepare
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    complete: bool = False
    # written since importers came (stores of the first v1 version lack them: None)
    invalid: dict[str, Any] | None = None         # NaN/Inf policy and what it found per variable
    n_read: int | None = None                     # samples read from the source, before drops
    content: dict[str, Any] | None = None         # the config keys that decide the content
    memory_budget: str | None = None
    arrays: bool | None = None
    classes: dict[str, int] | None = None         # class name -> label of data.params.label_from
    extra: dict[str, Any] = field(default_factory=dict)   # keys this version does not know

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: Path | str = "store") -> "StoreMeta":
        known = {f.name for f in fields(cls)} - {"extra"}
        missing = [f.name for f in fields(cls) if f.default is MISSING
                   and f.default_factory is MISSING and f.name not in attrs]
        if missing:
            raise UserError(f"{where}: its metadata (attrs['hpcforge']) lacks {', '.join(missing)}; "
                            f"prepare it again with `hpcforge prepare` and data.overwrite=true")
        return cls(**{k: v for k, v in attrs.items() if k in known},
                   extra={k: v for k, v in attrs.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        """The attrs as written (keys of later versions that this store lacks left out)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if not (k in LATER and v is None)}, **self.extra}

    def provenance(self) -> dict[str, Any]:
        """What a checkpoint records of the data it was trained on (its `dataset` entry)."""
        return {k: getattr(self, k) for k in PROVENANCE}


@dataclass
class Store:
    path: Path
    root: zarr.Group
    meta: StoreMeta

    def split(self, name: str) -> dict[str, zarr.Array]:
        if self.meta.splits.get(name, 0) == 0:
            have = [s for s, n in self.meta.splits.items() if n]
            raise UserError(f"{self.path}: split {name!r} is empty or absent; it has {have}. "
                            f"Set data.val_fraction / data.test_fraction and prepare again")
        group = self.root[name]
        return {k: group[k] for k in sorted(group.array_keys())}

    def variable(self, split: str, name: str) -> zarr.Array:
        arrays = self.split(split)
        if name not in arrays:
            raise UserError(f"{self.path}: no variable {name!r} in {split}; it has "
                            f"{', '.join(arrays)}. Fix data.inputs in the config")
        return arrays[name]

    def stats(self, split: str, name: str | list[str]) -> dict[str, Any]:
        """A variable's statistics; for several (a joined input), each one's per-channel values
        one after another."""
        if isinstance(name, str):
            return self.meta.stats[split][name]
        parts = [self.meta.stats[split][n] for n in name]
        return {k: np.concatenate([np.ravel(p[k]) for p in parts]).tolist()
                for k in ("mean", "std", "min", "max")}


def open_store(path: str | Path) -> Store:
    """Open a complete hpcforge store, or raise a UserError that says how to get one."""
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        hint = (f" (an interrupted prepare left {partial}; run `hpcforge prepare` again to finish it)"
                if partial.exists() else "; run `hpcforge prepare` with the same config first")
        raise UserError(f"no dataset at {path}{hint}")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as e:  # not a Zarr group at all
        raise UserError(f"{path} is not a Zarr v3 group ({type(e).__name__}: {e}); "
                        f"point data.path at a store written by `hpcforge prepare`") from None
    meta = dict(root.attrs).get("hpcforge")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} was not written by hpcforge (no attrs['hpcforge'] with format "
                        f"{FORMAT!r}); import it with `hpcforge prepare` first")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has store format version {meta.get('format_version')}, this "
                        f"hpcforge reads {FORMAT_VERSION}; prepare it again with this version")
    if not meta.get("complete"):
        raise UserError(f"{path} is incomplete (its prepare did not finish); run `hpcforge "
                        f"prepare` again with data.overwrite=true to redo it")
    return Store(path, root, StoreMeta.from_attrs(meta, path))


def normalization(stats: dict[str, Any], how: str) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) per channel of `data.normalize` from a variable's stored train statistics:
    normalised = (x - shift) / scale. minmax maps to [0, 1], standard to zero mean and unit std."""
    if how == "none":
        return np.zeros(1), np.ones(1)
    if how == "minmax":
        lo, hi = np.asarray(stats["min"], np.float64), np.asarray(stats["max"], np.float64)
        return lo, np.where(hi > lo, hi - lo, 1.0)
    std = np.asarray(stats["std"], np.float64)
    return np.asarray(stats["mean"], np.float64), np.where(std > 0, std, 1.0)


def shard_checksum(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over each variable's bytes, in name order: equal stores give equal checksums."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()
