"""ShardReader: shard files read by hand must give exactly what zarr gives, or refuse clearly."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.core.errors import UserError
from pipeline.data.loader import ShardedLoader
from pipeline.data.shards import ShardReader
from pipeline.data.store import open_store

BLOSC = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def _array(path, n=103, chunk=4, shard=16, sample=(3, 5), dtype="float32", write=None,
           compressors=BLOSC, fill_value=0):
    """A sharded array in prepare's layout: n not a multiple of the shard, so the last shard and
    its last chunk are partial."""
    a = zarr.create_array(str(path), shape=(n, *sample), dtype=dtype, chunks=(chunk, *sample),
                          shards=(shard, *sample), compressors=compressors, fill_value=fill_value,
                          config={"write_empty_chunks": False})
    data = np.random.default_rng(1).normal(size=(n, *sample)) * 100
    stop = n if write is None else write
    a[:stop] = data[:stop].astype(dtype)
    return a


@pytest.mark.parametrize("dtype", ["float32", "int16", "float64", "uint8"])
def test_every_range_equals_zarr_serial_and_pooled(tmp_path, dtype):
    a = _array(tmp_path / "a.zarr", dtype=dtype)
    reader = ShardReader.of(a)
    assert reader is not None
    rng = np.random.default_rng(0)
    ranges = [(0, 103), (0, 1), (102, 103), (3, 5), (4, 8), (15, 17), (16, 32), (100, 103)]
    ranges += [tuple(sorted(rng.integers(0, 104, 2))) for _ in range(40)]
    with ThreadPoolExecutor(2) as pool:
        for s, e in ranges:
            want = a[s:e]
            got = reader.read(s, e)
            assert got.dtype == want.dtype and got.shape == want.shape, (s, e)
            np.testing.assert_array_equal(got, want, err_msg=f"[{s}, {e})")
            np.testing.assert_array_equal(reader.read(s, e, pool), want, err_msg=f"[{s}, {e})")


def test_chunks_never_written_read_as_the_fill_value(tmp_path):
    a = _array(tmp_path / "a.zarr", write=6, fill_value=7)        # chunks 2 and 3 of shard 0 empty
    got = ShardReader.of(a).read(0, 16)
    np.testing.assert_array_equal(got, a[0:16])
    assert (got[8:] == 7).all() and not (got[:6] == 7).all()


def test_a_missing_shard_file_is_a_clear_error_not_zeros(tmp_path):
    a = _array(tmp_path / "a.zarr", write=6)                       # shards 1.. never written
    with pytest.raises(UserError, match=r"a\.zarr/c/1/0/0: shard 1 cannot be read .*prepare it "
                                        r"again"):
        ShardReader.of(a).read(10, 20)


def test_a_damaged_shard_index_fails_its_checksum(tmp_path):
    a = _array(tmp_path / "a.zarr")
    shard = tmp_path / "a.zarr" / "c" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF                                               # inside the index
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=r"c/0/0/0\), chunk index: the shard index fails its "
                                        r"CRC32C check .* re-run `hpcforge prepare`"):
        ShardReader.of(a).read(0, 4)


def test_other_layouts_are_left_to_zarr(tmp_path):
    plain = zarr.create_array(str(tmp_path / "plain.zarr"), shape=(8, 2), chunks=(4, 2),
                              dtype="f4", compressors=BLOSC)
    zstd = _array(tmp_path / "zstd.zarr", compressors=ZstdCodec())
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(8, 2), chunks=(4, 2),
                               shards=(8, 2), dtype="f4", compressors=BLOSC)
    split = zarr.create_array(str(tmp_path / "split.zarr"), shape=(8, 4), chunks=(4, 2),
                              shards=(8, 4), dtype="f4", compressors=BLOSC)   # chunked in samples
    assert [ShardReader.of(x) for x in (plain, zstd, memory, split)] == [None] * 4


def test_every_variable_of_a_prepared_store_reads_by_hand(small_store):
    store = open_store(small_store[0])
    for split in ("train", "val"):
        for name, a in store.split(split).items():
            reader = ShardReader.of(a)
            assert reader is not None, f"{split}/{name} is not in prepare's layout"
            np.testing.assert_array_equal(reader.read(0, a.shape[0]), a[:])
            n = a.shape[0]
            np.testing.assert_array_equal(reader.read(n // 3, n - 5), a[n // 3:n - 5])


@pytest.mark.parametrize("threads", [1, 3])
def test_loader_batches_equal_with_and_without_the_fast_path(small_store, threads):
    store = open_store(small_store[0])
    args = dict(inputs={"x": "spins", "e": "energy", "t": "temperature"}, batch_size=32, seed=5,
                normalize="minmax", read_threads=threads)
    fast = ShardedLoader(store, "train", **args)
    slow = ShardedLoader(store, "train", **args)
    slow.readers = dict.fromkeys(slow.readers)                    # every key through zarr
    assert all(r is not None for r in fast.readers.values())
    pairs = list(zip(fast, slow, strict=True))
    assert len(pairs) == len(fast) == 16
    for got, want in pairs:
        for k in args["inputs"]:
            assert torch_equal(got[k], want[k]), k


def torch_equal(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
