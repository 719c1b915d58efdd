"""Per-rank reader of a prepared store: contiguous block reads, a shuffle buffer, prefetch.

Every epoch the store's blocks (its inner chunks: the efficient read unit, one decode each) are put
in an order that is a pure function of (seed, epoch); the resulting sample sequence is cut into
`world_size` equal parts and rank r reads part r, so each sample is seen once per epoch across ranks
(the tail that does not divide evenly is dropped, like DistributedSampler with drop_last). Within
its part a rank shuffles a buffer of `buffer_blocks` blocks at a time with a stream from (seed,
epoch, rank).

Each buffer is converted to torch, normalised and, when CUDA is present, pinned once as a whole by
the prefetch thread; its batches are slices of it. Pinned, the trainer copies a batch with
non_blocking=True and the copy overlaps the step (pinned pages are what make async H2D copies
possible). `data_wait_fraction()` is the share of the consumer's time spent waiting for batches.

Blocks are read by `pipeline.data.shards.ShardReader` straight from the shard files when the array
is in the layout `prepare` writes (through zarr otherwise), each block decoded on a small thread
pool (`read_threads`; Blosc releases the GIL), into one buffer per group of `buffer_blocks`.

Every chunk's CRC32C is checked before it is decoded (stores prepared since issue 14 carry one); a
chunk that fails it, or fails to decode, raises `DamagedChunk` (a UserError: one line naming the
store, array, shard and chunk) in the reading thread, which hands it to the consumer: the batch
is never yielded, and the CLI ends the run with that line and exit status 2.
"""
from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pipeline.data.shards import ShardReader, damaged, run_all
from pipeline.data.store import Store, normalization

_DONE = object()
_WARNED: set[str] = set()  # stores already reported as unchecked, once per process


