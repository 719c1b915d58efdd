"""A frozen rank ends the run: real ranks (`hpcforge train --nproc 2`), a real SIGSTOP, timed."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT
from pipeline.trainer import PreemptionFlag
from pipeline.watchdog import WATCHDOG_EXIT_CODE, Heartbeat, Watchdog

TIMEOUT_S = 12   # train.dist.timeout_s for these runs
MARGIN_S = 15    # the watchdog polls every second; the rest is a loaded 2-core machine's slack


def start_training(store: tuple, out: Path, *extra: str) -> subprocess.Popen:
    """`hpcforge train --nproc 2` for ever, checkpointing every 2 steps, in a session of its own
    (so a test can signal its whole process group, as `timeout` or Ctrl-C would)."""
    path, overrides = store
    cmd = [sys.executable, "-m", "pipeline", "train", "--nproc", "2", *overrides[1:],
           f"data.path={path}", f"output_dir={out}", "train.batch_size=16", "train.epochs=1000",
           "train.checkpoint.every_steps=2", "train.logger.images_every=0", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_checkpoint(proc: subprocess.Popen, out: Path) -> list[dict]:
    """The ranks' placement once training is under way (a checkpoint is on disk)."""
    last, deadline = out / "train" / "checkpoints" / "last.pt", time.time() + 180
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else "no ckpt"
    return json.loads((out / "train" / "ranks.json").read_text())


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def cleanup(proc: subprocess.Popen, pids: list[int]) -> None:
    """Leave no stopped process behind, whatever the test did."""
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_the_rank_the_others_wait_for_is_named_not_the_first_to_fall_silent(tmp_path):
    """Rank 0 waits in a collective since before rank 1's last beat: rank 1 is the stuck one."""
    beats = [Heartbeat(tmp_path, r) for r in (0, 1)]
    dog = Watchdog(tmp_path, ranks=2, timeout_s=0.5)
    beats[0].beat("training", 7)
    beats[0].beat("wait:synchronize")
    dog.read()
    time.sleep(0.3)
    beats[1].beat("training", 7)
    dog.read()
    assert dog.stalled() is None
    time.sleep(0.7)
    stall = dog.stalled()
    assert stall is not None and stall.record["rank"] == 1 and stall.record["step"] == 7
    beats[1].beat("wait:barrier")  # now both wait: a deadlock; the one silent longest is named
    dog.read()
    time.sleep(0.6)
    assert dog.stalled().record["rank"] == 0
    for b in beats:  # a run that finished is not stalled, however long it takes to exit
        b.beat("done")
    dog.read()
    time.sleep(0.6)
    assert dog.stalled() is None


def test_sigint_asks_for_a_checkpoint_and_a_second_one_interrupts():
    with PreemptionFlag() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_stopped_rank_ends_the_run_within_timeout_naming_it(small_store, tmp_path, backend):
    proc = start_training(small_store, tmp_path, f"train.dist.backend={backend}",
                          f"train.dist.timeout_s={TIMEOUT_S}")
    ranks = []
    try:
        ranks = wait_for_checkpoint(proc, tmp_path)
        stopped = ranks[1]
        os.kill(stopped["pid"], signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=TIMEOUT_S + 120)
        elapsed = time.monotonic() - t0
        print(f"{backend}: SIGSTOP to exit {elapsed:.1f} s (timeout_s={TIMEOUT_S})")
        assert proc.returncode == WATCHDOG_EXIT_CODE, err[-3000:]
        assert TIMEOUT_S - 1 < elapsed < TIMEOUT_S + MARGIN_S, elapsed
        line = next(ln for ln in err.splitlines() if "watchdog:" in ln)
        m = re.search(rf"watchdog: rank 1 on {re.escape(stopped['host'])} \(pid {stopped['pid']}\) "
                      r"made no progress for \d+ s at step (\d+) .*the last good checkpoint is "
                      r"(\S+); resume with train.resume=auto", line)
        assert m, line
        ckpt = Path(m.group(2))
        assert ckpt.parent == tmp_path / "train" / "checkpoints" and ckpt.is_file()
        assert int(ckpt.stem.split("-")[1]) <= int(m.group(1))  # saved at or before that step
        assert "non-zero exit code" not in err  # the watchdog's line, not mpirun's block
        time.sleep(1)
        assert not [r["pid"] for r in ranks if alive(r["pid"])]  # no rank left, stopped or not
    finally:
        cleanup(proc, [r["pid"] for r in ranks])
