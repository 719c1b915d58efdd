"""The per-rank loader over a real store: coverage, determinism, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.loader import ShardedLoader
from pipeline.data.store import open_store

INPUTS = {"x": "spins", "e": "energy"}


def _loader(store, rank=0, world_size=1, **kw):
    args = dict(inputs=INPUTS, batch_size=32, rank=rank, world_size=world_size, seed=3, normalize="minmax")
    return ShardedLoader(store, "train", **{**args, **kw})


def _energies(loader) -> np.ndarray:
    return np.concatenate([b["e"].numpy() for b in loader])


def test_two_ranks_cover_every_sample_once_per_epoch(small_store):
    store = open_store(small_store[0])
    everything = np.sort(store.split("train")["energy"][:])
    seen = [_energies(_loader(store, r, 2)) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 256            # equal counts per rank
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), everything)


@pytest.mark.parametrize("ranks, batch", [(1, 48), (3, 40)])
def test_keeping_the_tail_reads_every_sample_once_with_a_partial_last_batch(small_store, ranks,
                                                                           batch):
    """drop_last=False (evaluation, issue 24): 512 train samples in batches of 48 on 1 rank are
    10 full batches and one of 32; on 3 ranks the last rank also reads the 2 left over."""
    store = open_store(small_store[0])
    everything = np.sort(store.split("train")["energy"][:])
    loaders = [_loader(store, r, ranks, batch_size=batch, drop_last=False) for r in range(ranks)]
    seen = [[b["e"].numpy() for b in loader] for loader in loaders]
    np.testing.assert_array_equal(np.sort(np.concatenate([np.concatenate(s) for s in seen])),
                                  everything)
    for loader, batches in zip(loaders, seen):
        assert len(batches) == len(loader) and all(len(b) == batch for b in batches[:-1])
    assert len(seen[-1][-1]) == (512 - 512 // ranks * (ranks - 1)) % batch
    assert len(_loader(store, batch_size=batch)) == 512 // batch        # training: as before


def test_several_variables_as_one_input_are_each_normalised_flattened_and_joined(small_store):
    """data.inputs.x=[spins, energy] (issue 24): one (B, 16*16 + 1) input, each part normalised by
    its own statistics, in the order listed; the same samples as the parts read alone."""
    store = open_store(small_store[0])
    joined = _loader(store, inputs={"x": ["spins", "energy"], "e": "energy"}, normalize="standard")
    alone = _loader(store, inputs={"s": "spins", "e": "energy"}, normalize="standard")
    (a, b) = (next(iter(joined)), next(iter(alone)))
    assert a["x"].shape == (32, 257) and a["x"].dtype == torch.float32
    torch.testing.assert_close(a["x"][:, :256], b["s"].reshape(32, 256))
    mean, std = (np.asarray(store.stats("train", "energy")[k]).item() for k in ("mean", "std"))
    torch.testing.assert_close(a["x"][:, 256], ((b["e"].double() - mean) / std).float())


def test_order_is_a_pure_function_of_seed_epoch_rank(small_store):
    store = open_store(small_store[0])
    a, b = _loader(store), _loader(store)
    epoch0 = _energies(a)
    np.testing.assert_array_equal(epoch0, _energies(b))
    assert a.state_dict() == {"epoch": 1, "batch": 0}             # a finished epoch points at the next
    c = _loader(store)
    c.set_epoch(1)
    epoch1 = _energies(c)
    assert not np.array_equal(epoch0, epoch1)                     # new order each epoch
    np.testing.assert_array_equal(np.sort(epoch0), np.sort(epoch1))
    assert sorted(_loader(store, 0, 2).segments(0)) != sorted(_loader(store, 0, 2).segments(1))


def test_mid_epoch_resume_continues_the_same_order(small_store):
    store = open_store(small_store[0])
    full = _energies(_loader(store))
    first = _loader(store)
    it = iter(first)
    head = [next(it)["e"].numpy() for _ in range(5)]
    state = first.state_dict()
    assert state == {"epoch": 0, "batch": 5}
    resumed = _loader(store)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(np.concatenate(head + [_energies(resumed)]), full)


@pytest.mark.parametrize("batch_size", [32, 24])  # 24: groups of 128 samples carry a remainder
def test_resume_at_every_batch_across_groups(small_store, batch_size):
    """One block per group (128 samples): resuming at any batch, inside a group or at its edge,
    yields exactly the rest of the epoch, and the epoch ends with the state at the next one."""
    store = open_store(small_store[0])
    make = lambda: _loader(store, batch_size=batch_size, buffer_blocks=1)  # noqa: E731
    batches = [b["e"].numpy() for b in make()]
    assert len(batches) == len(make()) == 512 // batch_size
    for at in range(len(batches)):
        resumed = make()
        resumed.load_state_dict({"epoch": 0, "batch": at})
        rest = [b["e"].numpy() for b in resumed]
        assert len(rest) == len(batches) - at
        np.testing.assert_array_equal(np.concatenate(rest), np.concatenate(batches[at:]))
        assert resumed.state_dict() == {"epoch": 1, "batch": 0}


def test_minmax_normalisation_uses_stored_statistics(small_store):
    store = open_store(small_store[0])
    batch = next(iter(_loader(store)))
    assert batch["x"].dtype == torch.float32 and batch["x"].shape == (32, 1, 16, 16)
    assert set(torch.unique(batch["x"]).tolist()) <= {0.0, 1.0}   # spins -1/+1 -> 0/1
    assert batch["e"].dtype == torch.float32                       # scalars left as stored


def test_too_few_samples_for_a_batch_is_a_clear_error(small_store):
    store = open_store(small_store[0])
    with pytest.raises(ValueError, match="give no full batch of 4096; lower train.batch_size"):
        _loader(store, batch_size=4096)


def test_data_wait_fraction_is_wait_over_wait_plus_step_time(small_store):
    import time
    store = open_store(small_store[0])
    loader = _loader(store, prefetch=1)
    assert loader.data_wait_fraction() == 0.0
    for _ in loader:
        time.sleep(0.01)                                  # a 10 ms "step": reading keeps ahead
    frac = loader.data_wait_fraction()
    assert 0.0 < frac < 0.5
    assert frac == pytest.approx(loader.wait_s / (loader.wait_s + loader.busy_s))
    assert loader.busy_s >= 0.01 * (len(loader) - 1)


def test_pinned_memory_gpu_mocked(small_store, monkeypatch):
    """No GPU here: torch.cuda.is_available and Tensor.pin_memory are mocked. (The non-blocking
    copy of a pinned batch is the trainer's.)"""
    pinned = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t.shape) or t)
    store = open_store(small_store[0])
    loader = _loader(store)
    assert loader.pin_memory is True                      # auto: on when CUDA is present
    batch = next(iter(loader))
    assert len(pinned) >= 2                               # each key's buffer, in the thread,
    assert all(shape[0] >= 32 for shape in pinned)        # pinned whole: batches are its slices
    assert (1, 16, 16) in {shape[1:] for shape in pinned} and (32, 1, 16, 16) == batch["x"].shape
    assert set(batch) == {"x", "e"}
    assert _loader(store, pin_memory=False).pin_memory is False


