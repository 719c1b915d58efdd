"""`hpcforge prepare`: generate (or import) a dataset with Dask, split, globally shuffle, write Zarr.

The shuffle is two passes whose task count grows linearly with the data (at most n_in + n_out
tasks; a Dask `x[perm]` builds ~2 n^2 tasks for n chunks, and its scheduler time grows with them):
  pass 1, one task per input chunk (small chunks grouped a few per task, `group_chunks`):
          generate (or read) it, validate it, compute partial statistics, and write its samples
          to one scratch file, sorted by destination shard (n_in files, not n_in x n_out);
  pass 2, one task per output shard: read that shard's piece of each chunk file (one contiguous
          range per variable), order them, write the shard once and return its checksum.
Destinations come from a seeded Feistel bijection (`Permutation`), computed inside each task for
its own samples, so no process ever holds the whole permutation. Peak memory per task is one input
chunk or one output shard, and shards are sized from `data.memory_budget`.

Resumable: the store is written under `<path>.partial`, next to a scratch folder `<path>.scratch`
that records each finished chunk (its statistics) and each written shard (its checksum). After a
kill, the same command finds both, checks that the recorded config matches, and redoes only what
is not recorded. Only a complete store (marker written last) is renamed into place.

One prepare per store: `<path>.lock` (pipeline/data/lock.py) is held for the whole run. The scratch
folder records the config it was made for; a `.partial` and `.scratch` that do not belong together
(left by an earlier run that raced or crashed) are discarded, never mixed. A full disk anywhere
(pass-1 scratch, pass-2 shards, metadata) is one line naming the path, the space needed and free.
"""
from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from pipeline.config import DataConfig
from pipeline.core.errors import UserError
from pipeline.core.provenance import versions
from pipeline.core.redaction import redact
from pipeline.core.rundir import check_writable
from pipeline.data.lock import store_lock
from pipeline.data.store import FORMAT, FORMAT_VERSION, SPLITS, open_store, shard_checksum
from pipeline.sources import SOURCES, declared
from pipeline.sources.base import Variable

INNER_CHUNK_BYTES = 1 << 20  # ~1 MiB: large enough that per-read overhead is small, small enough
#                              that a shuffle buffer of blocks mixes samples (bench data_loader)
TASK_MIN_BYTES = 16 << 20    # pass-1 tasks group small chunks up to this much input ...
TASKS_PER_SLOT = 4           # ... keeping at least this many tasks per Dask task slot
# Memory model of the budget (checked by benchmarks/data_prepare.py, "peak RSS"):
WORKER_BASE = 200 << 20      # an idle Dask worker + its nanny with numpy/zarr loaded, ~200 MiB RSS
PASS1_COPIES = 3             # a chunk as generated, the pieces cut from it, stats sub-blocks
PASS2_COPIES = 3             # the shard being assembled, one piece, zarr's encoded shard
STATS_BLOCK = 8 << 20        # float64 bytes per statistics sub-block, so stats add little memory
# Fields of DataConfig that do not change the stored bytes: a resume may change them.
NOT_CONTENT = ("dask", "overwrite", "path", "memory_budget", "inputs", "normalize")


# --------------------------------------------------------------------------- permutation
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea & Flood 2014): every output bit depends on every input
    bit."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A seeded bijection of [0, n), evaluated for any index range in O(range) memory.

    A balanced Feistel network on 2h-bit words (the smallest even width holding n) is a
    bijection of [0, 4^h) whatever its round function; "cycle walking" (re-applying it to values
    >= n) restricts it to a bijection of [0, n) (Black & Rogaway 2002). 4^h < 4n, so a value
    walks fewer than 4 steps on average. Pure function of (seed, n).
    """
    ROUNDS = 6

    def __init__(self, seed: int, n: int):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        self.keys = np.random.SeedSequence([seed, 0x5EED]).generate_state(self.ROUNDS, np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, index: np.ndarray) -> np.ndarray:
        x = self._feistel(np.asarray(index, dtype=np.uint64))
        out = x >= self.n
        while out.any():
            x[out] = self._feistel(x[out])
            out = x >= self.n
        return x.astype(np.int64)


def destinations(seed: int, n: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Output positions of generated samples [start, stop): one seeded permutation of [0, n).

    Positions [0, n_train) are the train split, then val, then test, so the split and the shuffle
    are one random permutation.
    """
    return Permutation(seed, n)(np.arange(start, n if stop is None else stop))


# --------------------------------------------------------------------------- layout and budget
@dataclass(frozen=True)
class Layout:
    """Where each sample goes: split sizes, output shards and input chunks."""
    n_samples: int
    chunk_size: int
    shard_size: int
    splits: dict[str, int]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_samples / self.chunk_size)

    def chunk(self, i: int) -> tuple[int, int]:
        return i * self.chunk_size, min((i + 1) * self.chunk_size, self.n_samples)

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


def parse_budget(text: str) -> int:
    from dask.utils import parse_bytes
    try:
        return int(parse_bytes(text))
    except (ValueError, TypeError):
        raise UserError(f"data.memory_budget={text!r}: expected a size like 2GiB or 512MiB") from None


