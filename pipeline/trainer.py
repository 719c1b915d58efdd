"""`hpcforge train` on this rank: start the backend, build the run, fit it.

The parts: pipeline.run (`build(cfg, dist) -> Run`), pipeline.loop (`fit`, `train_step`),
pipeline.state (checkpoint save and resume), pipeline.hooks (what rank 0 draws),
pipeline.preemption (the signal, vote and exit-75 contract). The CLI and jobs.tasks call `train`.
"""
from __future__ import annotations

import os
from typing import Any

from pipeline.config import Config
from pipeline.dist import detect_launcher, init_distributed
from pipeline.errors import UserError
from pipeline.loop import NonFiniteError, fit
from pipeline.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionFlag
from pipeline.run import build, build_model, seed_for
from pipeline.watchdog import Heartbeat

__all__ = ["train", "Preempted", "REQUEUE_EXIT_CODE", "NonFiniteError", "build_model", "seed_for"]


def train(cfg: Config) -> dict[str, Any]:
    """Train on every rank the launcher started; the summary's paths are filled on rank 0."""
    heartbeat = Heartbeat.from_env(detect_launcher().rank)
    with PreemptionFlag() as flag:  # from the start: a signal during set-up is not lost either
        heartbeat.beat("wait:start-up")  # the backend's rendezvous waits for every rank
        dist = init_distributed(cfg.train.dist)
        heartbeat.watch_collectives(dist)
        try:
            return fit(build(cfg, dist, heartbeat, flag))
        except UserError as e:
            if dist.world_size > 1:  # (damaged data, a full disk) on one rank: its line, then leave
                _exit_without_finalize(f"hpcforge: error: {e}", status=2)
            raise
        except Exception:
            if heartbeat.failed and dist.world_size > 1:
                _exit_without_finalize()
            raise


def _exit_without_finalize(line: str = "", status: int = 1) -> None:
    """A collective failed (gloo timed out, a peer died or stopped), or this rank met a fault the
    user must fix while its peers wait in a collective: print why and leave now. A normal exit
    would call MPI_Finalize (Horovod's MPI, or mpi4py's for ddp's rendezvous), which waits for the
    failed peer for ever, or aborts with status 1 where the user's fix needs status 2; mpirun ends
    the other ranks when this one exits non-zero."""
    import sys
    import traceback
    if line:
        print(line, file=sys.stderr)
    else:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
