"""Loader benchmarks (issue 3, 3 to 5), each against a baseline in the same run.

3. decoded MB/s of the loader over one epoch ÷ raw MB/s reading the same store's files
   (page cache warm: the files are read once before timing).
4. loader samples/s ÷ a naive map-style Dataset doing `zarr_array[i]` per sample (random order).
5. data-wait fraction (time waiting for batches ÷ wait + step) while the demo VAE trains on 1 rank
   from the loader; its baseline is the whole step (1.0).
14. integrity cost (issue 14): loader decoded MB/s with every chunk's CRC32C checked ÷ the same
   data stored without a CRC32C (the layout prepare wrote before), epochs interleaved.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

from benchmarks.data_prepare import SAMPLE, import_overrides, row, write_fields


def _fields_store(tmp: Path, n: int) -> Path:
    from pipeline.config import load_config
    from pipeline.data.prepare import prepare
    npy = write_fields(tmp / "field.npy", n)
    cfg = load_config("demo", import_overrides(tmp, npy, 1024, "data.dask.n_workers=2"))
    return prepare(cfg.data, cfg.to_dict(), log=lambda *a: None)


def _raw_read(folder: Path) -> tuple[float, int]:
    """Seconds and bytes to read every file under `folder` (after one warming read)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    for p in files:
        p.read_bytes()
    t0 = time.perf_counter()
    size = sum(len(p.read_bytes()) for p in files)
    return time.perf_counter() - t0, size


def _epoch(loader) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(len(b["x"]) for b in loader)
    return time.perf_counter() - t0, n


def bench_read(store, path: Path) -> list[dict]:
    from pipeline.data.loader import ShardedLoader
    loader = ShardedLoader(store, "train", {"x": "field"}, batch_size=256, normalize="none")
    _epoch(loader)                                            # warm: page cache and imports
    seconds, n = _epoch(loader)
    decoded = n * 4 * int(np.prod(SAMPLE)) / seconds / 1e6
    raw_s, raw_bytes = _raw_read(path / "train")
    raw = raw_bytes / raw_s / 1e6
    return [row("data-read", "loader decoded / raw", decoded, raw, "MB/s", ">= 0.5",
                f"loader decoded MB/s (batch 256, one epoch of {n}) / raw read MB/s of the "
                f"store's files ({raw_bytes >> 20} MiB on disk), page cache warm")]


def _without_crc(path: Path, copy: Path) -> Path:
    """A copy of the store whose train/field is stored as before issue 14: Blosc, no CRC32C."""
    import zarr
    from zarr.codecs import BloscCodec
    shutil.copytree(path, copy)
    old = zarr.open_array(str(path / "train" / "field"), mode="r")
    plain = zarr.open_group(str(copy), mode="r+").create_array(
        "train/field", shape=old.shape, dtype=old.dtype, chunks=old.chunks, shards=old.shards,
        compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), overwrite=True,
        config={"write_empty_chunks": True}, attributes=dict(old.attrs))
    plain[:] = old[:]
    return copy