class ShardedLoader:
    def __init__(self, store: Store, split: str, inputs: dict[str, str | list[str]], batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, normalize: str = "none",
                 prefetch: int = 2, buffer_blocks: int = 4, pin_memory: bool | None = None,
                 read_threads: int | None = None, read_ahead: bool = True, drop_last: bool = True):
        # An input of several variables (data.inputs.x=[a, b]) reads each as a part of its own,
        # normalised by its own statistics, then flattened and joined (issue 24).
        parts = {key: _parts(key, var) for key, var in inputs.items()}
        self.joined = {key: [name for name, _ in p] for key, p in parts.items() if len(p) > 1}
        self.arrays = {name: store.variable(split, var) for p in parts.values() for name, var in p}
        self.readers = {key: ShardReader.of(a) for key, a in self.arrays.items()}
        if rank == 0:
            _warn_unchecked(store, self.arrays)
        self.read_threads = read_threads or min(4, os.cpu_count() or 1)
        self.n = next(iter(self.arrays.values())).shape[0]
        self.block = max(a.chunks[0] for a in self.arrays.values())
        joined = {name for names in self.joined.values() for name in names}
        self.transforms = {name: _normalizer(store.stats("train", var), normalize)
                           for p in parts.values() for name, var in p
                           if self.arrays[name].ndim > 1 or name in joined}
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.prefetch, self.buffer_blocks = max(1, prefetch), buffer_blocks
        self.epoch, self.start_batch = 0, 0
        self.wait_s = 0.0  # time the consumer waited for data, for the data-wait fraction
        self.busy_s = 0.0  # time the consumer spent between batches (its step)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.read_ahead = read_ahead  # False where the next epoch is never read (validation)
        # Training drops the tail (equal batches on every rank, as DistributedSampler's drop_last);
        # evaluation keeps it: the last rank also reads the samples that do not divide evenly,
        # and the last batch may be partial (issue 24: every test sample scored).
        self.drop_last = drop_last
        # made on first use, kept: its threads idle between reads
        self._pool: Executor | None = None
        # The next epoch's first group, read while this epoch's last batches train:
        # (epoch, its group stream, the group), and the thread reading it.
        self._ahead: tuple[int, Iterator[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
        self._ahead_thread: threading.Thread | None = None
        if len(self) == 0 and (drop_last or self.n == 0):
            raise ValueError(f"{split}: {self.n} samples over {world_size} ranks give no full batch "
                             f"of {batch_size}; lower train.batch_size or prepare more samples")

    def __len__(self) -> int:
        return self._batches(self._range()[1] - self._range()[0])

    def _batches(self, samples: int) -> int:
        """Batches in `samples` samples: full ones only, or with a partial last one."""
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def _range(self) -> tuple[int, int]:
        """This rank's share of an epoch's sample sequence, as [lo, hi)."""
        per_rank = self.n // self.world_size
        last = self.rank == self.world_size - 1
        return self.rank * per_rank, self.n if last and not self.drop_last else (self.rank + 1) * per_rank

    def data_wait_fraction(self) -> float:
        """Time waited for data / (waited + time spent on each batch), since the last reset."""
        total = self.wait_s + self.busy_s
        return self.wait_s / total if total > 0 else 0.0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.start_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.start_batch = int(state["epoch"]), int(state["batch"])

    def segments(self, epoch: int) -> list[tuple[int, int]]:
        """This rank's contiguous (start, stop) sample ranges for `epoch`, in reading order."""
        n_blocks = -(-self.n // self.block)
        order = np.random.default_rng([self.seed, epoch]).permutation(n_blocks)
        lo, hi = self._range()
        out, cursor = [], 0
        for b in order:
            a, z = b * self.block, min((b + 1) * self.block, self.n)
            s, e = max(a, a + lo - cursor), min(z, a + hi - cursor)
            if s < e:
                out.append((int(s), int(e)))
            cursor += z - a
            if cursor >= hi:
                break
        return out

    def _read(self, group: list[tuple[int, int]], pool: Executor | None,
              scratch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The samples of `group`'s ranges, concatenated, per batch key; blocks decoded on `pool`
        into `scratch`, one buffer per key reused for every group: decoding into fresh pages
        (a page fault per 4 KiB) ran at half the speed. Valid until the next call."""
        total = sum(e - s for s, e in group)
        out, jobs = {}, []
        for k, a in self.arrays.items():
            if k not in scratch:  # segments are at most one block each
                scratch[k] = np.empty((self.buffer_blocks * self.block, *a.shape[1:]), a.dtype)
            out[k] = buf = scratch[k][:total]
            reader, at = self.readers[k], 0
            for s, e in group:
                dest = buf[at:at + e - s]
                jobs += (reader.tasks(s, e, dest) if reader is not None
                         else [_zarr_job(a, s, e, dest)])
                at += e - s
        run_all(jobs, pool)
        return out

    def _groups(self, epoch: int, pool: Executor | None = None
                ) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's samples for `epoch`, one shuffled group of blocks at a time: each group is
        read, shuffled, converted and normalised (and pinned) once, as a whole, and holds a whole
        number of batches (the remainder is carried into the next group)."""
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        segs = self.segments(epoch)
        carry: dict[str, torch.Tensor] | None = None
        scratch: dict[str, np.ndarray] = {}
        for i in range(0, len(segs), self.buffer_blocks):
            buf = self._read(segs[i:i + self.buffer_blocks], pool, scratch)
            perm = rng.permutation(len(next(iter(buf.values()))))
            group = self._to_torch({k: v[perm] for k, v in buf.items()})  # v[perm]: a new array
            if carry is not None and len(next(iter(carry.values()))):
                group = {k: torch.cat([carry[k], v]) for k, v in group.items()}
            n = len(next(iter(group.values())))
            full = n - n % self.batch_size
            if full:
                yield {k: v[:full] for k, v in group.items()}
            carry = {k: v[full:] for k, v in group.items()}
        if not self.drop_last and carry is not None and len(next(iter(carry.values()))):
            yield carry  # the partial last batch

    def _to_torch(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in arrays.items():
            if v.dtype.kind in "iu" and v.ndim == 1:  # class labels: torch losses expect int64
                v = v.astype(np.int64)
            t = torch.from_numpy(np.ascontiguousarray(v))
            if k in self.transforms:  # (a scalar part of a joined input: one channel)
                t = self.transforms[k](t if t.ndim > 1 else t[:, None])
            out[k] = t
        for key, names in self.joined.items():  # (n, features): each part flattened, in order
            out[key] = torch.cat([out.pop(name).reshape(len(t), -1) for name in names], 1)
        return {k: t.pin_memory() if self.pin_memory else t for k, t in out.items()}

    def _stream(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """`epoch`'s groups, starting with the one read ahead at the end of the previous epoch
        when there is one for this epoch."""
        if self._ahead_thread is not None:
            self._ahead_thread.join()  # it was reading what comes next: no extra wait
            self._ahead_thread = None
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == epoch:
            return itertools.chain([ahead[2]], ahead[1])
        return self._groups(epoch, self._reader_pool())

    def _reader_pool(self) -> Executor | None:
        if self._pool is None and self.read_threads > 1:
            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="hpcforge-read")
        return self._pool

    def _read_ahead(self, epoch: int) -> None:
        """In the producer thread, once an epoch's last group is queued: read `epoch`'s first."""
        try:
            stream = self._groups(epoch, self._reader_pool())
            first = next(stream, None)
        except Exception:  # the epoch's own reader meets it again and reports it
            return
        if first is not None:
            self._ahead = (epoch, stream, first)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of this rank for the current epoch (slices of a group: views, no copy).

        A background thread reads groups ahead, up to `prefetch` of them queued. It hands over
        whole groups, not batches: one thread wake-up per group instead of one per step, which on
        busy cores (two ranks on two) cost the training thread its core and the GIL every step.
        When it has queued an epoch's last group it reads the next epoch's first, so a new epoch
        does not start with the training thread waiting for a read."""
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        epoch, skip = self.epoch, self.start_batch
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(self._stream(epoch), epoch, skip, q, stop),
                                  daemon=True, name="hpcforge-loader")
        thread.start()
        finished = False
        try:
            finished = yield from self._consume(q, epoch, skip)
        finally:
            self._release(thread, q, stop, finished)

    def _produce(self, stream: Iterator[dict[str, torch.Tensor]], epoch: int, skip: int,
                 q: queue.Queue, stop: threading.Event) -> None:
        """The prefetch thread: queue (index of its first batch, group) for each group that holds a
        batch at or after `skip`, then _DONE (or the exception), then read the next epoch ahead."""
        try:
            first = 0
            for group in stream:
                if first >= len(self) or stop.is_set():
                    break
                n = self._batches(len(next(iter(group.values()))))
                if first + n > skip:  # a resumed epoch skips the groups it already trained on
                    q.put((first, group))
                first += n
            q.put(_DONE)
        except BaseException as e:  # surfaced in the consumer, not lost in the thread
            q.put(e)
            return
        if self.read_ahead and not stop.is_set():
            self._read_ahead(epoch + 1)

    def _consume(self, q: queue.Queue, epoch: int, skip: int
                 ) -> Generator[dict[str, torch.Tensor], None, bool]:
        """The batches of the queued groups, timing the waits (wait_s) and the steps (busy_s);
        returns True once the epoch is finished (the state then points at the next one)."""
        bs, handed = self.batch_size, None  # handed: when the last batch went to the consumer
        while True:
            t0 = time.perf_counter()
            if handed is not None:
                self.busy_s += t0 - handed
            item = q.get()
            handed = time.perf_counter()
            self.wait_s += handed - t0
            if item is _DONE:
                self.epoch, self.start_batch = epoch + 1, 0
                return True
            if isinstance(item, BaseException):
                raise item
            first, group = item
            n = self._batches(len(next(iter(group.values()))))
            for i in range(max(first, skip), min(first + n, len(self))):
                j = (i - first) * bs
                batch = {k: v[j:j + bs] for k, v in group.items()}
                self.start_batch = i + 1
                yield batch
                t = time.perf_counter()
                self.busy_s += t - handed
                handed = t

    def _release(self, thread: threading.Thread, q: queue.Queue, stop: threading.Event,
                 finished: bool) -> None:
        """A finished epoch leaves its thread reading the next epoch's first group; an epoch left
        early stops the thread, unblocking it if it waits on a full queue."""
        if finished:
            self._ahead_thread = thread
            return
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.01)


def _parts(key: str, variables: str | list[str]) -> list[tuple[str, str]]:
    """(array name, variable) of one batch key: the key itself for one variable, `key/variable`
    for each of several (joined into the key once normalised)."""
    if isinstance(variables, str):
        return [(key, variables)]
    return [(f"{key}/{v}", v) for v in variables] if len(variables) > 1 else [(key, variables[0])]


def _zarr_job(array: Any, start: int, stop: int, dest: np.ndarray) -> Callable[[], None]:
    def job() -> None:
        try:
            dest[...] = array[start:stop]
        except Exception as e:  # zarr's crc32c mismatch (a ValueError) or a codec's error
            chunk, shard = array.chunks[0], (array.shards or array.chunks)[0]
            raise damaged(getattr(array.store, "root", array.store), array.path, start // shard,
                          f"{start % shard // chunk} (samples {start}..{stop - 1})",
                          f"it does not read back ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]})") from None
    return job


def _checked(array: Any) -> bool:
    """Whether `array`'s chunks carry a CRC32C (zarr's crc32c codec, inner or outer)."""
    codecs = array.metadata.to_dict().get("codecs", [])
    inner = [c for x in codecs if x["name"] == "sharding_indexed"
             for c in x["configuration"]["codecs"]]
    return any(c["name"] == "crc32c" for c in [*codecs, *inner])


def _warn_unchecked(store: Store, arrays: dict[str, Any]) -> None:
    """Say once that a store prepared before chunks carried a CRC32C is read unchecked. Its
    per-shard sha256 (attrs) covers every variable of a whole shard, a unit no rank reads (ranks
    read blocks of a shard each): checking it would cost a second full read, so the fix is to
    prepare the store again, which takes minutes, not a slower loader for every run."""
    plain = sorted(a.path for a in arrays.values() if not _checked(a))
    if plain and str(store.path) not in _WARNED:
        _WARNED.add(str(store.path))
        print(f"[hpcforge] warning: store {store.path} was prepared without per-chunk checksums "
              f"({', '.join(plain)}): damaged data in it would not be detected; re-run "
              f"`hpcforge prepare` with data.overwrite=true to add them", flush=True)


def _normalizer(stats: dict[str, Any], how: str):
    """The loader's per-channel affine map (pipeline.data.store.normalization) as a torch op."""
    if how == "none":
        return lambda t: t.float()
    shift, scale = normalization(stats, how)
    shift_t = torch.tensor(shift, dtype=torch.float32)
    scale_t = torch.tensor(scale, dtype=torch.float32)

    def apply(t: torch.Tensor) -> torch.Tensor:  # t is the loader's own buffer: in place is safe
        view = (1, -1) + (1,) * (t.ndim - 2)
        return t.float().sub_(shift_t.view(view)).div_(scale_t.view(view))
    return apply
