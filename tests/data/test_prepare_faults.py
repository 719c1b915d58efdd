"""Faults around `prepare`: two prepares of one store, stale locks, Ctrl-C, and a real full disk
(a small tmpfs mounted here: the tests run as root)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, ctrl_c_reaches_children, hpcforge

from pipeline.config import load_config
from pipeline.core.errors import UserError
from pipeline.data.prepare import Paths, _hpcforge_meta, prepare
from pipeline.data.store import open_store

# 640 Ising samples, 10 chunks, 20 shards: a few seconds of work on one worker
SMALL = ["data.params.lattice=16", "data.params.burn_in=40", "data.params.decorrelation=4",
         "data.n_samples=640", "data.chunk_size=64", "data.shard_size=32",
         "data.dask.progress=false", "data.dask.n_workers=1"]


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hpcforge", "prepare", f"output_dir={out}", *SMALL, *extra]


def _errors(stderr: str) -> list[str]:
    """stderr without Dask's own start-up and shut-down chatter (timestamped log lines)."""
    return [line for line in stderr.splitlines() if line.strip() and not line[:4].isdigit()]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- one prepare per store
@pytest.mark.slow
def test_two_prepares_of_one_path_started_together_one_refuses_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cli(out), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in procs]
    codes = sorted(r[3] for r in results)
    assert codes == [0, 2], [r[2][-1500:] for r in results]
    (winner,) = [r for r in results if r[3] == 0]
    (loser,) = [r for r in results if r[3] == 2]
    store = out / "data" / "ising2d.zarr"
    assert _errors(loser[2]) == [
        f"hpcforge: error: data.path {store} is being prepared by pid {winner[0]} on host "
        f"{socket.gethostname()} since {_errors(loser[2])[0].split(' since ')[1].split(' ')[0]} "
        f"(lock {store}.lock); wait for it to finish or stop it, or choose another data.path"]
    assert loser[1] == ""                                   # it started nothing
    assert open_store(store).meta.complete is True
    paths = Paths.of(str(store))
    assert not any(p.exists() for p in (paths.partial, paths.scratch, paths.lock))


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, dask_address):
    cfg = load_config("demo", [f"output_dir={tmp_path}", *SMALL,
                               f"data.dask.scheduler={dask_address}"])
    paths = Paths.of(cfg.data.path)
    paths.lock.parent.mkdir(parents=True)
    dead = _dead_pid()
    paths.lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": "1",
                                      "since": "2026-01-01T00:00:00+0000", "token": "0"}))
    lines: list[str] = []
    store = open_store(prepare(cfg.data, cfg.to_dict(), log=lines.append))
    assert store.meta.complete is True
    assert f"taking over {paths.lock} from pid {dead} on host {socket.gethostname()} since " \
           f"2026-01-01T00:00:00+0000, which is no longer running" in lines
    assert not paths.lock.exists()


def test_a_lock_from_another_host_is_reported_with_how_to_clear_it(tmp_path):
    cfg = load_config("demo", [f"output_dir={tmp_path}", *SMALL])
    paths = Paths.of(cfg.data.path)
    paths.lock.parent.mkdir(parents=True)
    paths.lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 4242,
                                      "since": "2026-01-01T00:00:00+0000", "token": "0"}))
    with pytest.raises(UserError) as e:
        prepare(cfg.data, cfg.to_dict(), log=lambda *a: None)
    assert str(e.value) == (
        f"data.path {paths.final} is locked by pid 4242 on host node-elsewhere since "
        f"2026-01-01T00:00:00+0000, which this host cannot check; if that prepare is no longer "
        f"running, remove the lock (rm {paths.lock}) and run again")
    assert paths.lock.exists() and not paths.partial.exists() and not paths.scratch.exists()


