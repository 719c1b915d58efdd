"""Atomic checkpoints: a failed write leaves the previous checkpoint whole."""
from __future__ import annotations

import pytest
import torch

from pipeline.core.checkpoint import Checkpoints, DamagedCheckpoint, load, save_atomic
from pipeline.core.errors import UserError


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


# --------------------------------------------------------------------------- integrity (issue 14)
def _real_state(width: int = 64) -> dict:
    """A model's and its Adam optimizer's state after one step, as the trainer saves them."""
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 1))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, width)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizers": {"model": opt.state_dict()}, "step": 1,
            "config": {"model": {"name": "mlp"}}}


def _flip_in_largest_record(path, n: int = 4) -> str:
    """Invert `n` bytes in the middle of the checkpoint's largest tensor record (torch.save's zip
    archive: each record's data follows a 30-byte local header, its name and its extra field)."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    raw[at:at + n] = bytes(b ^ 0xFF for b in raw[at:at + n])
    path.write_bytes(bytes(raw))
    return info.filename


def test_a_damaged_checkpoint_is_refused_with_the_record_named(tmp_path):
    path = save_atomic(_real_state(), tmp_path / "step.pt")
    record = _flip_in_largest_record(path)
    with pytest.raises(UserError, match=rf"checkpoint {path} is damaged: its record '{record}' "
                                        rf"fails its CRC32 check \(the file changed after it was "
                                        rf"written\); use an older checkpoint or train again"):
        load(path)


def test_resume_auto_passes_over_a_damaged_newest_checkpoint(tmp_path):
    ck = Checkpoints(tmp_path, keep=3)
    for step in (1, 2):
        ck.save({**_real_state(), "step": step}, step, {})
    newest = tmp_path / "step-00000002.pt"
    _flip_in_largest_record(newest)
    said: list[str] = []
    path, state = ck.latest_valid(log=said.append)
    assert path.name == "step-00000001.pt" and state["step"] == 1
    assert len(said) == 1 and said[0].startswith(
        f"[hpcforge] skipping damaged checkpoint {newest} (checkpoint {newest} is damaged: its "
        f"record ")


@pytest.mark.parametrize("kind, words", [
    ("empty", "is empty (0 bytes)"),
    ("truncated", "is cut short ({} bytes, the end of the archive torch.save writes is missing)"),
    ("text", "is a text file (it begins 'step,loss'), not a file torch.save wrote")])
def test_an_unreadable_checkpoint_is_described_in_plain_words(tmp_path, kind, words):
    """Issue 24: a truncated checkpoint said "(OSError: [Errno 22] Invalid argument)", a text
    file "(KeyError: 101)"."""
    path = save_atomic(_real_state(), tmp_path / "final.pt")
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[:len(raw) // 2],
                      "text": b"step,loss\n1,0.5\n"}[kind])
    with pytest.raises(DamagedCheckpoint) as e:
        load(path)
    assert str(e.value).startswith(f"{path} is not a readable hpcforge checkpoint: it "
                                   f"{words.format(len(raw) // 2)}"), str(e.value)
    assert str(e.value).endswith("or train again")


def test_evaluate_on_a_damaged_checkpoint_is_one_line_exit_2(tmp_path):
    from helpers import hpcforge
    path = save_atomic({**_real_state(), "config": {}}, tmp_path / "final.pt")
    _flip_in_largest_record(path, 16)
    r = hpcforge("evaluate", str(path))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"hpcforge: error: checkpoint {path} is damaged: its record ")
    assert r.stderr.endswith("fails its CRC32 check (the file changed after it was written); use "
                             "an older checkpoint or train again\n")


# --------------------------------------------------------------------------- disk full (issue 14)
def test_a_background_write_on_a_small_disk_is_one_line_and_keeps_the_last(small_disk):
    folder = small_disk / "checkpoints"
    ck = Checkpoints(folder, keep=3, background=True)
    state = {"model": {"w": torch.ones(5 * 2**20 // 4)}}            # 5 MiB: one fits in 8, not two
    ck.save({**state, "step": 1}, 1, {})
    ck.wait()
    ck.save({**state, "step": 2}, 2, {})                            # returns; the thread fails
    with pytest.raises(UserError) as e:
        ck.wait()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(
        f"no space left for checkpoint {folder / 'step-00000002.pt'}: it needs about 5.0 MiB, ")
    assert msg.endswith(f"MiB free in {folder}; the previous checkpoint there is intact. Free "
                        f"space or set output_dir to a larger disk, then continue with "
                        f"train.resume=auto")
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step-00000001.pt"]
    assert load(folder / "last.pt")["step"] == 1


@pytest.mark.slow
def test_training_onto_a_small_disk_stops_with_one_line_exit_2(small_store, small_disk):
    from helpers import hpcforge, small
    r = hpcforge("train", *small(small_disk, f"data.path={small_store[0]}", "train.epochs=3",
                                 "model.channels=[64,128]", "train.dist.nproc=1",
                                 "train.dist.backend=none", "train.logger.mode=disabled",
                                 "train.checkpoint.background=true", "train.batch_size=32"))
    errors = [line for line in r.stderr.splitlines() if "hpcforge: error:" in line]  # after tqdm
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    folder = small_disk / "train" / "checkpoints"
    assert f"hpcforge: error: no space left for checkpoint {folder}/step-" in errors[0]
    assert "the previous checkpoint there is intact" in errors[0]
    last = load(folder / "last.pt")                                  # the first epoch's, whole
    assert last["step"] == 512 // 32 and not (small_disk / "train" / "summary.json").exists()
