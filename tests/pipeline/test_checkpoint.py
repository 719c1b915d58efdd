"""Atomic checkpoints: a failed write leaves the previous checkpoint whole."""
from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import load, save_atomic


def test_round_trip_with_safe_loader(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "step": 7, "config": {"a": [1, 2]}}
    path = save_atomic(state, tmp_path / "ck" / "last.pt")
    back = load(path)
    assert back["step"] == 7 and torch.equal(back["model"]["w"], torch.arange(4.0))
    assert back["config"] == {"a": [1, 2]}


def test_failed_write_keeps_the_old_checkpoint(tmp_path):
    path = save_atomic({"step": 1}, tmp_path / "last.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated by an object that cannot be written)")

    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"step": 2, "bad": Unpicklable()}, path)
    assert load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]   # no temp file left


def test_safe_loader_refuses_pickled_code(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path, pickle_module=pickle)
    with pytest.raises(pickle.UnpicklingError):
        load(path)