@pytest.mark.slow
def test_ctrl_c_releases_the_lock_and_the_same_command_then_resumes(tmp_path):
    out = tmp_path / "out"
    paths = Paths.of(str(out / "data" / "ising2d.zarr"))
    with ctrl_c_reaches_children():
        proc = subprocess.Popen(_cli(out), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((paths.scratch / "chunks").glob("*.pkl")):
        time.sleep(0.05)
    assert paths.lock.exists(), proc.stderr.read() if proc.poll() is not None else "no lock"
    os.kill(proc.pid, signal.SIGINT)                # Ctrl-C: to the CLI process
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and not paths.lock.exists(), err[-1500:]
    assert "hpcforge: interrupted" in err and "Traceback" not in err, err[-1500:]
    again = subprocess.run(_cli(out), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-1500:]
    assert "resuming the interrupted prepare" in again.stdout
    assert "taking over" not in again.stdout


# --------------------------------------------------------------------------- a real full disk
def _npy_input(folder: Path, n: int) -> Path:
    """n random float32 samples of 4 KiB (incompressible) and an int label, as .npy files."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "field.npy", rng.standard_normal((n, 1, 32, 32), dtype=np.float32))
    np.save(folder / "label.npy", rng.integers(0, 3, n))
    return folder


def _import(tmp: Path, inputs: Path, store: Path, chunk: int) -> list[str]:
    return ["prepare", f"output_dir={tmp}", "data=import_netcdf", "data.source=npy",
            f"data.params.path={inputs}", "data.params.variables=[field]",
            "data.params.labels=[label]", "data.params.sample_axis=0", "data.params.dtypes={}",
            "data.inputs={x: field}", f"data.chunk_size={chunk}", f"data.shard_size={chunk}",
            "data.dask.progress=false", "data.dask.n_workers=1", f"data.path={store}"]


def _assert_one_line_and_nothing_complete(run, store: Path, where: str) -> str:
    assert run.returncode == 2, run.stderr[-2000:]
    lines = _errors(run.stderr)
    assert len(lines) == 1, run.stderr[-3000:]
    assert lines[0].startswith(f"hpcforge: error: writing {where}"), lines[0]
    assert "no space left on the device (errno 28); free space or point data.path at a larger " \
           "file system; the store stays incomplete in" in lines[0]
    assert " MiB of pass-1 scratch" in lines[0] and " MiB are free there" in lines[0]
    paths = Paths.of(str(store))
    assert not store.exists() and not paths.lock.exists()
    assert _hpcforge_meta(paths.partial)["complete"] is False
    assert not list(paths.scratch.rglob(".*.tmp"))        # half-written temp files removed
    return lines[0]


@pytest.mark.slow
def test_disk_full_in_pass_one_is_one_line_then_more_space_resumes(tmp_path, small_disk):
    """20 MiB of pass-1 scratch on an 8 MiB disk: numpy's short write (no errno) is named."""
    inputs = _npy_input(tmp_path / "in", 5000)
    store = small_disk / "set.zarr"
    run = hpcforge(*_import(tmp_path, inputs, store, 500))
    line = _assert_one_line_and_nothing_complete(run, store, f"{store}.scratch/pieces/")
    assert "needs up to ~39.1 MiB (19.6 MiB of pass-1 scratch" in line
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    again = hpcforge(*_import(tmp_path, inputs, store, 500))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the interrupted prepare" in again.stdout
    got = open_store(store)
    assert got.meta.n_samples == 5000 and got.meta.complete is True


@pytest.mark.slow
def test_disk_full_in_pass_two_names_the_array(tmp_path, small_disk):
    """5 MiB of scratch fits, the 5 MiB store next to it does not."""
    inputs = _npy_input(tmp_path / "in", 1200)
    store = small_disk / "set.zarr"
    run = hpcforge(*_import(tmp_path, inputs, store, 200))
    _assert_one_line_and_nothing_complete(run, store, f"{store}.partial/")


@pytest.mark.parametrize("free_pages, first", [(0, ".lock"), (1, ".partial")])
def test_disk_full_in_metadata_is_one_line(tmp_path, small_disk, free_pages, first):
    """A disk already full (0 pages free: the lock file fails) or nearly (1 page: the lock takes
    it, the store's first zarr.json fails): one line naming that file and the free space."""
    inputs = _npy_input(tmp_path / "in", 100)
    with open(small_disk / "ballast", "wb") as f:
        try:
            f.write(b"\0" * (8 << 20))
        except OSError:
            pass
        f.truncate(f.tell() - free_pages * 4096)
    store = small_disk / "set.zarr"
    run = hpcforge(*_import(tmp_path, inputs, store, 50))
    assert run.returncode == 2, run.stderr[-2000:]
    lines = _errors(run.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"hpcforge: error: writing {store}{first}"), lines
    assert "no space left on the device (errno 28)" in lines[0] and "MiB are free there" in lines[0]
    assert not store.exists() and not Paths.of(str(store)).lock.exists()


def test_an_old_store_left_by_a_kill_between_the_final_renames_is_cleared(tmp_path, dask_address):
    """Overwrite renames the store to `.old`, the new one into place, then deletes `.old`; a kill
    in between left `.old`, and the next overwrite failed with a bare 'Directory not empty'."""
    import shutil
    base = [f"output_dir={tmp_path}", *SMALL, f"data.dask.scheduler={dask_address}"]
    cfg = load_config("demo", base)
    store = prepare(cfg.data, cfg.to_dict(), log=lambda *a: None)
    old = store.with_name(store.name + ".old")
    shutil.copytree(store, old)                              # as the kill left it
    cfg = load_config("demo", [*base, "data.seed=1", "data.overwrite=true"])
    assert open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None)).meta.content[
        "seed"] == 1
    assert not old.exists()
    old.mkdir()
    (old / "thesis.tex").write_text("precious")              # not ours: never deleted
    cfg = load_config("demo", [*base, "data.seed=2", "data.overwrite=true"])
    with pytest.raises(UserError, match=r"ising2d\.zarr\.old is in the way of replacing .* and is "
                                        r"not an hpcforge store; move it away"):
        prepare(cfg.data, cfg.to_dict(), log=lambda *a: None)
    assert (old / "thesis.tex").read_text() == "precious"
