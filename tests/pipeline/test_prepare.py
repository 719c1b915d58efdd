"""`prepare` on a real Dask LocalCluster into a real Zarr v3 store on disk."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import zarr
from helpers import small

from pipeline.config import load_config
from pipeline.core.errors import UserError
from pipeline.data.prepare import make_layout, prepare
from pipeline.data.store import SPLITS, open_store
from pipeline.sources import ising2d


def _sample_hashes(arrays: dict[str, np.ndarray]) -> list[str]:
    n = len(next(iter(arrays.values())))
    return sorted(hashlib.sha256(b"".join(arrays[k][i].tobytes() for k in sorted(arrays))).hexdigest()
                  for i in range(n))


def test_store_has_arrays_shapes_splits_and_attributes(small_store):
    path, overrides = small_store
    store = open_store(path)
    meta = store.meta
    assert meta.complete is True and meta.format == "hpcforge-zarr"
    assert meta.splits == {"train": 512, "val": 128, "test": 0}
    assert meta.config["data"]["params"]["lattice"] == 16     # resolved config stored
    assert meta.shuffle["seed"] == 0 and meta.shuffle["tasks"] == 10 + 5  # n_in + n_out
    assert set(meta.checksums) == {"train/0", "train/1", "train/2", "train/3", "val/0"}
    train = store.split("train")
    assert set(train) == {"spins", "temperature", "phase", "magnetization", "energy"}
    assert train["spins"].shape == (512, 1, 16, 16) and train["spins"].dtype == np.int8
    assert train["spins"].shards == (128, 1, 16, 16)
    assert zarr.open_group(str(path), mode="r").metadata.zarr_format == 3
    assert "spins" in meta.stats["train"] and meta.versions["zarr"] == zarr.__version__


def test_shuffle_is_a_permutation_of_the_generated_samples(small_store):
    """Every generated sample lands in exactly one split, once (hash multisets equal)."""
    path, overrides = small_store
    cfg = load_config("demo", overrides)
    layout = make_layout(cfg.data)
    direct = [ising2d.generate(cfg.data.params, cfg.data.seed, i, 64 * i, min(64, 640 - 64 * i))
              for i in range(layout.n_chunks)]
    generated = {k: np.concatenate([d[k] for d in direct]) for k in direct[0]}
    store = open_store(path)
    stored = {k: np.concatenate([store.split(s)[k][:] for s in ("train", "val")]) for k in generated}
    assert _sample_hashes(stored) == _sample_hashes(generated)
    # and it really is shuffled: the stored order is not the generated order
    assert not np.array_equal(stored["spins"][:64], generated["spins"][:64])


def test_statistics_equal_numpy(small_store):
    store = open_store(small_store[0])
    for var in ("spins", "energy", "magnetization"):
        x = store.split("train")[var][:].astype(np.float64)
        st = store.stats("train", var)
        axes = (0, 2, 3) if x.ndim == 4 else (0,)
        np.testing.assert_allclose(st["mean"], np.atleast_1d(x.mean(axis=axes)), rtol=1e-10)
        np.testing.assert_allclose(st["std"], np.atleast_1d(x.std(axis=axes)), rtol=1e-8)
        np.testing.assert_allclose(st["min"], np.atleast_1d(x.min(axis=axes)))
        np.testing.assert_allclose(st["max"], np.atleast_1d(x.max(axis=axes)))
    phase = store.split("train")["phase"][:]
    counts = store.stats("train", "phase")["class_counts"]
    assert counts == {str(c): int((phase == c).sum()) for c in np.unique(phase)}


def test_same_seed_same_store_whatever_the_worker_count(small_store, tmp_path):
    """Determinism: 1 worker reproduces the 2-worker store bit for bit; another seed differs."""
    path, _ = small_store
    cfg = load_config("demo", small(tmp_path, "data.dask.n_workers=1"))
    again = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    assert again.meta.checksums == open_store(path).meta.checksums
    cfg = load_config("demo", small(tmp_path, "data.seed=1", "data.overwrite=true"))
    other = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    assert other.meta.checksums != open_store(path).meta.checksums


def test_a_finished_prepare_of_the_same_config_is_a_no_op_that_says_so(small_store):
    """Scripts re-run whole pipelines (issue 24): the same config finds its store done, keeps it
    as it is and says so; another config is refused without data.overwrite, the store kept."""
    path, overrides = small_store
    before = (json.dumps(open_store(path).meta.checksums), path.stat().st_mtime_ns)
    cfg = load_config("demo", overrides)
    said = []
    assert prepare(cfg.data, cfg.to_dict(), log=said.append) == path
    assert len(said) == 1 and "already holds this dataset" in said[0] and "nothing to do" in said[0]
    cfg = load_config("demo", [*overrides, "data.seed=1"])
    with pytest.raises(UserError, match=r"already exists with another config \(data.seed: 0 there, "
                                        r"1 now\); pass data.overwrite=true"):
        prepare(cfg.data, cfg.to_dict())
    assert (json.dumps(open_store(path).meta.checksums), path.stat().st_mtime_ns) == before


def test_incomplete_or_foreign_stores_are_refused(small_store, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store[0], copy)
    root = zarr.open_group(str(copy), mode="r+")
    root.attrs["hpcforge"] = {**root.attrs["hpcforge"], "complete": False}
    with pytest.raises(UserError, match=r"is incomplete .* data.overwrite=true to redo it"):
        open_store(copy)
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("x", shape=(3,), dtype="f4")
    with pytest.raises(UserError, match="was not written by hpcforge"):
        open_store(foreign)
    with pytest.raises(UserError, match="no dataset at .*run `hpcforge prepare`"):
        open_store(tmp_path / "missing.zarr")


@pytest.mark.parametrize("override, message", [
    ("data.val_fraction=0.9", "expected each in [0, 1) and a sum below 1"),
    ("data.chunk_size=0", "data.chunk_size=0: expected at least 1"),  # refused as the config loads
])
def test_bad_layout_is_refused_before_work(tmp_path, override, message):
    with pytest.raises(UserError) as e:
        cfg = load_config("demo", small(tmp_path, override, "data.test_fraction=0.2"))
        prepare(cfg.data, cfg.to_dict())
    assert message in str(e.value)
    assert not any(tmp_path.rglob("*.zarr*"))  # nothing half-written


def test_split_fractions_partition_samples():
    cfg = load_config("demo", ["data.n_samples=1000", "data.val_fraction=0.15",
                               "data.test_fraction=0.05"])
    layout = make_layout(cfg.data)
    assert layout.splits == {"train": 800, "val": 150, "test": 50}
    shards = layout.shards()
    for split in SPLITS:
        covered = sorted((a, b) for s, _, a, b in shards if s == split)
        assert sum(b - a for a, b in covered) == layout.splits[split]


def test_prepare_help_lists_every_source_and_importer_with_an_example_that_composes():
    """The epilog comes from the registry; each example's overrides load as a config."""
    import shlex

    from helpers import hpcforge

    from pipeline.sources import IMPORTERS, SOURCES
    run = hpcforge("prepare", "--help", timeout=60)
    assert run.returncode == 0, run.stderr
    examples = [line.split("hpcforge prepare ", 1)[1] for line in run.stdout.splitlines()
                if line.strip().startswith("hpcforge prepare ")]
    (label_from,) = [e for e in examples if "data.params.label_from=" in e]   # issue #16's
    examples.remove(label_from)
    assert load_config("demo", shlex.split(label_from)).data.params.label_from == "parent_dir"
    assert len(examples) == len(SOURCES)                   # one example each
    for name in SOURCES:
        assert f"\n  {name:<9} " in run.stdout, name
        (example,) = [e for e in examples if f"data={name}" in e.split()
                      or f"data.source={name}" in e.split()]
        cfg = load_config("demo", shlex.split(example))
        assert cfg.data.source == name
    assert "(N, 1)" in run.stdout and "NetCDF-3" in run.stdout and len(IMPORTERS) == 4