def sample_bytes(variables: dict[str, Variable]) -> int:
    return sum(np.dtype(v.dtype).itemsize * math.prod(v.shape) for v in variables.values())


def task_memory(cfg: DataConfig, workers: int, slots: int) -> int:
    """Bytes one running task may hold: the budget, less idle workers, shared by the slots."""
    budget = parse_budget(cfg.memory_budget)
    free = budget - workers * WORKER_BASE
    if free <= 0:
        need = (workers * WORKER_BASE + (64 << 20)) >> 20
        raise UserError(f"data.memory_budget={cfg.memory_budget}: {workers} Dask workers take "
                        f"~{workers * WORKER_BASE >> 20} MiB idle, leaving nothing for data; "
                        f"expected at least {need} MiB; raise it or lower data.dask.n_workers")
    return free // slots


def _inner_chunk(var: Variable, shard: int) -> int:
    """Samples per ~1 MiB inner chunk of `var`, a divisor of the shard (shards hold whole
    chunks)."""
    each = np.dtype(var.dtype).itemsize * max(1, math.prod(var.shape))
    chunk = max(1, min(shard, INNER_CHUNK_BYTES // each))
    while shard % chunk:
        chunk -= 1
    return chunk


def size_shards(cfg: DataConfig, variables: dict[str, Variable], n: int, per_task: int) -> int:
    """Samples per shard: cfg.shard_size checked against the budget, or (0) derived from it."""
    each = sample_bytes(variables)
    fit = per_task // (PASS2_COPIES * each)
    if cfg.shard_size > 0:
        if cfg.shard_size > fit:
            raise UserError(f"data.shard_size={cfg.shard_size}: a shard of "
                            f"{cfg.shard_size * each >> 20} MiB does not fit data.memory_budget="
                            f"{cfg.memory_budget} per task; expected <= {fit}; lower it, set 0 "
                            f"(sized from the budget), or raise the budget")
        return cfg.shard_size
    biggest = max(np.dtype(v.dtype).itemsize * math.prod(v.shape) for v in variables.values())
    unit = max(1, INNER_CHUNK_BYTES // biggest)        # whole inner chunks of the biggest variable
    if fit < unit and fit < n:
        raise UserError(f"data.memory_budget={cfg.memory_budget}: leaves {per_task >> 20} MiB per "
                        f"task, less than one ~1 MiB inner chunk x {PASS2_COPIES}; raise the budget")
    shard = min(fit, n) if fit < unit else (fit // unit) * unit
    return max(1, min(shard, math.ceil(n / unit) * unit))


def check_chunks(cfg: DataConfig, variables: dict[str, Variable], per_task: int) -> None:
    each = sample_bytes(variables)
    fit = per_task // (PASS1_COPIES * each)
    if cfg.chunk_size > fit:
        raise UserError(f"data.chunk_size={cfg.chunk_size}: a chunk of "
                        f"{cfg.chunk_size * each >> 20} MiB does not fit data.memory_budget="
                        f"{cfg.memory_budget} per task; expected <= {max(fit, 1)}; lower it or "
                        f"raise the budget")


def make_layout(cfg: DataConfig, n_samples: int | None = None, shard_size: int | None = None
                ) -> Layout:
    """Split sizes (seeded fractions) and chunking; `shard_size` defaults to cfg.shard_size."""
    n = cfg.n_samples if n_samples is None else n_samples
    for name, value in (("n_samples", n), ("chunk_size", cfg.chunk_size)):
        if value < 1:
            raise UserError(f"data.{name} = {value}: expected a positive integer")
    fractions = cfg.val_fraction + cfg.test_fraction
    if not (0 <= cfg.val_fraction < 1 and 0 <= cfg.test_fraction < 1 and fractions < 1):
        raise UserError(f"data.val_fraction + data.test_fraction = {fractions}: expected each in "
                        f"[0, 1) and a sum below 1, leaving samples for training")
    n_val, n_test = round(n * cfg.val_fraction), round(n * cfg.test_fraction)
    shard = cfg.shard_size if shard_size is None else shard_size
    if shard < 0:
        raise UserError(f"data.shard_size = {shard}: expected a positive integer, or 0 (from "
                        f"data.memory_budget)")
    return Layout(n, cfg.chunk_size, shard or n,
                  {"train": n - n_val - n_test, "val": n_val, "test": n_test})


def count_samples(cfg: DataConfig) -> int:
    """data.n_samples; for importers 0 means every sample the files hold."""
    source = SOURCES[cfg.source]
    if not hasattr(source, "n_available"):
        return cfg.n_samples
    have = source.n_available(cfg.params)
    if cfg.n_samples > have:
        raise UserError(f"data.n_samples={cfg.n_samples}: the {cfg.source} input holds {have} "
                        f"samples; expected <= {have}; set data.n_samples=0 to take all")
    return cfg.n_samples or have


# --------------------------------------------------------------------------- validation
def _bad_values(name: str, a: np.ndarray, start: int) -> dict[str, Any] | None:
    """NaN/Inf counts of one variable in one chunk, and the first location (global sample)."""
    if a.dtype.kind != "f":
        return None
    bad = ~np.isfinite(a)
    if not bad.any():
        return None
    first = np.argwhere(bad)[0].tolist()
    per_sample = bad.reshape(len(a), -1).any(axis=1)
    return {"values": int(bad.sum()), "samples": int(per_sample.sum()),
            "first": [start + first[0], *first[1:]], "mask": per_sample}


def validate(arrays: dict[str, np.ndarray], variables: dict[str, Variable], start: int,
             policy: str, fill: float) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Check dtype and shape; apply the NaN/Inf policy. Returns (arrays, keep mask, report)."""
    n = len(next(iter(arrays.values())))
    keep, report = np.ones(n, bool), {}
    for name, spec in variables.items():
        a = arrays[name]
        if a.dtype != np.dtype(spec.dtype) or a.shape[1:] != tuple(spec.shape) or len(a) != n:
            raise UserError(f"samples [{start}, {start + n}): variable {name!r} has "
                            f"{a.dtype}{a.shape}, expected {spec.dtype}{(n, *spec.shape)}; the "
                            f"input changed since it was scanned, or the source is broken")
        found = _bad_values(name, a, start)
        if found is None:
            continue
        if policy == "fail":
            raise UserError(f"variable {name!r} has {found['values']} NaN/Inf values in "
                            f"{found['samples']} of samples [{start}, {start + n}), first at "
                            f"sample {found['first'][0]} index {found['first'][1:]}; fix the "
                            f"input, or set data.invalid=drop (drop those samples) or "
                            f"data.invalid=fill (replace them by data.fill_value)")
        mask = found.pop("mask")
        if policy == "fill":
            arrays[name] = np.where(np.isfinite(a), a, np.asarray(fill, a.dtype))
        else:  # drop: every variable of a sample goes with it
            keep &= ~mask
        report[name] = found
    return arrays, keep, report


# --------------------------------------------------------------------------- pass 1
def _partial_stats(values: np.ndarray) -> dict[str, Any]:
    """Per-channel sums for one array (n, C, ...) or (n,), in float64 sub-blocks of bounded size."""
    axes = (0,) + tuple(range(2, values.ndim)) if values.ndim > 1 else (0,)
    step = max(1, STATS_BLOCK // (8 * max(1, math.prod(values.shape[1:]))))
    out: dict[str, Any] = {"count": np.array(values.size / (values.shape[1] if values.ndim > 1 else 1))}
    for i in range(0, len(values), step):
        v = values[i:i + step].astype(np.float64)
        part = {"sum": v.sum(axis=axes), "sumsq": (v * v).sum(axis=axes),
                "min": v.min(axis=axes), "max": v.max(axis=axes)}
        for k, x in part.items():
            op = {"min": np.minimum, "max": np.maximum}.get(k, np.add)
            out[k] = x if k not in out else op(out[k], x)
    if values.ndim == 1 and values.dtype.kind in "iub":  # a class label: count each class
        classes, counts = np.unique(values, return_counts=True)
        out["classes"] = dict(zip(classes.tolist(), counts.tolist()))
    return out


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file and rename, so a kill never leaves a half file under `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)          # on a full disk, give the space back at once
        if e.errno is None and _SHORT_WRITE.search(str(e)):
            # numpy's tofile reports a short write with no errno: on a local disk that is ENOSPC
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({e})", str(path)) from None
        raise


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def scatter_chunk(cfg: DataConfig, layout: Layout, chunk_index: int,
                  variables: dict[str, Variable], scratch: str) -> dict[str, Any]:
    """Pass 1: make one chunk, validate it, and write its kept samples to one scratch file,
    ordered by (split, destination bucket); the result says where each bucket's rows are."""
    start, stop = layout.chunk(chunk_index)
    arrays = SOURCES[cfg.source].generate(cfg.params, cfg.seed, chunk_index, start, stop - start)
    arrays, keep, invalid = validate(arrays, variables, start, cfg.invalid, cfg.fill_value)
    positions = destinations(cfg.seed, layout.n_samples, start, stop)
    result: dict[str, Any] = {"stats": {}, "dropped": {}, "invalid": invalid, "pieces": {}}
    rows, local, at = [], [], 0
    for split in SPLITS:
        lo, n = layout.split_start(split), layout.splits[split]
        inside = (positions >= lo) & (positions < lo + n)
        result["dropped"][split] = positions[inside & ~keep] - lo
        sel = np.flatnonzero(inside & keep)
        if not len(sel):
            continue
        result["stats"][split] = {k: _partial_stats(v[sel]) for k, v in arrays.items()}
        pos = positions[sel] - lo
        bucket = pos // layout.shard_size
        order = np.argsort(bucket, kind="stable")
        sel, pos = sel[order], pos[order]
        buckets, first, count = np.unique(bucket[order], return_index=True, return_counts=True)
        result["pieces"][split] = np.stack([buckets, at + first, count], axis=1).astype(np.int64)
        rows.append(sel)
        local.append(pos)
        at += len(sel)
    result["rows"] = at
    take = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    values = {_POS: np.concatenate(local) if local else np.zeros(0, np.int64),
              **{k: arrays[k][take] for k in variables}}
    _atomic_write(_chunk_file(scratch, chunk_index), lambda f: [
        np.ascontiguousarray(values[name], dtype).tofile(f)
        for name, dtype, _ in _sections(variables)])
    _atomic_write(Path(scratch) / "chunks" / f"{chunk_index:08d}.pkl",
                  lambda f: pickle.dump(result, f))
    return result


def _chunk_file(scratch: str, chunk_index: int) -> Path:
    return Path(scratch) / "pieces" / f"{chunk_index:08d}.bin"


_POS = "__pos__"  # the section of a chunk file that holds each row's destination position


def _sections(variables: dict[str, Variable]) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """The sections of a pass-1 chunk file, in file order: the int64 destination positions, then
    each variable in name order; each section holds all of the file's rows."""
    return [(_POS, np.dtype(np.int64), ())] + [
        (k, np.dtype(variables[k].dtype), tuple(variables[k].shape)) for k in sorted(variables)]


def _read_piece(path: Path, rows: int, first: int, count: int,
                variables: dict[str, Variable]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Rows [first, first + count) of a pass-1 chunk file of `rows` rows: positions, variables."""
    out, offset = {}, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, dtype, shape in _sections(variables):
            row = dtype.itemsize * math.prod(shape)
            raw = os.pread(fd, count * row, offset + first * row)
            if len(raw) != count * row:
                raise UserError(f"{path}: pass-1 piece cut short ({len(raw)} of {count * row} "
                                f"bytes); delete {path.parent.parent} and run prepare again")
            out[name] = np.frombuffer(raw, dtype).reshape(count, *shape)
            offset += rows * row
    finally:
        os.close(fd)
    return out.pop(_POS), out


# --------------------------------------------------------------------------- pass 2
_SPLIT_KEY = 1 << 40  # piece keys: split index * _SPLIT_KEY + destination bucket


def piece_table(results: list[dict]) -> np.ndarray:
    """Every pass-1 piece as a row (key, chunk, rows, first row, count), sorted by key then chunk,
    where key = split index * _SPLIT_KEY + bucket: sorted once, each shard's pieces are then one
    contiguous range (`shard_pieces`), not a scan of every chunk's table per shard."""
    parts = [np.column_stack([SPLITS.index(split) * _SPLIT_KEY + t[:, 0], np.full(len(t), i),
                              np.full(len(t), r["rows"]), t[:, 1], t[:, 2]])
             for i, r in enumerate(results) for split, t in r["pieces"].items()]
    table = np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 5), np.int64)
    return table[np.lexsort((table[:, 1], table[:, 0]))]


def shard_pieces(table: np.ndarray, split: str, first_bucket: int, last_bucket: int
                 ) -> np.ndarray:
    """(chunk, rows, first row, count) of every pass-1 piece in buckets first..last of `split`."""
    base = SPLITS.index(split) * _SPLIT_KEY
    lo, hi = np.searchsorted(table[:, 0], [base + first_bucket, base + last_bucket + 1])
    return table[lo:hi, 1:]


def write_shard(store_path: str, scratch: str, split: str, shard: int, start: int, stop: int,
                wanted: np.ndarray | None, pieces: np.ndarray,
                variables: dict[str, Variable]) -> tuple[str, str]:
    """Pass 2: gather one shard's pieces into place, write it once, record its checksum.

    `wanted` are the pre-drop positions of this shard's samples (None: positions start..stop);
    `pieces` (from `shard_pieces`) are where pass 1 put the buckets that hold them. Dropping only
    moves samples down, so they sit in one or a few consecutive buckets.
    """
    wanted = np.arange(start, stop) if wanted is None else wanted
    out = {k: np.empty((stop - start, *v.shape), v.dtype) for k, v in variables.items()}
    filled = 0
    for chunk, rows, first, count in pieces.tolist():
        pos, values = _read_piece(_chunk_file(scratch, chunk), rows, first, count, variables)
        at = np.searchsorted(wanted, pos)
        ok = (at < len(wanted)) & (wanted[np.minimum(at, len(wanted) - 1)] == pos)
        for k in out:
            out[k][at[ok]] = values[k][ok]
        filled += int(ok.sum())
    if filled != stop - start:   # the scratch is not this store's: only a foreign hand does this
        raise UserError(f"{split}/{shard}: {filled} of {stop - start} samples found in {scratch}, "
                        f"which does not match {store_path}; remove both (rm -rf {scratch} "
                        f"{store_path}) and run the same command again")
    write_region(store_path, split, start, stop, out)
    checksum = shard_checksum(out)
    _atomic_write(Path(scratch) / "shards" / f"{split}-{shard:06d}.json",
                  lambda f: f.write(json.dumps(checksum).encode()))
    return f"{split}/{shard}", checksum


def write_region(store_path: str, split: str, start: int, stop: int,
                 arrays: dict[str, np.ndarray]) -> None:
    """Write samples [start, stop) of every variable of one split (whole shards: no races)."""
    import zarr
    for k, v in arrays.items():
        try:
            zarr.open_array(f"{store_path}/{split}/{k}", mode="r+")[start:stop] = v
        except OSError as e:
            if e.filename:
                raise
            raise OSError(e.errno, e.strerror, f"{store_path}/{split}/{k}") from e  # name the array


# --------------------------------------------------------------------------- combining
def _combine(partials: list[dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """Reduce per-chunk sums to per-split, per-variable, per-channel mean/std/min/max."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for split in SPLITS:
        parts = [p[split] for p in partials if split in p]
        if not parts:
            continue
        out[split] = {var: _combine_var([p[var] for p in parts]) for var in parts[0]}
    return out


def _combine_var(parts: list[dict]) -> dict[str, Any]:
    count = sum(float(p["count"]) for p in parts)
    s, sq = sum(p["sum"] for p in parts), sum(p["sumsq"] for p in parts)
    mean = s / count
    out = {"count": int(count), "mean": np.atleast_1d(mean).tolist(),
           "std": np.atleast_1d(np.sqrt(np.maximum(sq / count - mean ** 2, 0))).tolist(),
           "min": np.atleast_1d(np.min([p["min"] for p in parts], axis=0)).tolist(),
           "max": np.atleast_1d(np.max([p["max"] for p in parts], axis=0)).tolist()}
    if "classes" in parts[0]:
        counts: dict[str, int] = {}
        for p in parts:
            for c, k in p["classes"].items():
                counts[str(c)] = counts.get(str(c), 0) + k
        out["class_counts"] = dict(sorted(counts.items(), key=lambda kv: float(kv[0])))
    return out


def _combine_invalid(results: list[dict], policy: str) -> dict[str, Any]:
    """Per variable: NaN/Inf values and samples over the dataset, and the first location."""
    out: dict[str, Any] = {}
    for r in results:
        for name, found in r["invalid"].items():
            have = out.setdefault(name, {"values": 0, "samples": 0, "first": found["first"]})
            have["values"] += found["values"]
            have["samples"] += found["samples"]
            have["first"] = min(have["first"], found["first"])
    return {"policy": policy, "variables": out}


# --------------------------------------------------------------------------- store creation
def _create_arrays(path: Path, variables: dict[str, Variable], splits: dict[str, int],
                   shard_size: int) -> None:
    """Every array sharded along the sample axis, each inner chunk Blosc-compressed and then
    checksummed (zarr's `crc32c` codec, 4 bytes per chunk): a flipped byte in a shard file is
    caught when its chunk is read, before a sample from it reaches a model (issue 14)."""
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    root = zarr.open_group(str(path), mode="r+")
    compressor = [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()]
    for split in SPLITS:
        n = splits[split]
        group = root.require_group(split)
        for name, spec in variables.items():
            group.create_array(name, shape=(n, *spec.shape), dtype=spec.dtype,
                               chunks=(_inner_chunk(spec, shard_size), *spec.shape),
                               shards=(shard_size, *spec.shape) if n else None,
                               compressors=compressor, overwrite=True,
                               config={"write_empty_chunks": True},
                               attributes={"description": spec.description})


def content_config(cfg: DataConfig) -> dict[str, Any]:
    """The settings that decide the stored bytes; a resumed prepare must match them."""
    return json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k not in NOT_CONTENT}))


# --------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class Paths:
    final: Path      # the store, once complete
    partial: Path    # the store while it is written
    scratch: Path    # pass-1 chunk files, and the records of finished chunks and shards
    lock: Path       # held by the one prepare that writes this store (pipeline/data/lock.py)

    @classmethod
    def of(cls, path: str) -> "Paths":
        p = Path(path)
        return cls(p, p.with_name(p.name + ".partial"), p.with_name(p.name + ".scratch"),
                   p.with_name(p.name + ".lock"))


def _hpcforge_meta(path: Path) -> dict | None:
    """attrs["hpcforge"] of a store written by this hpcforge, else None."""
    import zarr
    try:
        meta = dict(zarr.open_group(str(path), mode="r").attrs).get("hpcforge")
    except Exception:  # not a Zarr group at all
        return None
    ok = isinstance(meta, dict) and meta.get("format") == FORMAT
    return meta if ok and meta.get("format_version") == FORMAT_VERSION else None


def _check_target(paths: Paths, cfg: DataConfig) -> bool:
    """Whether data.path already holds this very dataset, complete (a re-run of a finished
    prepare: nothing to do); a store of another config is refused without data.overwrite."""
    if not paths.final.exists():
        return False
    if not cfg.overwrite:
        meta = _hpcforge_meta(paths.final) or {}
        diff = _differences(meta.get("content", {}), content_config(cfg))
        if meta.get("complete") and not diff:
            return True
        there = f" with another config ({'; '.join(diff[:3])})" if diff else ""
        raise UserError(f"data.path {paths.final} already exists{there}; pass data.overwrite=true "
                        f"to replace it (the old store is kept until the new one is complete), "
                        f"or choose another data.path")
    if _hpcforge_meta(paths.final) is None:
        raise UserError(f"data.path {paths.final} exists and is not an hpcforge store of format "
                        f"version {FORMAT_VERSION}; refusing to replace it even with "
                        f"data.overwrite=true; remove it yourself or choose another data.path")
    return False


def _differences(old: dict, new: dict, prefix: str = "data") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}.{k}")
        elif a != b:
            out.append(f"{prefix}.{k}: {a!r} there, {b!r} now")
    return out


def _resume_state(paths: Paths, cfg: DataConfig, content: dict, log) -> dict | None:
    """The recorded state of an interrupted prepare of this same config, or None (start afresh)."""
    if paths.partial.exists():
        meta = _hpcforge_meta(paths.partial)
        if meta is None:
            raise UserError(f"{paths.partial} exists but was not written by this hpcforge (format "
                            f"{FORMAT!r} version {FORMAT_VERSION}); remove it, or choose another "
                            f"data.path")
        if meta.get("content") == content and _scratch_content(paths) == content:
            log(f"resuming the interrupted prepare in {paths.partial}")
            return meta
        if meta.get("content") == content:   # safe to discard: both are only ours, incomplete
            log(f"discarding {paths.partial} and {paths.scratch}: they do not belong together "
                f"(left by an earlier prepare that raced or crashed); starting afresh")
            return _discard(paths)
        diff = "; ".join(_differences(meta.get("content", {}), content)[:5])
        if not cfg.overwrite and not _policy_fix(meta.get("content", {}), content):
            raise UserError(f"{paths.partial} is an interrupted prepare of a different config "
                            f"({diff}); rerun with that config to finish it, or pass "
                            f"data.overwrite=true to discard it")
        log(f"discarding {paths.partial} (a different config: {diff})")
    return _discard(paths)


def _policy_fix(old: dict, new: dict) -> bool:
    """Whether `new` is `old`, a data.invalid=fail prepare, with only its NaN/Inf policy changed:
    the fix that prepare's error prints (data.invalid=drop or fill), which must work as printed
    (issue 24). A failing policy's partial store never completes, so nothing is lost."""
    def rest(c: dict) -> dict:
        return {k: v for k, v in c.items() if k not in ("invalid", "fill_value")}
    return old.get("invalid") == "fail" and rest(old) == rest(new)


def _discard(paths: Paths) -> None:
    shutil.rmtree(paths.partial, ignore_errors=True)
    shutil.rmtree(paths.scratch, ignore_errors=True)


def _scratch_content(paths: Paths) -> dict | None:
    """The config the scratch folder was made for (None: none recorded, or unreadable)."""
    try:
        return json.loads((paths.scratch / "content.json").read_text())
    except (OSError, ValueError):
        return None


def _start_partial(paths: Paths, content: dict, shard_size: int) -> dict:
    import zarr
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
            "content": content, "shard_size": shard_size, "arrays": False}
    shutil.rmtree(paths.scratch, ignore_errors=True)    # never a chunk of another config
    zarr.open_group(str(paths.partial), mode="w").attrs["hpcforge"] = meta
    _atomic_write(paths.scratch / "content.json", lambda f: f.write(json.dumps(content).encode()))
    return meta


def _progress(cfg: DataConfig, futures: list) -> None:
    if cfg.dask.progress and futures:
        from distributed import progress
        progress(futures)
        print(flush=True)


def scatter_chunks(cfg: DataConfig, layout: Layout, chunks: list[int],
                   variables: dict[str, Variable], scratch: str) -> list[dict[str, Any]]:
    """Pass 1 for a group of chunks, one after the other (memory: one chunk at a time); each
    chunk is recorded on its own, so a resume redoes only the chunks without a record."""
    return [scatter_chunk(cfg, layout, i, variables, scratch) for i in chunks]


def group_chunks(chunks: list[int], chunk_bytes: int, slots: int) -> list[list[int]]:
    """Consecutive chunks grouped into pass-1 tasks of at least TASK_MIN_BYTES of input (Dask
    costs ~2 ms per task here, a 128 KiB chunk ~2 ms of work), but never fewer than
    TASKS_PER_SLOT tasks per slot, so every worker stays busy until the end."""
    by_size = max(1, TASK_MIN_BYTES // max(1, chunk_bytes))
    by_balance = max(1, len(chunks) // (TASKS_PER_SLOT * max(1, slots)))
    g = min(by_size, by_balance)
    return [chunks[i:i + g] for i in range(0, len(chunks), g)]


@dataclass(frozen=True)
class _Failed:
    """An error the user can fix, raised inside a Dask task and returned instead of raised:
    Dask's worker logs each raised exception with its traceback ("Compute Failed"), which would
    bury the one-line message."""
    error: BaseException


def _guard(task: Callable, *args) -> Any:
    """Run a task; a UserError or a disk error comes back as `_Failed` (see there). A disk error
    that a library wrapped is unwrapped here: a chain of causes does not survive pickling."""
    try:
        return task(*args)
    except UserError as e:
        return _Failed(e)
    except Exception as e:
        os_error = _os_error(e)
        if os_error is None or os_error.errno not in DISK_ERRORS:
            raise
        return _Failed(os_error)


def _results(client, futures: list) -> Iterator[Any]:
    """Each future's result, in order; the first `_Failed` is raised, the rest cancelled."""
    for f in futures:
        result = f.result()
        if isinstance(result, _Failed):
            client.cancel(futures)
            raise result.error
        yield result


class QuietCancel(WorkerPlugin):
    """Worker plugin: a task cancelled because another failed is not worth a warning with a
    coroutine's repr ("Async instruction ... ended with CancelledError") under the one line."""
    name = "hpcforge-quiet-cancel"

    def setup(self, worker=None) -> None:
        import logging
        logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)


def _pass1(client, cfg: DataConfig, layout: Layout, variables: dict, paths: Paths, token: str,
           group: Callable[[list[int]], list[list[int]]]) -> tuple[list[dict], int, int]:
    """Run the chunks not yet recorded; return every chunk's result, in chunk order, the number
    of chunks run and the number of tasks."""
    done = {int(p.stem): pickle.loads(p.read_bytes())
            for p in (paths.scratch / "chunks").glob("*.pkl")}
    done = {i: r for i, r in done.items() if "pieces" in r}  # older scratch layouts: redo
    todo = [i for i in range(layout.n_chunks) if i not in done]
    groups = group(todo)
    futures = [client.submit(_guard, scatter_chunks, cfg, layout, g, variables,
                             str(paths.scratch), key=f"scatter-{g[0]}-{token}", pure=False)
               for g in groups]
    _progress(cfg, futures)
    # In submission order, not bulk: the first failure in chunk order is the one raised, so an
    # error names the data's first bad place even when a later group fails sooner.
    for group, results in zip(groups, _results(client, futures)):
        done.update(zip(group, results))
    return [done[i] for i in range(layout.n_chunks)], len(todo), len(groups)


def _final_splits(layout: Layout, results: list[dict]) -> tuple[dict[str, int], dict]:
    """Split sizes after dropping invalid samples, and the dropped (pre-drop) positions."""
    dropped = {s: np.sort(np.concatenate([r["dropped"][s] for r in results] or [np.zeros(0, int)]))
               for s in SPLITS}
    final = {s: layout.splits[s] - len(dropped[s]) for s in SPLITS}
    if final["train"] < 1:
        raise UserError("every training sample held NaN/Inf and data.invalid=drop dropped them "
                        "all; fix the input or use data.invalid=fill")
    return final, dropped


def _ensure_arrays(paths: Paths, variables: dict, splits: dict, shard_size: int) -> None:
    import zarr
    root = zarr.open_group(str(paths.partial), mode="r+")
    meta = dict(root.attrs["hpcforge"])
    if not meta.get("arrays"):
        _create_arrays(paths.partial, variables, splits, shard_size)
        root.attrs["hpcforge"] = {**meta, "arrays": True}


def _pass2(client, cfg: DataConfig, layout: Layout, results: list[dict], final: dict,
           dropped: dict, variables: dict, paths: Paths, token: str) -> tuple[dict[str, str], int]:
    """Write the shards without a recorded checksum; return every shard's checksum."""
    done = {}
    for p in (paths.scratch / "shards").glob("*.json"):
        split, j = p.stem.rsplit("-", 1)
        done[f"{split}/{int(j)}"] = json.loads(p.read_text())
    kept = {s: np.delete(np.arange(layout.splits[s]), dropped[s]) if len(dropped[s]) else None
            for s in SPLITS}
    out = Layout(sum(final.values()), layout.chunk_size, layout.shard_size, final)
    todo = [s for s in out.shards() if f"{s[0]}/{s[1]}" not in done]
    table = piece_table(results)
    futures = []
    for split, j, a, b in todo:
        wanted = None if kept[split] is None else kept[split][a:b]
        lo, hi = (a, b - 1) if wanted is None else (int(wanted[0]), int(wanted[-1]))
        pieces = shard_pieces(table, split, lo // layout.shard_size, hi // layout.shard_size)
        futures.append(client.submit(_guard, write_shard, str(paths.partial), str(paths.scratch),
                                     split, j, a, b, wanted, pieces, variables,
                                     key=f"write-{split}-{j}-{token}", pure=False))
    _progress(cfg, futures)
    done.update(dict(_results(client, futures)))
    return done, len(todo)


DISK_ERRORS = {errno.ENOSPC: ("no space left on the device", "free space or point data.path at "
                              "a larger file system"),
               errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
               errno.EACCES: ("permission denied", "choose a data.path you can write"),
               errno.EPERM: ("operation not permitted", "choose a data.path you can write"),
               errno.EROFS: ("read-only file system", "choose a data.path on a writable disk")}


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, or one it was raised from (Zarr's and Dask's wrappers)."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _free_space(path: Path) -> str:
    """Free space on the file system that holds `path` (its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB are free there"
    except OSError:
        return "the free space is unknown"


def _disk_error(e: BaseException, paths: Paths, need: int = 0) -> BaseException:
    """A one-line UserError for a full or unwritable disk; other errors stay as they are."""
    os_error = _os_error(e)
    if os_error is None or os_error.errno not in DISK_ERRORS:
        return e
    what, fix = DISK_ERRORS[os_error.errno]
    where = os_error.filename or paths.partial
    state = (f"the store stays incomplete in {paths.partial}: rerun the same command to resume"
             if paths.partial.exists() else "nothing was written")
    if os_error.errno in (errno.ENOSPC, errno.EDQUOT):
        state += (f"; this prepare needs up to ~{2 * need / 2**20:.1f} MiB ({need / 2**20:.1f} MiB "
                  f"of pass-1 scratch, and the store, at most as much again) and "
                  f"{_free_space(paths.final)}")
    return UserError(f"writing {where}: {what} (errno {os_error.errno}); {fix}; {state}")


def prepare(cfg: DataConfig, resolved: dict[str, Any], log=print) -> Path:
    """Write the dataset described by `cfg` to `cfg.path` (resuming an interrupted run); return
    it."""
    paths = Paths.of(cfg.path)
    if _check_target(paths, cfg):
        return _done(paths, log)
    check_writable(paths.final.parent, "data.path", cfg.path)  # before any work
    n = count_samples(cfg)
    make_layout(cfg, n, 1)  # bad sizes and fractions fail here, before any work
    variables = SOURCES[cfg.source].variables(cfg.params)
    try:
        with store_lock(paths.lock, paths.final, log):
            if _check_target(paths, cfg):  # again: a prepare that held the lock may have done it
                return _done(paths, log)
            return _run(cfg, resolved, paths, n, variables, log)
    except UserError:
        raise
    except Exception as e:
        error = _disk_error(e, paths, n * sample_bytes(variables))
        if error is e:
            raise
        raise error from None


def _done(paths: Paths, log) -> Path:
    """A finished prepare of the same config, run again (scripts re-run whole pipelines): the
    store stays as it is, and says so. Only the config is compared, not the input files."""
    log(f"data.path {paths.final} already holds this dataset, complete, from the same config: "
        f"nothing to do (data.overwrite=true prepares it again, e.g. after the input files changed)")
    return paths.final


def _run(cfg: DataConfig, resolved: dict, paths: Paths, n: int, variables: dict, log) -> Path:
    from pipeline.data.cluster import dask_client, shape

    content, t0, token = content_config(cfg), time.time(), os.urandom(4).hex()
    state = _resume_state(paths, cfg, content, log)
    with dask_client(cfg.dask, log) as client:
        workers, slots = shape(cfg.dask, client)
        client.register_plugin(QuietCancel())
        if state is None:
            per_task = task_memory(cfg, workers, slots)
            check_chunks(cfg, variables, per_task)
            state = _start_partial(paths, content, size_shards(cfg, variables, n, per_task))
        layout = make_layout(cfg, n, state["shard_size"])
        chunk_bytes = cfg.chunk_size * sample_bytes(variables)
        group = partial(group_chunks, chunk_bytes=chunk_bytes, slots=slots)
        results, ran1, tasks1 = _pass1(client, cfg, layout, variables, paths, token, group)
        final, dropped = _final_splits(layout, results)
        _ensure_arrays(paths, variables, final, layout.shard_size)
        checksums, ran2 = _pass2(client, cfg, layout, results, final, dropped, variables,
                                 paths, token)
    total = len(group(list(range(layout.n_chunks)))) + len(checksums)  # tasks of a whole run
    if ran1 + ran2 < total:
        log(f"resumed: kept {layout.n_chunks - ran1} of {layout.n_chunks} chunks and "
            f"{len(checksums) - ran2} of {len(checksums)} shards; redid the rest")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
        "source": cfg.source, "splits": final, "n_samples": sum(final.values()),
        "n_read": n, "shard_size": layout.shard_size, "chunk_size": cfg.chunk_size,
        "shuffle": {"algorithm": "two-pass bucket (sort each chunk by destination shard, gather)",
                    "permutation": f"Feistel, {Permutation.ROUNDS} rounds, cycle walking",
                    "seed": cfg.seed, "tasks": total, "tasks_run": tasks1 + ran2,
                    "chunks": layout.n_chunks, "shards": len(checksums)},
        "invalid": _combine_invalid(results, cfg.invalid), "content": content, "arrays": True,
        "stats": _combine([r["stats"] for r in results]), "checksums": dict(sorted(checksums.items())),
        "memory_budget": cfg.memory_budget, "versions": versions(), "config": redact(resolved),
        **class_attrs(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.time() - t0, 2)}
    return _finish(paths, meta)


def class_attrs(cfg: DataConfig) -> dict[str, Any]:
    """{"classes": table} for an import labelled from its paths (data.params.label_from), else
    {}."""
    classes = declared(cfg.source, "classes")
    table = classes(cfg.params) if classes is not None else None
    return {"classes": table} if table else {}


def _finish(paths: Paths, meta: dict) -> Path:
    """Write the metadata, then the completion marker last, then move the store into place."""
    import zarr
    root = zarr.open_group(str(paths.partial), mode="r+")
    root.attrs["hpcforge"] = json.loads(json.dumps(meta))
    root.attrs["hpcforge"] = {**root.attrs["hpcforge"], "complete": True}
    if paths.final.exists():
        old = paths.final.with_name(paths.final.name + ".old")
        if old.exists():   # a run killed between the two renames below left it
            if _hpcforge_meta(old) is None:
                raise UserError(f"{old} is in the way of replacing {paths.final} and is not an "
                                f"hpcforge store; move it away and run the same command again")
            shutil.rmtree(old)
        os.replace(paths.final, old)
        os.replace(paths.partial, paths.final)
        shutil.rmtree(old)
    else:
        os.replace(paths.partial, paths.final)
    shutil.rmtree(paths.scratch, ignore_errors=True)
    open_store(paths.final)  # the store we just wrote must read back as complete
    return paths.final
