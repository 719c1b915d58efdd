"""Sample ranges of a stored array read straight from its shard files, decoded in a thread pool.

The loader's read unit is one inner chunk (about 1 MiB). Through `zarr.Array.__getitem__` each
such read costs a round trip to zarr's event-loop thread and several hops to its executor, which
holds reads to a fraction of what Blosc itself decodes from two threads (`hpcforge bench --only
data_loader` measures both). For the one layout `hpcforge prepare` writes, a local Zarr v3
array sharded along the sample axis (codec `sharding_indexed`, inner codecs `bytes` + `blosc` +
`crc32c`, index `bytes` + `crc32c` at the end of each shard file), `ShardReader` reads the shard
index once (checking its CRC32C), then `pread`s each chunk, checks its CRC32C and decodes it
itself, straight into the caller's buffer, from as many threads as the caller gives it. Stores
prepared before chunks carried a CRC32C (inner codecs `bytes` + `blosc`) are read unchecked
(`checked` is False; the loader says so once). A chunk that fails its check or its decoding is a
`DamagedChunk`: one line naming the store, array, shard file and chunk, and the fix. Any other
layout gets `None` from `ShardReader.of` and is read through zarr: the fast path is an
optimisation, never a requirement.

The format is the Zarr v3 sharding specification (zarr-specs, codecs/sharding-indexed/v1.0): each
shard file ends with one (offset, nbytes) pair of little-endian uint64 per inner chunk, in C order,
then the 4-byte CRC32C of those pairs; a pair of 2**64-1 marks a chunk never written (fill value).
Chunks at the array's end are stored whole, padded with the fill value.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UserError

_EMPTY = np.uint64(2 ** 64 - 1)


class DamagedChunk(UserError):
    """A stored chunk whose checksum or decoding fails: the store's files were changed on disk."""


def damaged(store: Any, array: str, shard: int | str, chunk: int | str, why: str) -> DamagedChunk:
    """The one line a damaged chunk gets, wherever it is found (fast path or through zarr)."""
    return DamagedChunk(f"damaged data in store {store}: array {array}, shard {shard}, chunk "
                        f"{chunk}: {why}; restore that file from a backup or re-run `hpcforge "
                        f"prepare` with the same config and data.overwrite=true")


