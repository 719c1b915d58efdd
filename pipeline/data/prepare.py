"""`hpcforge prepare`: generate (or import) a dataset with Dask, split, globally shuffle, write Zarr.

The shuffle is two passes whose task count grows linearly with the data (n_in + n_out tasks; a
Dask `x[perm]` builds ~2 n^2 tasks for n chunks, see DESIGN.md):
  pass 1, one task per input chunk: generate it, validate it, compute partial statistics, and
          scatter its samples to a scratch folder per destination shard;
  pass 2, one task per output shard: gather that shard's pieces, order them, write the shard once
          and return its checksum.
Peak memory per task is one input chunk or one output shard. The store is written under
`<path>.partial` and renamed into place only after the completion marker is set.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.sources import SOURCES
from pipeline.data.store import FORMAT, FORMAT_VERSION, SPLITS, open_store, shard_checksum
from pipeline.errors import UserError

INNER_CHUNK_BYTES = 1 << 20  # ~1 MiB inner chunks read best (DESIGN.md, zarr reads)


@dataclass(frozen=True)
class Layout:
    """Where each generated sample goes: split sizes, output shards and inner chunks."""
    n_samples: int
    chunk_size: int
    shard_size: int
    splits: dict[str, int]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_samples / self.chunk_size)

    def split_start(self, split: str) -> int:
        return sum(self.splits[s] for s in SPLITS[:SPLITS.index(split)])

    def shards(self) -> list[tuple[str, int, int, int]]:
        """(split, shard index, start, stop) of every output shard, positions within the split."""
        out = []
        for split in SPLITS:
            n = self.splits[split]
            out += [(split, j, a, min(a + self.shard_size, n))
                    for j, a in enumerate(range(0, n, self.shard_size))]
        return out


def make_layout(cfg: DataConfig) -> Layout:
    for name in ("n_samples", "chunk_size", "shard_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"data.{name} = {getattr(cfg, name)}: expected a positive integer")
    fractions = cfg.val_fraction + cfg.test_fraction
    if not (0 <= cfg.val_fraction < 1 and 0 <= cfg.test_fraction < 1 and fractions < 1):
        raise UserError(f"data.val_fraction + data.test_fraction = {fractions}: expected each in "
                        f"[0, 1) and a sum below 1, leaving samples for training")
    n_val = round(cfg.n_samples * cfg.val_fraction)
    n_test = round(cfg.n_samples * cfg.test_fraction)
    return Layout(cfg.n_samples, cfg.chunk_size, cfg.shard_size,
                  {"train": cfg.n_samples - n_val - n_test, "val": n_val, "test": n_test})


def destinations(seed: int, n: int) -> np.ndarray:
    """Output position of every generated sample: a seeded permutation, recorded by its seed.

    Positions [0, n_train) are the train split, then val, then test, so the split and the shuffle
    are one random permutation.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).permutation(n)


