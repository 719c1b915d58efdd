"""Resuming a killed `prepare`: a real subprocess killed mid-way, then the same command again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.core.errors import UserError
from pipeline.data.prepare import Paths, _hpcforge_meta, _start_partial, content_config, prepare
from pipeline.data.store import open_store

ROOT = Path(__file__).resolve().parents[2]
# 640 Ising samples in 10 chunks, 16 + 4 shards of 32: pass 2 is long enough to be killed in
SMALL = ["data.params.lattice=16", "data.params.burn_in=40", "data.params.decorrelation=4",
         "data.n_samples=640", "data.chunk_size=64", "data.shard_size=32",
         "data.dask.progress=false"]


def _cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "hpcforge", "prepare", f"output_dir={out}", *SMALL, *extra]


def _kill_after_shards(cmd: list[str], shards: Path, at_least: int) -> None:
    """Start `cmd` in its own process group; SIGKILL the group once `at_least` shards exist."""
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len(list(shards.glob("*.json"))) >= at_least:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"prepare ended before the kill: {proc.stderr.read()[-1500:]}"
    os.killpg(proc.pid, signal.SIGKILL)    # the CLI, its nannies and workers: all ours
    proc.wait()


@pytest.mark.slow
def test_killed_prepare_resumes_redoing_only_missing_shards_bit_identical(tmp_path):
    killed = tmp_path / "killed"
    store = killed / "data" / "ising2d.zarr"
    paths = Paths.of(str(store))
    _kill_after_shards(_cli(killed, "data.dask.n_workers=1"), paths.scratch / "shards", 2)
    kept = len(list((paths.scratch / "shards").glob("*.json")))
    assert 2 <= kept < 20 and not store.exists()
    assert _hpcforge_meta(paths.partial)["complete"] is False
    with pytest.raises(UserError, match=r"interrupted prepare left .*\.partial; run `hpcforge "
                                        r"prepare` again to finish it"):
        open_store(store)
    again = subprocess.run(_cli(killed, "data.dask.n_workers=1"), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the interrupted prepare" in again.stdout
    assert f"kept 10 of 10 chunks and {kept} of 20 shards" in again.stdout
    resumed = open_store(store)
    shuffle = resumed.meta.shuffle
    assert (shuffle["chunks"], shuffle["shards"]) == (10, 20)
    assert shuffle["tasks"] == 5 + 20                 # 1 slot: tiny chunks two per pass-1 task
    assert shuffle["tasks_run"] == 20 - kept          # pass 1 was all recorded: none rerun
    assert not paths.partial.exists() and not paths.scratch.exists()
    # an uninterrupted run (2 workers, in this process) writes the same bytes
    cfg = load_config("demo", [f"output_dir={tmp_path / 'whole'}", *SMALL])
    whole = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    assert resumed.meta.checksums == whole.meta.checksums
    assert resumed.meta.stats == whole.meta.stats
    for split in ("train", "val"):
        for k, a in whole.split(split).items():
            assert np.array_equal(resumed.split(split)[k][:], a[:]), (split, k)


def test_partial_of_another_config_is_refused_then_discarded_with_overwrite(tmp_path, dask_address):
    cfg = load_config("demo", [f"output_dir={tmp_path}", *SMALL])
    paths = Paths.of(cfg.data.path)
    _start_partial(paths, content_config(cfg.data), 32)         # as a killed seed-0 run leaves it
    other = load_config("demo", [f"output_dir={tmp_path}", *SMALL, "data.seed=1",
                                 f"data.dask.scheduler={dask_address}"])
    with pytest.raises(UserError, match=r"\.partial is an interrupted prepare of a different "
                                        r"config \(data.seed: 0 there, 1 now\); rerun with that "
                                        r"config to finish it, or pass data.overwrite=true"):
        prepare(other.data, other.to_dict(), log=lambda *a: None)
    assert paths.partial.exists()                                 # nothing was touched
    lines: list[str] = []
    other = load_config("demo", [f"output_dir={tmp_path}", *SMALL, "data.seed=1",
                                 "data.overwrite=true", f"data.dask.scheduler={dask_address}"])
    done = open_store(prepare(other.data, other.to_dict(), log=lines.append))
    assert any("discarding" in line and "data.seed" in line for line in lines)
    assert done.meta.content["seed"] == 1


@pytest.mark.slow
def test_partial_and_scratch_of_two_configs_are_discarded_never_mixed(tmp_path, dask_address):
    """What two racing prepares (seed 0, then seed 1 with overwrite) used to leave: the scratch of
    a killed seed-0 run under a `.partial` that says seed 1. The seed-1 command then "resumed"
    from seed-0 chunks, and failed (or wrote a wrong store) on every rerun."""
    import zarr

    from pipeline.data.store import FORMAT, FORMAT_VERSION
    out = tmp_path / "raced"
    paths = Paths.of(str(out / "data" / "ising2d.zarr"))
    _kill_after_shards(_cli(out, "data.dask.n_workers=1"), paths.scratch / "shards", 2)
    seed1 = [f"output_dir={out}", *SMALL, "data.seed=1", "data.overwrite=true",
             f"data.dask.scheduler={dask_address}"]
    cfg = load_config("demo", seed1)
    zarr.open_group(str(paths.partial), mode="w").attrs["hpcforge"] = {   # the racing seed-1 run
        "format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
        "content": content_config(cfg.data), "shard_size": 32, "arrays": False}
    lines: list[str] = []
    got = open_store(prepare(cfg.data, cfg.to_dict(), log=lines.append))
    assert any(f"discarding {paths.partial} and {paths.scratch}: they do not belong together"
               in line for line in lines), lines
    clean = load_config("demo", [f"output_dir={tmp_path / 'clean'}", *seed1[1:]])
    want = open_store(prepare(clean.data, clean.to_dict(), log=lambda *a: None))
    assert got.meta.content["seed"] == 1
    assert got.meta.checksums == want.meta.checksums
    for k, a in want.split("train").items():
        assert np.array_equal(got.split("train")[k][:], a[:]), k
