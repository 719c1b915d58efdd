"""Atomic checkpoints: a failed write leaves the previous checkpoint whole."""
from __future__ import annotations

import pytest
import torch

from pipeline.checkpoint import Checkpoints, load, save_atomic


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


def test_background_write_keeps_the_state_as_it_was_at_save_time(tmp_path):
    ck = Checkpoints(tmp_path, keep=2, best_metric="val/loss", background=True)
    w = torch.zeros(1000)
    history = [{"step": 1.0}]
    path = ck.save({"model": {"w": w}, "history": history}, 1, {"val/loss": 2.0})
    w += 1                                   # training goes on while the file is written
    history.append({"step": 2.0})
    ck.wait()
    back = load(path)
    assert path.name == "step-00000001.pt" and torch.equal(back["model"]["w"], torch.zeros(1000))
    assert back["history"] == [{"step": 1.0}]
    for step, loss in ((2, 3.0), (3, 1.0)):
        ck.save({"model": {"w": w + step}}, step, {"val/loss": loss})
    ck.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "last.pt", "step-00000002.pt", "step-00000003.pt"]   # keep=2, then links
    assert torch.equal(load(tmp_path / "best.pt")["model"]["w"], w + 3)  # loss 1.0 is best
    assert load(tmp_path / "last.pt")["model"]["w"][0] == 1 + 3


def test_background_write_error_surfaces_at_wait_and_keeps_the_old_file(tmp_path):
    ck = Checkpoints(tmp_path, background=True)
    ck.save({"step": 1}, 1, {})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full (simulated by an object that cannot be written)")

    ck.save({"step": 2, "bad": Unpicklable()}, 2, {})      # returns: the write fails later
    with pytest.raises(RuntimeError, match="disk full"):
        ck.wait()
    assert load(tmp_path / "last.pt")["step"] == 1
    ck.wait()                                               # reported once, then clear
