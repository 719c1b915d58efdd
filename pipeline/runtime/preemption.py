"""The preemption contract: how a signalled run stops with its work on disk and asks to be rerun.

Everything that must agree on it imports it from here (pipeline.runtime.launch, hpcforge.cli, the
loop, jobs.tasks); nothing restates the numbers.

1. Signals. A batch system warns a job before it ends it: Slurm sends SIGUSR2 `signal_delay_s`
   before the time limit (submitit's `--signal`) and SIGTERM on preemption; `timeout` and batch
   wrappers send SIGTERM, a user Ctrl-C (SIGINT). `SIGNALS` are the ones a training process
   catches (`PreemptionFlag`): each only sets a flag; a second SIGINT interrupts at once.
2. The launcher. `hpcforge train --nproc N` (pipeline.runtime.launch.relaunch) starts each rank (or,
   with train.dist.launcher=mpirun, mpirun) in a session of its own, so a signal to the launcher's
   process group reaches only the launcher; it passes it on as `FORWARDED_SIGNAL` (SIGUSR1) to every
   rank (or to mpirun, which delivers it to every rank). (A SIGTERM to mpirun would kill the ranks
   before they checkpoint.)
3. The vote. Ranks see a signal at different moments, so they act only when all of them agree:
   `Preemption` sums "signal seen" over ranks at a step boundary, every ~train.dist.signal_check_s
   of rank 0's step time (one collective, in flight while the step's last phase computes its
   gradients, so it costs no synchronisation of its own).
4. The checkpoint. Once the vote says stop, rank 0 writes the checkpoint and waits until it is on
   disk; then every rank raises `Preempted`. Nothing says "requeue me" before the file is there.
5. The exit. `REQUEUE_EXIT_CODE` (75, EX_TEMPFAIL from sysexits.h: "try again later") means
   "checkpointed, rerun me with train.resume=auto"; a failure is never 75. Under our launcher the
   ranks exit 0 with their heartbeat saying "preempted" (so mpirun prints no error block,
   pipeline.runtime.watchdog.preempted_status) and the launcher returns 75; under srun or a site's
   mpirun each rank exits 75 itself.
6. Who requeues. Not the trainer. Under Slurm `jobs.tasks.TrainJob` catches `Preempted`, runs
   `scontrol requeue` on rank 0 (up to cluster.max_requeues) and exits 75 on every rank; a signal
   outside `train()` (start-up, the final write) goes to submitit's handler, which calls
   `TrainJob.checkpoint()` to resubmit. Elsewhere whoever ran the command sees 75 and reruns it.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "checkpointed after a preemption signal, run me again"
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
FORWARDED_SIGNAL = signal.SIGUSR1  # what the launcher sends the ranks for any of SIGNALS
RECEIVED_NOTE = "signal"           # the launcher writes the signal it got here, in its watch folder
MAX_STEPS_BETWEEN_VOTES = 10_000   # a bound, so a mis-measured step time cannot stop the votes


class Preempted(Exception):
    """Raised on every rank after a preemption signal, once rank 0's checkpoint is on disk."""

    def __init__(self, signum: int, checkpoint: str | None):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}; "
                         f"rerun with train.resume=auto to continue")
        self.signum, self.checkpoint = signum, checkpoint


class PreemptionFlag:
    """While entered, each of `SIGNALS` sets `signum`; the loop acts on it at a step boundary. A
    second SIGINT interrupts at once, as Ctrl-C does elsewhere, for whoever does not want to wait
    for the checkpoint."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received = 0               # signals caught so far (the launcher forwards each)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionFlag:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        self.received += 1

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def catching(self) -> bool:
        """Whether the handlers are installed (entered and not yet left)."""
        return bool(self._previous)


class Preemption:
    """The flag plus the ranks' vote on it (point 3 of the contract above).

    Ranks vote at steps 1 and 2, then about every `check_s` seconds: at each vote rank 0 proposes
    the interval in steps from its measured step time, and every rank adopts the sum (the other
    ranks add 0), so they all vote at the same steps. `check_s` 0 votes at every step.
    """

    def __init__(self, flag: PreemptionFlag, begin_sum: Callable[..., Callable[[], list[float]]],
                 is_main: bool, check_s: float):
        self.flag, self._begin_sum, self._is_main, self._check_s = flag, begin_sum, is_main, check_s
        self.agreed = False             # every rank has voted to stop
        self._next_vote = 1             # the step (counted from 1) of the next vote
        self._mark = (0, 0.0)           # rank 0's (step, time) at the previous vote

    def vote_due(self, step: int) -> bool:
        """Whether step number `step` (counted from 1) carries a vote."""
        return step >= self._next_vote

    def begin_vote(self, done: int) -> Callable[[], list[float]]:
        """Start the sum over ranks of (signal seen, rank 0's proposed interval); `done` steps so
        far. Finish it with `end_vote`."""
        signalled = float(self.flag.signum is not None)
        return self._begin_sum([signalled, self._proposed_interval(done) if self._is_main else 0.0])

    def _proposed_interval(self, done: int) -> float:
        """Rank 0: the steps that take about `check_s` on its clock since the previous vote."""
        (step0, t0), now = self._mark, time.perf_counter()
        self._mark = (done, now)
        if self._check_s > 0 and t0 and done > step0:
            steps = int(self._check_s * (done - step0) / (now - t0))
            return float(min(MAX_STEPS_BETWEEN_VOTES, max(1, steps)))
        return 1.0

    def end_vote(self, pending: Callable[[], list[float]], done: int) -> None:
        signalled, interval = pending()
        self.agreed = signalled > 0
        self._next_vote = done + 1 + max(1, int(interval))

    @property
    def signum(self) -> int:
        """The signal the user sent: the one caught here, or, when our launcher forwarded it as
        FORWARDED_SIGNAL, the one it names in its watch folder."""
        caught = self.flag.signum or FORWARDED_SIGNAL
        return received_signal(caught) if caught == FORWARDED_SIGNAL else caught


def received_signal(caught: int) -> int:
    """What our `--nproc` launcher received, which it passed on as `caught`
    (pipeline.runtime.launch)."""
    from pipeline.runtime.watchdog import WATCH_DIR_ENV
    folder = os.environ.get(WATCH_DIR_ENV)
    try:
        return signal.Signals[(Path(folder) / RECEIVED_NOTE).read_text().strip()]
    except (TypeError, OSError, KeyError):  # no launcher of ours, or it wrote no name
        return caught