class ShardReader:
    """Reads `[start, stop)` sample ranges of one array written by `hpcforge prepare`."""

    def __init__(self, folder: Path, shape: tuple[int, ...], dtype: np.dtype, chunk: int,
                 shard: int, fill: Any, codec: Any, key: Callable[[tuple[int, ...]], str],
                 checked: bool = True, store: Path | None = None, name: str = ""):
        self.folder, self.shape, self.dtype = folder, shape, dtype
        self.chunk, self.shard, self.fill, self.codec, self.key = chunk, shard, fill, codec, key
        self.checked = checked  # chunks end with their CRC32C (stores prepared since issue 14)
        self.store, self.name = store or folder, name or folder.name  # for messages
        self.sample = int(np.prod(shape[1:], dtype=np.int64))
        self._index: dict[int, np.ndarray] = {}  # shard -> its index (threads may both fill one)
        self._last: tuple[int, np.ndarray] | None = None  # one decoded chunk, for ranges < chunk

    @classmethod
    def of(cls, array: Any) -> "ShardReader | None":
        """A reader for `array`, or None when it is not in the layout this module reads."""
        from numcodecs import Blosc
        from zarr.storage import LocalStore
        meta = array.metadata
        if getattr(meta, "zarr_format", None) != 3 or not isinstance(array.store, LocalStore):
            return None
        codecs = list(meta.to_dict()["codecs"])  # zarr gives tuples
        if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
            return None
        conf = codecs[0]["configuration"]
        inner, index = list(conf["codecs"]), list(conf["index_codecs"])
        shard_shape = tuple(meta.chunk_grid.chunk_shape)
        chunk_shape = tuple(conf["chunk_shape"])
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        endian = (inner[0].get("configuration") or {}).get("endian", "little")  # none: 1 byte
        names = [c["name"] for c in inner]
        if (names not in (["bytes", "blosc"], ["bytes", "blosc", "crc32c"]) or endian != "little"
                or index != [little, {"name": "crc32c"}] or conf["index_location"] != "end"
                or shard_shape[1:] != tuple(array.shape[1:])
                or chunk_shape[1:] != tuple(array.shape[1:]) or shard_shape[0] % chunk_shape[0]):
            return None
        blosc = inner[1]["configuration"]
        shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE,
                   "bitshuffle": Blosc.BITSHUFFLE}[blosc["shuffle"]]
        codec = Blosc(cname=blosc["cname"], clevel=blosc["clevel"], shuffle=shuffle,
                      blocksize=blosc["blocksize"])
        folder = Path(array.store.root) / array.path
        return cls(folder, tuple(array.shape), np.dtype(array.dtype).newbyteorder("<"),
                   chunk_shape[0], shard_shape[0], meta.fill_value, codec, meta.encode_chunk_key,
                   checked=names[-1] == "crc32c", store=Path(array.store.root), name=array.path)

    # ------------------------------------------------------------------ reading
    def tasks(self, start: int, stop: int, out: np.ndarray) -> list[Callable[[], None]]:
        """Callables that together fill `out[:stop - start]` with samples [start, stop): one per
        inner chunk, independent of each other, to be run in any order on any thread."""
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"samples [{start}, {stop}) outside 0..{self.shape[0]}")
        flat = out.reshape(len(out), -1)
        jobs = []
        for k in range(start // self.chunk, -(-stop // self.chunk)):
            a, z = max(start, k * self.chunk), min(stop, (k + 1) * self.chunk)
            jobs.append(lambda k=k, a=a, z=z: self._fill(k, a, z, flat[a - start:z - start]))
        return jobs

    def read(self, start: int, stop: int, pool: Executor | None = None) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), self.dtype)
        run_all(self.tasks(start, stop, out), pool)
        return out

    def _fill(self, k: int, a: int, z: int, dest: np.ndarray) -> None:
        whole = a == k * self.chunk and z == (k + 1) * self.chunk
        raw = self._raw(k)
        if raw is None:
            dest[...] = self.fill
            return
        raw = self._verified(k, raw)
        try:
            if whole and dest.flags.c_contiguous:
                self.codec.decode(raw, out=dest)
            else:
                lo = a - k * self.chunk
                dest[...] = self._decoded(k, raw)[lo:lo + (z - a)]
        except Exception as e:  # Blosc says only "error during blosc decompression: -1"
            raise self._damaged(k, f"it does not decompress ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0][:120]})") from None

    def _verified(self, k: int, raw: bytes) -> bytes | np.ndarray:
        """Chunk k's compressed bytes without their CRC32C, once that matches (when stored)."""
        if not self.checked:
            return raw
        import google_crc32c
        view = np.frombuffer(raw, np.uint8)  # read-only, no copy: google_crc32c takes nothing else
        body, stored = view[:-4], raw[-4:]
        computed = np.uint32(google_crc32c.value(body)).tobytes()  # as zarr's Crc32cCodec
        if computed != stored:
            raise self._damaged(k, f"its CRC32C check fails (stored {stored.hex()}, computed "
                                   f"{computed.hex()})")
        return body

    def _damaged(self, k: int, why: str) -> DamagedChunk:
        j, i = divmod(k * self.chunk, self.shard)
        path = self.folder / self.key((j,) + (0,) * (len(self.shape) - 1))
        return damaged(self.store, self.name, f"{j} ({path})",
                       f"{i // self.chunk} (samples {k * self.chunk}.."
                       f"{min((k + 1) * self.chunk, self.shape[0]) - 1})", why)

    def _decoded(self, k: int, raw: bytes) -> np.ndarray:
        """Chunk k decoded whole; the last one is kept, so reading a chunk in parts (a variable
        whose chunks are longer than the loader's blocks) decodes it once, not once per part."""
        last = self._last
        if last is not None and last[0] == k:
            return last[1]
        full = np.frombuffer(self.codec.decode(raw), self.dtype).reshape(self.chunk, self.sample)
        self._last = (k, full)
        return full

    def _raw(self, k: int) -> bytes | None:
        j, i = divmod(k * self.chunk, self.shard)
        path = self.folder / self.key((j,) + (0,) * (len(self.shape) - 1))
        offset, nbytes = self._shard_index(j, path)[i // self.chunk]
        if offset == _EMPTY and nbytes == _EMPTY:
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = os.pread(fd, int(nbytes), int(offset))
        finally:
            os.close(fd)
        if len(raw) != int(nbytes):
            raise self._damaged(k, f"it is cut short ({len(raw)} of {int(nbytes)} bytes)")
        return raw

    def _shard_index(self, j: int, path: Path) -> np.ndarray:
        index = self._index.get(j)
        if index is not None:
            return index
        import google_crc32c
        n = self.shard // self.chunk
        size = 16 * n + 4
        try:
            with open(path, "rb") as f:
                f.seek(-size, os.SEEK_END)
                tail = f.read(size)
        except OSError as e:
            raise UserError(f"{path}: shard {j} cannot be read ({type(e).__name__}: {e}); the "
                            f"store is damaged or incomplete, prepare it again") from None
        crc = np.uint32(google_crc32c.value(tail[:-4])).tobytes()
        if crc != tail[-4:]:
            raise damaged(self.store, self.name, f"{j} ({path})", "index",
                          f"the shard index fails its CRC32C check (stored {tail[-4:].hex()}, "
                          f"computed {crc.hex()})")
        index = self._index[j] = np.frombuffer(tail[:-4], "<u8").reshape(n, 2)
        return index


def run_all(jobs: list[Callable[[], None]], pool: Executor | None) -> None:
    """Run `jobs` on `pool` (or here, in order) and re-raise the first failure."""
    if pool is None or len(jobs) < 2:
        for job in jobs:
            job()
        return
    for future in [pool.submit(job) for job in jobs]:
        future.result()
