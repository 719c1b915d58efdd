"""Integrity on read (issue 14): a damaged chunk of a prepared store is caught before a sample from
it reaches a model, with one line naming the store, array, shard and chunk, and the fix."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import hpcforge, small
from zarr.codecs import BloscCodec

from pipeline.core.errors import UserError
from pipeline.data.loader import ShardedLoader
from pipeline.data.store import open_store

INPUTS = {"x": "spins", "e": "energy", "t": "temperature"}


def _copy(small_store, tmp_path: Path) -> Path:
    """A private copy of the session's store, to damage."""
    return Path(shutil.copytree(small_store[0], tmp_path / "copy.zarr"))


def _largest_shard(array_dir: Path) -> Path:
    return max((p for p in (array_dir / "c").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)


def _flip_in_chunk(shard: Path, chunk: int, n: int, chunks_per_shard: int, head: bool) -> None:
    """Invert `n` bytes in the middle (or at the head) of inner chunk `chunk`'s stored bytes (found
    through the shard's index: one little-endian (offset, nbytes) pair per chunk, then a CRC32C)."""
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(raw[-(16 * chunks_per_shard + 4):-4]), "<u8").reshape(-1, 2)
    offset, nbytes = (int(v) for v in index[chunk])
    assert nbytes > n + 8, f"chunk {chunk} of {shard} has only {nbytes} bytes"
    at = offset if head else offset + (nbytes - n) // 2
    raw[at:at + n] = bytes(b ^ 0xFF for b in raw[at:at + n])
    shard.write_bytes(bytes(raw))


def _damage(store: Path, n: int, head: bool = False) -> tuple[Path, int, str]:
    """Flip `n` bytes in the last inner chunk of train/spins' largest shard file; (that file, its
    shard number, the chunk as the message names it)."""
    a = zarr.open_array(str(store / "train" / "spins"), mode="r")
    shard = _largest_shard(store / "train" / "spins")
    j = int(shard.relative_to(store / "train" / "spins" / "c").parts[0])
    per_shard = a.shards[0] // a.chunks[0]
    _flip_in_chunk(shard, per_shard - 1, n, per_shard, head)
    first = (j + 1) * a.shards[0] - a.chunks[0]
    last = min(first + a.chunks[0], a.shape[0]) - 1
    return shard, j, f"{per_shard - 1} (samples {first}..{last})"


def _epoch(store: Path, fast: bool = True) -> int:
    loader = ShardedLoader(open_store(store), "train", INPUTS, batch_size=32, read_threads=2)
    if not fast:
        loader.readers = dict.fromkeys(loader.readers)   # every key read through zarr
    return sum(len(b["x"]) for b in loader)


@pytest.mark.parametrize("flipped", [4, 256])
def test_flipped_bytes_in_a_shard_stop_the_loader_with_one_line(small_store, tmp_path, flipped):
    store = _copy(small_store, tmp_path)
    shard, j, chunk = _damage(store, flipped)
    with pytest.raises(UserError) as e:
        _epoch(store)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"damaged data in store {store}: array train/spins, shard {j} ({shard}), "
                          f"chunk {chunk}: its CRC32C check fails (stored ")
    assert msg.endswith("re-run `hpcforge prepare` with the same config and "
                        "data.overwrite=true")


def test_flipped_bytes_are_caught_through_zarr_too(small_store, tmp_path):
    store = _copy(small_store, tmp_path)
    shard, j, _ = _damage(store, 4)
    with pytest.raises(UserError, match=rf"damaged data in store {store}: array train/spins, "
                                        rf"shard {j}, chunk .* it does not read back \(ValueError: "
                                        rf"Stored and computed checksum do not match"):
        _epoch(store, fast=False)


def test_an_undamaged_copy_reads_whole(small_store, tmp_path):
    assert _epoch(_copy(small_store, tmp_path)) == 512 // 32 * 32


def test_training_on_a_damaged_store_ends_with_one_line_and_exit_2(small_store, tmp_path):
    store = _copy(small_store, tmp_path)
    _, j, _ = _damage(store, 4)
    r = hpcforge("train", *small(tmp_path / "out", f"data.path={store}", "train.epochs=1",
                                 "train.dist.nproc=1"))
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "hpcforge: error:" in line]  # after tqdm
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"error: damaged data in store {store}: array train/spins, shard {j}" in errors[0]
    assert not (tmp_path / "out" / "train" / "summary.json").exists()


@pytest.mark.slow
def test_on_two_ranks_the_rank_that_meets_the_damage_says_so_once(small_store, tmp_path):
    store = _copy(small_store, tmp_path)
    _, j, _ = _damage(store, 4)
    r = hpcforge("train", *small(tmp_path / "out", f"data.path={store}", "train.epochs=1",
                                 "train.dist.nproc=2"))
    damage = [line for line in r.stderr.splitlines() if "hpcforge: error: damaged data" in line]
    assert r.returncode == 2 and len(damage) == 1, r.stderr[-3000:]  # 2: the user's to fix
    assert f"store {store}: array train/spins, shard {j}" in damage[0]
    assert "Traceback" not in r.stderr and "RuntimeError" not in r.stderr, r.stderr[-3000:]


def _old_layout(store: Path, name: str = "train/spins") -> None:
    """Rewrite one array as prepare wrote it before issue 14: Blosc, no per-chunk CRC32C."""
    old = zarr.open_array(str(store / name), mode="r")
    data, attrs = old[:], dict(old.attrs)
    zarr.open_group(str(store), mode="r+").create_array(
        name, shape=old.shape, dtype=old.dtype, chunks=old.chunks, shards=old.shards,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), overwrite=True,
        config={"write_empty_chunks": True}, attributes=attrs)[:] = data


def test_an_old_store_is_read_with_one_warning_and_a_decode_error_gets_one_line(
        small_store, tmp_path, capsys):
    store = _copy(small_store, tmp_path)
    _old_layout(store)
    assert _epoch(store) == 512 and _epoch(store) == 512
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and (
        f"[hpcforge] warning: store {store} was prepared without per-chunk checksums "
        f"(train/spins): damaged data in it would not be detected; re-run `hpcforge prepare` "
        f"with data.overwrite=true to add them") in out
    shard, j, chunk = _damage(store, 256, head=True)   # mid-chunk flips decode to garbage
    with pytest.raises(UserError, match=rf"^damaged data in store {store}: array train/spins, "
                                        rf"shard {j} .*, chunk {chunk.split()[0]} .*: it does not "
                                        rf"decompress "
                                        rf"\(RuntimeError: error during blosc decompression: -1\); "
                                        rf"restore that file"):
        _epoch(store)
