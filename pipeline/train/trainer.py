"""`hpcforge train` on this rank: start the backend, build the run, fit it.

The parts: pipeline.train.assembly (`build(cfg, dist) -> Run`, the parts of pipeline.train.run),
pipeline.train.loop (`fit`, `train_step`), pipeline.train.state (checkpoint save and resume),
pipeline.train.image_hooks (what rank 0 draws), pipeline.runtime.preemption (the signal, vote and exit-75
contract). The CLI and jobs.tasks call `train`.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Any

from models.base import InputShapeError
from pipeline.config import Config
from pipeline.core.errors import UserError
from pipeline.core.rundir import check_run_dir
from pipeline.data.store import open_store
from pipeline.runtime.dist import detect_launcher, init_distributed
from pipeline.runtime.preemption import REQUEUE_EXIT_CODE, Preempted, PreemptionFlag
from pipeline.runtime.watchdog import Heartbeat
from pipeline.train.assembly import build, build_model, check_class_count
from pipeline.train.loop import fit
from pipeline.train.nonfinite import NonFiniteError
from pipeline.train.run import seed_for
from pipeline.train.shapes import fill_from_store
from pipeline.train.state import AllCheckpointsDamaged

__all__ = ["train", "Preempted", "REQUEUE_EXIT_CODE", "NonFiniteError", "build_model", "seed_for"]


def train(cfg: Config, flag: PreemptionFlag | None = None) -> dict[str, Any]:
    """Train on every rank the launcher started; the summary's paths are filled on rank 0.
    `flag`: one the caller holds already (the CLI's, caught from its start), else our own."""
    place = detect_launcher()
    filled = _check_before_start(cfg, place.rank)
    if filled and place.rank == 0:
        print("[hpcforge] from the store: " + ", ".join(f"model.{k}={_plain(v)}"
                                                       for k, v in filled.items()), flush=True)
    heartbeat = Heartbeat.from_env(place.rank)
    held = nullcontext(flag) if flag is not None and flag.catching else PreemptionFlag()
    with held as flag:  # from the start: a signal during set-up is not lost either
        heartbeat.beat("wait:start-up")  # the backend's rendezvous waits for every rank
        dist = init_distributed(cfg.train.dist)
        heartbeat.watch_collectives(dist)
        try:
            return _fit(cfg, dist, heartbeat, flag)
        except UserError as e:
            if dist.world_size > 1:  # (damaged data, a full disk) on one rank: its line, then leave
                if isinstance(e, (DataMisfit, AllCheckpointsDamaged)) and not dist.is_main:
                    _leave_to_rank_0()
                _exit_without_finalize(f"hpcforge: error: {e}", status=2)
            raise
        except Exception as e:
            if heartbeat.failed and dist.world_size > 1:  # a peer is gone: one line, no traceback
                first = (str(e).strip().splitlines() or [""])[0][:300]
                _exit_without_finalize(f"[hpcforge] rank {dist.rank}: {heartbeat.failed} failed "
                                       f"({type(e).__name__}: {first}); leaving")
            raise


def _check_before_start(cfg: Config, rank: int) -> dict[str, Any]:
    """Refuse a new run into an output_dir holding one (pipeline.core.rundir), or a classifier whose
    output count disagrees with the store's class table, on every rank before the backend starts
    (so before rank 0 writes anything); rank 0 says it, the others leave."""
    try:
        return check_before_start(cfg)
    except UserError:
        if rank != 0:
            _leave_to_rank_0()
        raise


def check_before_start(cfg: Config) -> dict[str, Any]:
    """What a run checks before any rank starts (the CLI calls it before launching ranks); the
    model's unset shape keys are set from the store first (pipeline.train.shapes), and returned."""
    store = open_store(cfg.data.path)
    filled = fill_from_store(cfg, store)
    check_class_count(cfg, store.meta.classes)
    check_run_dir(cfg.output_dir, cfg.train.resume)  # last: it makes the run's folder
    return filled


def _plain(value: Any) -> Any:
    """(3, 96) as [3, 96], as on the command line."""
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


class DataMisfit(UserError):
    """The data does not fit the model: every rank meets it at its first batch alike."""


def _fit(cfg: Config, dist, heartbeat: Heartbeat, flag: PreemptionFlag) -> dict[str, Any]:
    """fit(build(...)), where data the model cannot take (a lattice of another size, float targets
    for a classifier) is the user's to fix: the model's own check names the shapes, and it is met
    at the first batch, before any checkpoint is written, on every rank alike."""
    try:
        return _fit_or_discard(build(cfg, dist, heartbeat, flag))
    except InputShapeError as e:
        raise DataMisfit(f"{e}: the data at data.path={cfg.data.path} does not fit "
                         f"model={cfg.model.name} as configured; set the model's shape keys "
                         f"({_shape_keys(cfg)}) to the data's, or choose data.inputs/data.path "
                         f"that fit the model") from None


def _fit_or_discard(run) -> dict[str, Any]:
    """fit(run); a new run that fails before its first step leaves no W&B run (issue 24: each
    such failure was an empty run in the project). A resumed run keeps its record."""
    try:
        return fit(run)
    except BaseException:
        if run.progress.step == 0 and run.resumed_from is None:
            run.tracker.discard()
        raise


SHAPE_KEYS = ("in_channels", "in_features", "image_size", "seq_len", "data_shape", "n_outputs",
              "out_features", "n_classes", "out_channels")


def _shape_keys(cfg: Config) -> str:
    """The model family's own shape keys (issue 24: the cnn was told to set model.image_size,
    a key it does not have)."""
    keys = [f"model.{k}" for k in SHAPE_KEYS if hasattr(cfg.model.params, k)]
    return ", ".join(keys) or "its size keys: hpcforge config lists them"


def _leave_to_rank_0(grace_s: float = 10.0) -> None:
    """An error every rank meets alike is said once: rank 0 says it and exits, and mpirun (or
    srun) then ends this rank. Exiting first could have rank 0 killed before it printed."""
    import time
    time.sleep(grace_s)
    _exit_without_finalize("", status=2)


def _exit_without_finalize(line: str | None = None, status: int = 1) -> None:
    """A collective failed (gloo timed out, a peer died or stopped), or this rank met a fault the
    user must fix while its peers wait in a collective: print why and leave now. A normal exit
    would call MPI_Finalize (Horovod's MPI, or mpi4py's for ddp's rendezvous), which waits for the
    failed peer for ever, or aborts with status 1 where the user's fix needs status 2; mpirun ends
    the other ranks when this one exits non-zero."""
    import sys
    import traceback
    if line:
        print(line, file=sys.stderr)
    elif line is None:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