# --------------------------------------------------------------------------- pass 1
def _partial_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel sums for one array (n, C, ...) or (n,): combined exactly across chunks."""
    v = values.astype(np.float64)
    axes = (0,) + tuple(range(2, v.ndim)) if v.ndim > 1 else (0,)
    out = {"count": np.array(v.size / (v.shape[1] if v.ndim > 1 else 1)),
           "sum": v.sum(axis=axes), "sumsq": (v * v).sum(axis=axes),
           "min": v.min(axis=axes), "max": v.max(axis=axes)}
    if values.ndim == 1 and values.dtype.kind in "iu":  # a class label: count each class
        classes, counts = np.unique(values, return_counts=True)
        out["classes"] = dict(zip(classes.tolist(), counts.tolist()))
    return out


def _validate(arrays: dict[str, np.ndarray], chunk_index: int, variables: dict) -> None:
    for name, spec in variables.items():
        a = arrays[name]
        if a.dtype != np.dtype(spec.dtype) or a.shape[1:] != tuple(spec.shape):
            raise UserError(f"chunk {chunk_index}: variable {name!r} has {a.dtype}{a.shape[1:]}, "
                            f"expected {spec.dtype}{tuple(spec.shape)}")
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a)
            if bad.any():
                first = np.argwhere(bad)[0].tolist()
                raise UserError(f"chunk {chunk_index}: variable {name!r} has {int(bad.sum())} "
                                f"NaN/Inf values, first at {first}")


def scatter_chunk(cfg: DataConfig, layout: Layout, chunk_index: int, positions: np.ndarray,
                  scratch: str) -> dict[str, Any]:
    """Pass 1: generate one chunk and write its pieces to scratch/<split>/<shard>/<chunk>.npz."""
    source = SOURCES[cfg.source]
    arrays = source.generate(cfg.params, cfg.seed, chunk_index, len(positions))
    _validate(arrays, chunk_index, source.variables(cfg.params))
    stats: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for split in SPLITS:
        start, n = layout.split_start(split), layout.splits[split]
        sel = np.flatnonzero((positions >= start) & (positions < start + n))
        if not len(sel):
            continue
        local = positions[sel] - start
        stats[split] = {k: _partial_stats(v[sel]) for k, v in arrays.items()}
        shard_of = local // layout.shard_size
        for shard in np.unique(shard_of):
            take = sel[shard_of == shard]
            folder = Path(scratch) / split / f"{shard:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{chunk_index:08d}.npz"
            with open(tmp, "wb") as f:
                np.savez(f, __pos__=positions[take] - start, **{k: v[take] for k, v in arrays.items()})
            os.replace(tmp, folder / f"{chunk_index:08d}.npz")
    return stats


# --------------------------------------------------------------------------- pass 2
def write_shard(store_path: str, scratch: str, split: str, shard: int, start: int, stop: int,
                *_after_pass1: Any) -> tuple[str, str]:
    """Pass 2: gather one shard's pieces, order them by position, write it, return its checksum."""
    import zarr

    folder = Path(scratch) / split / f"{shard:06d}"
    pieces = [np.load(p) for p in sorted(folder.glob("*.npz"))]
    pos = np.concatenate([p["__pos__"] for p in pieces])
    order = np.argsort(pos)
    assert np.array_equal(pos[order], np.arange(start, stop)), f"{split}/{shard}: lost samples"
    names = [k for k in pieces[0].files if k != "__pos__"]
    arrays = {k: np.concatenate([p[k] for p in pieces])[order] for k in names}
    group = zarr.open_group(store_path, mode="r+")[split]
    for k, v in arrays.items():
        group[k][start:stop] = v
    shutil.rmtree(folder)
    return f"{split}/{shard}", shard_checksum(arrays)


