"""The seeded Feistel permutation behind the global shuffle, and the budget that sizes shards."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.core.errors import UserError
from pipeline.data.prepare import (PASS2_COPIES, TASK_MIN_BYTES, WORKER_BASE, Permutation,
                                   destinations, group_chunks, make_layout, piece_table,
                                   sample_bytes, scatter_chunk, shard_pieces, size_shards,
                                   task_memory, write_shard)
from pipeline.sources import SOURCES


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097, 100_003])
def test_feistel_is_a_permutation_of_range_n(n):
    out = destinations(seed=5, n=n)
    assert out.dtype == np.int64 and len(out) == n
    np.testing.assert_array_equal(np.sort(out), np.arange(n))


def test_permutation_is_a_pure_function_of_seed_and_any_range_agrees():
    n = 10_000
    full = destinations(3, n)
    np.testing.assert_array_equal(full, destinations(3, n))                 # same seed, same
    assert not np.array_equal(full, destinations(4, n))                     # other seed differs
    pieces = [destinations(3, n, a, min(a + 999, n)) for a in range(0, n, 999)]
    np.testing.assert_array_equal(np.concatenate(pieces), full)             # per-chunk = whole
    assert abs(np.corrcoef(np.arange(n), full)[0, 1]) < 0.05                # no visible order
    # consecutive inputs land far apart (what a shuffle is for): median jump ~ n/3
    assert np.median(np.abs(np.diff(full))) > n / 5


def test_permutation_walks_few_steps_at_a_large_n():
    p = Permutation(0, 10**9 + 7)
    out = p(np.arange(10**9, 10**9 + 7))
    assert ((out >= 0) & (out < p.n)).all() and len(set(out.tolist())) == 7


def test_shards_are_sized_from_the_memory_budget():
    cfg = load_config("demo", ["data=darcy2d", "data.memory_budget=1GiB", "data.dask.n_workers=2"])
    variables = SOURCES["darcy2d"].variables(cfg.data.params)
    per_task = task_memory(cfg.data, 2, 2)
    assert per_task == ((1 << 30) - 2 * WORKER_BASE) // 2
    shard = size_shards(cfg.data, variables, 10**7, per_task)
    assert shard * sample_bytes(variables) * PASS2_COPIES <= per_task      # fits
    assert (shard + 256) * sample_bytes(variables) * PASS2_COPIES > per_task  # and uses it
    assert size_shards(cfg.data, variables, 100, per_task) == 256   # a small set: one inner chunk
    bigger = load_config("demo", ["data=darcy2d", "data.memory_budget=4GiB"])
    assert size_shards(bigger.data, variables, 10**7, task_memory(bigger.data, 2, 2)) > shard


@pytest.mark.parametrize("override, message", [
    ("data.memory_budget=300MiB", r"data.memory_budget=300MiB: 2 Dask workers take ~400 MiB idle"),
    ("data.memory_budget=lots", r"data.memory_budget='lots': expected a size like 2GiB"),
    ("data.shard_size=10000000", r"data.shard_size=10000000: a shard of \d+ MiB does not fit "
                                 r"data.memory_budget=2GiB per task; expected <= \d+"),
])
def test_budget_errors_name_value_and_fix(override, message):
    cfg = load_config("demo", ["data=darcy2d", override])
    variables = SOURCES["darcy2d"].variables(cfg.data.params)
    with pytest.raises(UserError, match=message):
        size_shards(cfg.data, variables, 10**8, task_memory(cfg.data, 2, 2))


def test_layout_with_no_shard_size_uses_one_shard_per_split():
    cfg = load_config("demo", ["data.n_samples=1000", "data.shard_size=0"])
    assert make_layout(cfg.data).shard_size == 1000
    assert make_layout(cfg.data, shard_size=300).shards()[:2] == [("train", 0, 0, 300),
                                                                  ("train", 1, 300, 600)]


def test_small_chunks_are_grouped_per_task_but_every_slot_keeps_work():
    chunks = list(range(512))
    tiny = group_chunks(chunks, 512 << 10, slots=2)           # 512 KiB chunks, 2 slots
    assert [c for g in tiny for c in g] == chunks              # every chunk once, in order
    assert len(tiny) == 16 and {len(g) for g in tiny} == {32}  # 32 x 512 KiB = 16 MiB a task
    wide = group_chunks(chunks, 512 << 10, slots=16)
    assert len(wide) == 64 and {len(g) for g in wide} == {8}  # balance: 4 tasks a slot at least
    assert len(group_chunks(chunks, 512 << 10, slots=128)) == 512   # many slots: no grouping
    big = group_chunks(chunks, TASK_MIN_BYTES, slots=2)
    assert len(big) == 512                                     # chunks of 16 MiB: one per task
    assert group_chunks(chunks, TASK_MIN_BYTES // 4, slots=1) == [chunks[i:i + 4]
                                                                  for i in range(0, 512, 4)]
    assert group_chunks([3, 7, 9], 1, slots=2) == [[3], [7], [9]]   # resume: what is left


def test_pass1_writes_one_file_per_chunk_and_pass2_gathers_each_shard(tmp_path, monkeypatch):
    """Scatter 6 chunks of a 2-split layout, then gather every shard: its samples are the ones
    the permutation sends there, in position order; scratch holds 6 chunk files, not 6 x 7."""
    cfg = load_config("demo", ["data.n_samples=96", "data.chunk_size=16", "data.val_fraction=0.25",
                               "data.params.lattice=8", "data.params.burn_in=2"]).data
    variables = SOURCES["ising2d"].variables(cfg.params)
    layout = make_layout(cfg, 96, shard_size=16)
    scratch = tmp_path / "scratch"
    results = [scatter_chunk(cfg, layout, i, variables, str(scratch)) for i in range(6)]
    assert sorted(p.name for p in (scratch / "pieces").iterdir()) == [
        f"{i:08d}.bin" for i in range(6)]
    whole = {k: np.concatenate([SOURCES["ising2d"].generate(cfg.params, cfg.seed, i, 16 * i, 16)[k]
                                for i in range(6)]) for k in variables}
    where = destinations(cfg.seed, 96, 0, 96)
    written = {}
    monkeypatch.setattr("pipeline.data.prepare.write_region",       # keep what would be written
                        lambda path, split, a, b, arrays: written.update({(split, a): arrays}))
    table = piece_table(results)
    for split, j, a, b in layout.shards():
        pieces = shard_pieces(table, split, a // 16, (b - 1) // 16)
        assert len(pieces) <= 6                                 # one piece per chunk at most
        write_shard("unused", str(scratch), split, j, a, b, None, pieces, variables)
    assert len(written) == len(layout.shards()) == 5 + 2     # 72 train + 24 val, 16 a shard
    for (split, a), arrays in written.items():
        lo = layout.split_start(split)
        order = np.argsort(where)[lo + a:lo + a + len(arrays["spins"])]  # samples sent to a..b
        for k in variables:
            np.testing.assert_array_equal(arrays[k], whole[k][order], err_msg=f"{split}/{a}/{k}")