def bench_integrity(store, path: Path, quick: bool) -> list[dict]:
    """Checked / unchecked loader throughput: one epoch each per round, which goes first
    alternating, so both sides see the same machine load; the median of the per-round ratios of
    wall-clock MB/s is the row's value, and the ratio of CPU seconds (all threads of this
    process: steadier than wall time on a busy machine) is given beside it. No read-ahead, so
    neither loader reads while the other is timed."""
    from pipeline.data.loader import ShardedLoader
    from pipeline.data.store import open_store
    plain = open_store(_without_crc(path, path.with_name("plain.zarr")))
    loaders = [ShardedLoader(s, "train", {"x": "field"}, batch_size=256, normalize="none",
                             read_ahead=False) for s in (store, plain)]
    assert [ld.readers["x"].checked for ld in loaders] == [True, False]
    for ld in loaders:
        _epoch(ld)                                            # warm: page cache and pools
    wall: list[list[float]] = [[], []]
    cpu = [0.0, 0.0]
    for r in range(5 if quick else 15):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            c0 = time.process_time()
            seconds, n = _epoch(loaders[i])
            cpu[i] += time.process_time() - c0
            wall[i].append(n * 4 * int(np.prod(SAMPLE)) / seconds / 1e6)
    ratios = sorted(a / b for a, b in zip(*wall))
    return [row("data-crc32c", "CRC32C on / off", median(ratios), 1.0, "x", ">= 0.9",
                f"loader decoded MB/s with each chunk's CRC32C checked / the same data without "
                f"one (as prepared before issue 14): median of {len(ratios)} interleaved rounds' "
                f"ratios (range {ratios[0]:.2f}-{ratios[-1]:.2f}; median MB/s on "
                f"{median(wall[0]):.0f}, off {median(wall[1]):.0f}); CPU seconds off / on "
                f"{cpu[1] / cpu[0]:.3f}")]


def bench_naive(store, quick: bool) -> list[dict]:
    from pipeline.data.loader import ShardedLoader
    loader = ShardedLoader(store, "train", {"x": "field"}, batch_size=256, normalize="none")
    seconds, n = _epoch(loader)
    array = store.split("train")["field"]
    idx = np.random.default_rng(0).permutation(array.shape[0])[:200 if quick else 1000]
    t0 = time.perf_counter()
    for i in idx:                                             # a map-style Dataset's __getitem__
        array[int(i)]
    naive = len(idx) / (time.perf_counter() - t0)
    return [row("data-loader", "loader / zarr[i] Dataset", n / seconds, naive, "smp/s", ">= 100",
                "loader samples/s (block reads, shuffle buffer, prefetch) / naive per-sample "
                "zarr_array[i] samples/s, random order")]


def bench_wait(quick: bool) -> list[dict]:
    """The demo VAE (16x16 Ising) trained from the loader on 1 rank: its data-wait fraction."""
    import torch

    from models import MODELS
    from pipeline.config import load_config
    from pipeline.data.loader import ShardedLoader
    from pipeline.data.prepare import prepare
    from pipeline.data.store import open_store
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("demo", [f"output_dir={tmp}", "data.params.lattice=16",
                                   "data.params.burn_in=20", "data.n_samples=4096",
                                   "data.chunk_size=512", "data.dask.progress=false",
                                   "model.image_size=16"])
        store = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
        model = MODELS[cfg.model.name][1](cfg.model.params)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        loader = ShardedLoader(store, "train", cfg.data.inputs, batch_size=cfg.train.batch_size,
                               normalize=cfg.data.normalize, prefetch=cfg.train.prefetch)
        steps, done, t0 = (30 if quick else 150), 0, time.perf_counter()
        while done < steps:                                   # epochs until `steps` steps
            done += _steps(model, opt, loader, steps - done)
        seconds = time.perf_counter() - t0
    return [row("data-wait", "demo VAE, 1 rank", loader.data_wait_fraction(), 1.0, "frac",
                "< 0.05", f"time waiting for batches / step time, {steps} steps of "
                f"{cfg.train.batch_size} ({steps / seconds:.1f} steps/s)")]


def _steps(model, opt, loader, steps: int) -> int:
    done = 0
    for batch in loader:
        opt.zero_grad()
        model.losses(batch, "model")["loss"].backward()
        opt.step()
        done += 1
        if done == steps:
            break
    return done


def bench_data_loader(quick: bool) -> list[dict]:
    from pipeline.data.store import open_store
    with tempfile.TemporaryDirectory() as tmp:
        path = _fields_store(Path(tmp), 16384 if quick else 65536)
        store = open_store(path)
        rows = (bench_read(store, path) + bench_integrity(store, path, quick)
                + bench_naive(store, quick))
    return rows + bench_wait(quick)
