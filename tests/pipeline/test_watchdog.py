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

from pipeline.runtime.launch import mpi_env, mpirun_command
from pipeline.runtime.preemption import PreemptionFlag
from pipeline.runtime.watchdog import WATCHDOG_EXIT_CODE, Heartbeat, Watchdog

TIMEOUT_S = 12   # train.dist.timeout_s for these runs
MARGIN_S = 15    # the watchdog polls every second; the rest is a loaded 2-core machine's slack


def start_training(store: tuple, out: Path, *extra: str) -> subprocess.Popen:
    """`hpcforge train --nproc 2` for ever, checkpointing every 2 steps, in a session of its own
    (so a test can signal its whole process group, as `timeout` or Ctrl-C would)."""
    path, overrides = store
    cmd = [sys.executable, "-m", "hpcforge", "train", "--nproc", "2", *overrides[1:],
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


def _records(tmp_path: Path, *states: tuple[int, str, int, int]) -> Watchdog:
    """Ranks write (rank, state, collectives entered, step) in this order, 0.2 s apart; then
    the watchdog (timeout 0.5 s) sees them all silent for over 0.5 s."""
    dog = Watchdog(tmp_path, ranks=len(states), timeout_s=0.5)
    for rank, state, calls, step in states:
        hb = Heartbeat(tmp_path, rank)
        hb.beat("training", step)  # past start-up: no grace
        hb.calls = calls
        hb.beat(state)
        dog.read()
        time.sleep(0.2)
    time.sleep(0.5)
    return dog


@pytest.mark.parametrize("states, stuck", [
    # rank 1 stopped while computing; rank 0 then waits for it (and fell silent first)
    ([(0, "wait:synchronize", 5, 7), (1, "training", 4, 7)], 1),
    # both inside the same collective: rank 0 was there first, waiting for rank 1
    ([(0, "wait:synchronize", 5, 7), (1, "wait:synchronize", 5, 7)], 1),
    # rank 1 stopped in a collective rank 0 got through; rank 0 then waits in the next one
    ([(1, "wait:broadcast_object", 4, 6), (0, "wait:synchronize", 5, 7)], 1),
    # rank 0 stuck in a checkpoint write; rank 1 waits for it
    ([(0, "checkpoint", 4, 6), (1, "wait:gather_object", 5, 6)], 0),
])
def test_the_rank_the_others_wait_for_is_named(tmp_path, states, stuck):
    stall = _records(tmp_path, *states).stalled()
    assert stall is not None and stall.record["rank"] == stuck


def test_finished_ranks_and_ranks_starting_up_are_not_stalled(tmp_path):
    dog = Watchdog(tmp_path, ranks=2, timeout_s=0.5)
    done, starting = Heartbeat(tmp_path, 0), Heartbeat(tmp_path, 1)
    done.beat("training", 3)
    done.beat("done")
    starting.beat("setup")  # before its first step: STARTUP_GRACE_S more
    dog.read()
    time.sleep(0.8)
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
        # gloo may time out on the waiting rank at the same moment (mpirun then prints its
        # block): either way the watchdog's line names the stopped rank, and no other is blamed
        assert "a rank failed or was killed" not in err and err.count("watchdog:") == 1
        time.sleep(1)
        assert not [r["pid"] for r in ranks if alive(r["pid"])]  # no rank left, stopped or not
    finally:
        cleanup(proc, [r["pid"] for r in ranks])


@pytest.mark.mpi
@pytest.mark.slow
def test_ddp_rank_whose_collective_timed_out_exits_instead_of_hanging_in_mpi_finalize(
        small_store, tmp_path):
    """Under a plain mpirun (no launcher of ours, so no watchdog): gloo times out after timeout_s,
    and rank 0 must then leave instead of waiting in MPI_Finalize for the stopped rank."""
    path, overrides = small_store
    cmd = mpirun_command(2, ["train", *overrides[1:], f"data.path={path}",
                             f"output_dir={tmp_path}", "train.batch_size=16", "train.epochs=1000",
                             "train.checkpoint.every_steps=2", "train.logger.images_every=0",
                             "train.dist.backend=ddp", f"train.dist.timeout_s={TIMEOUT_S}"])
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=mpi_env())
    ranks = []
    try:
        ranks = wait_for_checkpoint(proc, tmp_path)
        os.kill(ranks[1]["pid"], signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=TIMEOUT_S + 120)
        elapsed = time.monotonic() - t0
        print(f"ddp under plain mpirun: SIGSTOP to exit {elapsed:.1f} s (timeout_s={TIMEOUT_S})")
        assert proc.returncode not in (0, 2, 75)
        assert elapsed < TIMEOUT_S + MARGIN_S, elapsed
        assert "Timed out" in err or "timed out" in err, err[-3000:]  # gloo's own error, printed
    finally:
        cleanup(proc, [r["pid"] for r in ranks])
