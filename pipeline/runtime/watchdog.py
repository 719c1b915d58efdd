"""Heartbeats from the ranks, and the watchdog outside them that ends a run when one goes silent.

Why outside: a rank stopped by SIGSTOP, stuck in a filesystem read or deadlocked cannot time itself
out, and the backends' own checks do not save the run here: Horovod's stall check runs in its
background thread, which then spins inside an MPI allreduce and never checks; gloo does time out,
after which MPI_Finalize waits for ever for the stopped peer. Whoever watches must be another
process: the `--nproc` launcher (pipeline.runtime.launch.relaunch) or, under Slurm, the task wrapper
of the other ranks (jobs.tasks).

Each rank rewrites one small record in `<watch dir>/rank-NNNNN.beat` from its main thread (a
background thread would keep beating while the main thread is stuck): at every step, each
validation batch, each checkpoint, during set-up, and around every collective it waits in, where
the record says "wait:<name>". The watchdog times silence on its own clock, from the moment it
sees a record change (no clock is shared between nodes). A rank that is waiting for the others is
not the one to blame: when one rank stops, the others soon wait for it, and the line names the
silent rank that is not waiting (or, if all wait, the one silent longest): the stuck one.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# set by our --nproc launcher: ranks die with their parent
PARENT_DEATH_ENV = "HPCFORGE_END_WITH_PARENT"
WATCH_DIR_ENV = "HPCFORGE_WATCH_DIR"  # set by whoever watches; ranks beat only when it is set
RECORD_BYTES = 256                    # one fixed-size record, rewritten in place by one pwrite
STARTUP_GRACE_S = 60  # added to timeout_s before a rank's first step: imports, W&B's start-up
POLL_S = 1.0                          # how often the watchdog reads the records
WATCHDOG_EXIT_CODE = 124              # "timed out" (as coreutils' timeout); never 75, never 2
# Collectives every rank waits in; a rank inside one is waiting for the others, not stuck itself.
BLOCKING = ("synchronize", "broadcast", "average_buffers", "mean", "gather_object",
            "broadcast_object", "barrier", "shutdown")
FINISHED = ("done", "preempted")      # a rank's last records: it is leaving, not stuck
_HOST = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # the name ranks.json uses
HOST = _HOST  # this node, as the records name it


class Heartbeat:
    """This rank's record: 256 bytes of JSON in a shared memory map of its file. A beat is a
    format and a copy, no system call (1.7 us here; json.dumps and a pwrite took 21 us, 2-5 % of a
    small model's step at the ~5 beats a step takes), so it can run at every step and around
    every collective, and its step and state are never stale. The watchdog reads the file."""

    def __init__(self, folder: str | Path, rank: int):
        self.rank, self.step, self.state, self.n, self.calls = rank, 0, "start", 0, 0
        self.trained = "false"          # "true" from the first step on (JSON, as written)
        self.failed: str | None = None  # the collective an exception came out of
        self.host = _HOST
        path = Path(folder) / f"rank-{rank:05d}.beat"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, RECORD_BYTES)  # zeros: not JSON, so not read until the first beat
        self._map = mmap.mmap(fd, RECORD_BYTES)
        os.close(fd)
        self._head = f'{{"rank": {rank}, "host": {json.dumps(self.host)}, "pid": {os.getpid()}, '

    @classmethod
    def from_env(cls, rank: int) -> Heartbeat:
        folder = os.environ.get(WATCH_DIR_ENV)
        if not folder:
            return NoHeartbeat()
        if os.environ.get(PARENT_DEATH_ENV):
            end_with_parent()
        return cls(folder, rank)

    def beat(self, state: str | None = None, step: int | None = None) -> None:
        self.state = state if state is not None else self.state
        self.step = step if step is not None else self.step
        self.n += 1
        if self.state == "training":
            self.trained = "true"
        rec = (f'{self._head}"step": {self.step}, "state": "{self.state}", '
               f'"trained": {self.trained}, "calls": {self.calls}, "n": {self.n}}}')
        self._map[:] = rec.encode().ljust(RECORD_BYTES)

    def watch_collectives(self, dist: Any) -> None:
        """Mark this rank "wait:<name>" while it is inside one of `dist`'s collectives, and
        remember the collective an exception came out of (`failed`)."""
        for name in BLOCKING:
            setattr(dist, name, self._waiting(name, getattr(dist, name)))
        begin_sum = dist.begin_sum

        def begin(values: Any) -> Callable[[], list[float]]:
            return self._waiting("begin_sum", begin_sum(values))
        dist.begin_sum = begin

    def _waiting(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            before = self.state
            self.calls += 1
            self.beat(f"wait:{name}")
            try:
                return fn(*args, **kwargs)
            except Exception:
                self.failed = name
                raise
            finally:
                self.beat(before)
        return call


class NoHeartbeat(Heartbeat):
    """Nobody watches (a single process, or a launcher we did not start): beats cost nothing;
    failed collectives are still noted."""

    def __init__(self) -> None:
        self.rank, self.step, self.state, self.calls, self.failed = 0, 0, "", 0, None

    def beat(self, state: str | None = None, step: int | None = None) -> None:
        pass


def end_with_parent() -> None:
    """Have the kernel SIGKILL this rank when the process that started it (our launcher, or the
    mpirun it started) is gone; our launcher also asks for it before exec. When the launcher is
    killed, mpirun gets SIGTERM (its own PDEATHSIG) and exits as soon as one rank has left; a rank
    still inside a collective with the departed one then spins for `timeout_s` with nobody left to
    watch it (seen: one of 2 Horovod ranks alive 30 s after a SIGKILL to the launcher, reparented to
    init). A polling thread cannot help: Horovod's wait holds the GIL. PDEATHSIG fires when mpirun's
    forking thread ends, which for mpirun is its main thread (its event loop forks the ranks), i.e.
    when mpirun exits; only our launcher asks for it (PARENT_DEATH_ENV), never a site's launcher or
    slurmstepd."""
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # mpirun was gone before the request: nobody would signal us
        os._exit(1)


def preempted_status(requeue: int) -> int:
    """A rank's exit status after a clean preemption checkpoint. Under our launcher, 0 (so mpirun
    prints no "non-zero exit code" block) with the rank's record saying "preempted": the
    launcher turns that into `requeue` (75). Elsewhere `requeue` itself (srun, a site's mpirun)."""
    return 0 if os.environ.get(WATCH_DIR_ENV) else requeue


@dataclass
class Stall:
    """The rank the watchdog blames: its last record and how long it has been silent."""
    record: dict[str, Any]
    silent_s: float

    def describe(self, timeout_s: float, checkpoint: Path | None) -> str:
        r = self.record
        doing = ("before its first heartbeat" if "state" not in r else
                 f"while waiting in {r['state'][5:]}" if r["state"].startswith("wait:") else
                 f"while in {r['state']}")
        where = f"on {r['host']} (pid {r['pid']})" if "host" in r else "(never reported)"
        last = (f"the last good checkpoint is {checkpoint}; resume with train.resume=auto"
                if checkpoint else "no checkpoint had been written yet")
        return (f"watchdog: rank {r['rank']} {where} made no progress for {self.silent_s:.0f} s "
                f"at step {r.get('step', 0)} {doing} (train.dist.timeout_s={timeout_s:g}); "
                f"ended the run; {last}")


class Watchdog:
    """Reads the ranks' records every POLL_S; `stalled()` names the rank to blame, if any."""

    def __init__(self, folder: str | Path, ranks: int, timeout_s: float):
        self.folder, self.ranks, self.timeout_s = Path(folder), ranks, timeout_s
        self.started = time.monotonic()
        self.seen: dict[int, tuple[dict[str, Any], float]] = {}  # rank -> (record, changed at)
        self.trained: set[int] = set()  # ranks that reached their first step
        self.gaps: dict[int, tuple[dict[str, Any], float, float]] = {}  # rank -> last silence
        # rank -> its beat count when a poll saw it stopped (T) or in a disk wait (D): remembered,
        # because when gloo times out first mpirun's exit ends that evidence before we look
        self.frozen: dict[int, int] = {}

    def read(self) -> None:
        now = time.monotonic()
        for path in self.folder.glob("rank-*.beat"):
            try:
                rec = json.loads(path.read_bytes())
            except (OSError, ValueError):  # not written yet (or caught mid-copy): next poll
                continue
            old = self.seen.get(rec["rank"])
            if old is None or old[0]["n"] != rec["n"]:
                self.seen[rec["rank"]] = (rec, now)
                if old is not None:  # the silence that just ended: (record, from, until)
                    self.gaps[rec["rank"]] = (*old, now)
            if rec["trained"]:
                self.trained.add(rec["rank"])
            if _frozen_now(rec):
                self.frozen[rec["rank"]] = rec["n"]

    def stalled(self, timeout_s: float | None = None, ended: bool = False) -> Stall | None:
        """The rank the others wait for, once it is silent for `timeout_s` and not waiting
        itself, or once every rank is silent that long (or, `ended`: the run failed already);
        a rank never heard from after the start-up grace. Before its first step a rank gets
        STARTUP_GRACE_S more (set-up has long single calls: imports, W&B's start)."""
        self.read()
        timeout, now = timeout_s or self.timeout_s, time.monotonic()
        view = {r: (rec, now - t) for r, (rec, t) in self.seen.items()}  # record, silent for
        if ended:  # mpirun SIGCONTs the ranks it ends: a stopped rank may just have beaten again
            for r, (rec, since, until) in self.gaps.items():
                if now - until < self.timeout_s and until - since > view[r][1]:
                    view[r] = (rec, until - since)
        silent = {r: s - (0 if r in self.trained else STARTUP_GRACE_S)
                  for r, (rec, s) in view.items() if rec["state"] not in FINISHED}
        over = [r for r in silent if silent[r] > timeout]
        stuck = ended or any(not view[r][0]["state"].startswith("wait:") for r in over)
        if over and (stuck or (len(over) == len(silent) and len(self.seen) == self.ranks)):
            r = min(over, key=lambda r: _behind(view[r][0], silent[r], self._frozen(view[r][0])))
            return Stall(*view[r])
        missing = sorted(set(range(self.ranks)) - set(self.seen))
        if missing and now - self.started > timeout + STARTUP_GRACE_S:
            return Stall({"rank": missing[0]}, now - self.started)
        return None

    def pids(self) -> list[int]:
        return [rec["pid"] for rec, _ in self.seen.values()]

    def _frozen(self, rec: dict[str, Any]) -> bool:
        """Stopped or in a disk wait now, or seen so at a poll since this record was written."""
        return self.frozen.get(rec["rank"]) == rec["n"] or _frozen_now(rec)

    def preempted(self) -> bool:
        self.read()
        return any(rec["state"] == "preempted" for rec, _ in self.seen.values())


def _frozen_now(rec: dict[str, Any]) -> bool:
    return rec["host"] == _HOST and _proc_state(rec["pid"]) in ("T", "t", "D")


def _behind(rec: dict[str, Any], silent: float, frozen: bool) -> tuple[bool, int, bool, float]:
    """Sort key: the rank to blame comes first. A process of this host that the kernel shows
    stopped (T) or in an uninterruptible wait (D: a stuck filesystem read) first; then the one
    furthest behind: every rank enters the same collectives in the same order, so the one that
    entered the fewest is the one the others wait for; on a tie, one not waiting, then the one
    that arrived last (the others were already waiting for it)."""
    return not frozen, rec["calls"], rec["state"].startswith("wait:"), silent


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The newest complete checkpoint (they are written to a temp name, then renamed)."""
    if folder is None:
        return None
    steps = sorted(Path(folder).glob("step-*.pt"))
    return steps[-1] if steps else None


def session_pids(sid: int) -> list[int]:
    """Every process of session `sid` (mpirun's ranks each get a process group of their own, so
    a process-group kill misses them; the session holds them all)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[3]) == sid:  # after "pid (comm)": state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)  # also ends a stopped process; nothing to flush anyway
        except (ProcessLookupError, PermissionError):
            pass