# --------------------------------------------------------------------------- driver
def _combine(partials: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """Reduce per-chunk sums to per-split, per-variable, per-channel mean/std/min/max."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split in SPLITS:
        parts = [p[split] for p in partials if split in p]
        if not parts:
            continue
        out[split] = {}
        for var in parts[0]:
            count = sum(float(p[var]["count"]) for p in parts)
            s = sum(p[var]["sum"] for p in parts)
            sq = sum(p[var]["sumsq"] for p in parts)
            mean = s / count
            out[split][var] = {
                "count": int(count), "mean": np.atleast_1d(mean).tolist(),
                "std": np.atleast_1d(np.sqrt(np.maximum(sq / count - mean ** 2, 0))).tolist(),
                "min": np.atleast_1d(np.min([p[var]["min"] for p in parts], axis=0)).tolist(),
                "max": np.atleast_1d(np.max([p[var]["max"] for p in parts], axis=0)).tolist()}
            if "classes" in parts[0][var]:
                counts: dict[str, int] = {}
                for p in parts:
                    for c, k in p[var]["classes"].items():
                        counts[str(c)] = counts.get(str(c), 0) + k
                out[split][var]["class_counts"] = dict(sorted(counts.items()))
    return out


def _create_arrays(path: Path, cfg: DataConfig, layout: Layout) -> None:
    import zarr
    from zarr.codecs import BloscCodec

    variables = SOURCES[cfg.source].variables(cfg.params)
    root = zarr.open_group(str(path), mode="w")
    compressor = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    for split in SPLITS:
        n = layout.splits[split]
        group = root.create_group(split)
        for name, spec in variables.items():
            sample_bytes = np.dtype(spec.dtype).itemsize * max(1, math.prod(spec.shape))
            chunk = max(1, min(layout.shard_size, INNER_CHUNK_BYTES // sample_bytes))
            while layout.shard_size % chunk:  # shards must hold whole inner chunks
                chunk -= 1
            group.create_array(name, shape=(n, *spec.shape), dtype=spec.dtype,
                               chunks=(chunk, *spec.shape),
                               shards=(layout.shard_size, *spec.shape) if n else None,
                               compressors=compressor,
                               config={"write_empty_chunks": True},
                               attributes={"description": spec.description})


def _start_client(cfg: DataConfig):
    from distributed import Client, LocalCluster

    if cfg.dask.scheduler:
        return Client(cfg.dask.scheduler), None
    cluster = LocalCluster(n_workers=cfg.dask.n_workers, threads_per_worker=cfg.dask.threads_per_worker,
                           memory_limit=cfg.dask.memory_limit, processes=True,
                           dashboard_address=":0")
    return Client(cluster), cluster


def _versions() -> dict[str, str]:
    import dask
    import zarr
    return {"hpcforge": "0.1.0", "numpy": np.__version__, "zarr": zarr.__version__,
            "dask": dask.__version__}


def prepare(cfg: DataConfig, resolved: dict[str, Any], log=print) -> Path:
    """Write the dataset described by `cfg` to `cfg.path`; return the store's path."""
    import zarr

    path = Path(cfg.path)
    partial = path.with_name(path.name + ".partial")
    if path.exists() and not cfg.overwrite:
        raise UserError(f"data.path {path} already exists; pass data.overwrite=true to replace "
                        f"it (the old store is kept until the new one is complete)")
    layout = make_layout(cfg)
    if partial.exists():
        shutil.rmtree(partial)
    scratch = path.with_name(path.name + ".scratch")
    shutil.rmtree(scratch, ignore_errors=True)
    _create_arrays(partial, cfg, layout)
    dest = destinations(cfg.seed, cfg.n_samples)
    t0 = time.time()
    client, cluster = _start_client(cfg)
    try:
        log(f"dask: {len(client.scheduler_info()['workers'])} workers, dashboard "
            f"{client.dashboard_link}")
        pass1 = [client.submit(scatter_chunk, cfg, layout, i,
                               dest[i * cfg.chunk_size:(i + 1) * cfg.chunk_size], str(scratch),
                               key=f"scatter-{i}", pure=False)
                 for i in range(layout.n_chunks)]
        pass2 = [client.submit(write_shard, str(partial), str(scratch), split, j, a, b, *pass1,
                               key=f"write-{split}-{j}", pure=False)
                 for split, j, a, b in layout.shards()]
        if cfg.dask.progress:
            from distributed import progress
            progress(pass1 + pass2)
            print(flush=True)
        partials = client.gather(pass1)
        checksums = dict(client.gather(pass2))
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    shutil.rmtree(scratch, ignore_errors=True)
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
        "source": cfg.source, "splits": layout.splits, "n_samples": cfg.n_samples,
        "shard_size": cfg.shard_size, "chunk_size": cfg.chunk_size,
        "shuffle": {"algorithm": "two-pass bucket (scatter by destination shard, gather)",
                    "seed": cfg.seed, "tasks": len(pass1) + len(pass2)},
        "stats": _combine(partials), "checksums": checksums, "versions": _versions(),
        "config": resolved, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - t0, 2)}
    root = zarr.open_group(str(partial), mode="r+")
    root.attrs["hpcforge"] = json.loads(json.dumps(meta))
    # The completion marker goes last; only then does the store take its final name.
    root.attrs["hpcforge"] = {**meta, "complete": True}
    if path.exists():
        old = path.with_name(path.name + ".old")
        os.replace(path, old)
        os.replace(partial, path)
        shutil.rmtree(old)
    else:
        os.replace(partial, path)
    open_store(path)  # the store we just wrote must read back as complete
    return path