def test_next_epoch_read_ahead_gives_the_same_batches(small_store, monkeypatch):
    """The first group of epoch e+1 is read while epoch e ends; what it yields (from the start, or
    resumed inside the epoch) equals a fresh loader's, and an epoch it was not read for ignores it."""
    store = open_store(small_store[0])
    calls: list[tuple[int, str]] = []
    groups = ShardedLoader._groups

    def counted(self, epoch, pool=None):
        import threading
        calls.append((epoch, threading.current_thread().name))
        return groups(self, epoch, pool)
    monkeypatch.setattr(ShardedLoader, "_groups", counted)

    def epoch_of(loader, epoch, batch=0):
        loader.load_state_dict({"epoch": epoch, "batch": batch})
        return _energies(loader)
    fresh = {e: epoch_of(_loader(store, buffer_blocks=1), e) for e in (1, 2, 5)}
    reused = _loader(store, buffer_blocks=1)
    epoch_of(reused, 0)
    calls.clear()
    np.testing.assert_array_equal(epoch_of(reused, 1), fresh[1])    # from the read-ahead
    np.testing.assert_array_equal(epoch_of(reused, 2, batch=3), fresh[2][3 * 32:])
    np.testing.assert_array_equal(epoch_of(reused, 5), fresh[5])    # epoch 3 was read ahead
    # epoch 1 was read ahead during epoch 0; each read-ahead runs in the producer thread
    ahead = [(e, name == "hpcforge-loader") for e, name in calls]
    assert ahead == [(2, True), (3, True), (5, False), (6, True)]
    no_ahead = _loader(store, buffer_blocks=1, read_ahead=False)
    epoch_of(no_ahead, 0)
    calls.clear()
    epoch_of(no_ahead, 0)
    assert [e for e, _ in calls] == [0]
