"""A run's checkpoint: what `save` writes on rank 0 and `resume` reads back on every rank.

A checkpoint holds the raw model, every phase's optimizer and schedule, the loader's position,
the run's progress, each rank's RNG state and batch-norm statistics (so a resume on the same
world size goes on as if never stopped), the redacted config and the dataset's identity.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.core.checkpoint import DAMAGED_SUFFIX, Checkpoints, check_compatible, load
from pipeline.core.errors import UserError
from pipeline.core.redaction import redact
from pipeline.data.loader import ShardedLoader
from pipeline.runtime.dist import Dist
from pipeline.train.ema import EMA
from pipeline.train.optim import load_optimizer_state
from pipeline.train.run import Progress, Run, float_buffers

Say = Callable[[str], None]  # a line for the terminal: Run.print, rank 0's alone


def finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors
               if t.is_floating_point() or t.is_complex())  # (FNO's spectral weights)


def _state(run: Run) -> dict[str, Any]:
    p = run.progress
    return {"model": run.model.state_dict(),
            "optimizers": {ph.name: ph.optimizer.state_dict() for ph in run.phases},
            "schedulers": {ph.name: ph.scheduler.state_dict() for ph in run.phases},
            "scaler": run.scaler.state_dict() if run.scaler else None,
            "step": p.step, "epoch": p.epoch, "ranks": run.dist.world_size,
            "loader": run.loader.state_dict(), "history": p.history,
            "nonfinite": [p.nonfinite_total, p.nonfinite_run],
            "early_stop": [p.stop_best, p.stop_bad],
            "best_value": run.checkpoints.best_value,
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "model_name": run.cfg.model.name, "config": redact(run.cfg.to_dict()),
            "dataset": run.store_meta, "wandb_run_id": run.tracker.run_id,
            **run.provenance}


def save(run: Run) -> str | None:
    """Checkpoint on rank 0; never non-finite weights. The model holds the ranks' mean
    batch-norm statistics; each rank's own, and its RNG state, are kept for an exact resume.
    Returns the path on every rank (None when skipped)."""
    run.heartbeat.beat("checkpoint", run.progress.step)
    with averaged_buffers(run.model, run.dist) as own:
        rng, buffers = zip(*run.dist.gather_object((torch.get_rng_state(), own)))
        path = None
        if run.dist.is_main:
            if not finite(run.model.state_dict().values()):
                run.print(f"[hpcforge] step {run.progress.step}: weights are not finite, "
                          f"checkpoint skipped; the last good one stays in "
                          f"{run.checkpoints.folder}")
            else:
                state = {**_state(run), "rng": list(rng), "rank_buffers": list(buffers)}
                metrics = run.progress.history[-1] if run.progress.history else {}
                path = str(run.checkpoints.save(state, run.progress.step, metrics))
    return run.dist.broadcast_object(path)


@contextmanager
def averaged_buffers(model: torch.nn.Module, dist: Dist) -> Iterator[list[torch.Tensor]]:
    """The ranks' mean batch-norm statistics in `model` for the block (validation, a
    checkpoint); yields this rank's own (on the CPU), which it gets back afterwards. Training
    goes on from each rank's own, whether or not a checkpoint was written: that is what keeps
    resume exact. (Their updates are linear, so the mean at any step equals what averaging
    after every step would give, without a collective per step.)"""
    mine = float_buffers(model)
    own = [b.detach().to("cpu", copy=True) for b in mine]
    dist.average_buffers(model)
    try:
        yield own
    finally:
        for b, kept in zip(mine, own):
            b.copy_(kept)


def resume(run: Run) -> str | None:
    """Load the checkpoint train.resume asks for on every rank; return its W&B run id."""
    found = _find(run.cfg.train.resume, run.checkpoints, run.dist, run.print)
    if found is None:
        return None
    path, ckpt = found
    run.heartbeat.beat("setup")  # (loading a large checkpoint takes a while)
    check_compatible(ckpt, redact(run.cfg.to_dict()), path)  # as saved: redacted
    run.model.load_state_dict(ckpt["model"])
    for phase in run.phases:
        load_optimizer_state(phase.optimizer, ckpt["optimizers"][phase.name])
        phase.scheduler.load_state_dict(ckpt["schedulers"][phase.name])
    if run.scaler is not None and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.checkpoints.best_value = ckpt.get("best_value")
    _restore_ema(run.ema, ckpt, run.print)
    run.progress = Progress(step=ckpt["step"], history=ckpt["history"],
                            nonfinite_total=ckpt["nonfinite"][0],
                            nonfinite_run=ckpt["nonfinite"][1],
                            stop_best=ckpt["early_stop"][0], stop_bad=ckpt["early_stop"][1])
    _restore_position(ckpt, run.loader, run.model, run.dist, run.print)
    run.progress.epoch = run.loader.epoch
    run.resumed_from = path
    run.print(f"[hpcforge] resumed from {path} at step {run.progress.step}")
    return ckpt.get("wandb_run_id")


def _restore_ema(ema: EMA | None, ckpt: dict[str, Any], say: Say) -> None:
    """The checkpoint's weight average; one written without (train.ema.decay was 0, or an older
    checkpoint) starts the average from the resumed weights, and says so."""
    if ema is None:
        return
    if ckpt.get("ema"):
        ema.load_state_dict(ckpt["ema"])
    else:
        ema.reset()
        say("[hpcforge] the checkpoint holds no weight average (train.ema); it starts "
                  "from the resumed weights")


def _find(how: str, checkpoints: Checkpoints, dist: Dist,
          say: Say) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint of train.resume (`how`): none (never), the newest valid one in
    `checkpoints` (auto), or a path."""
    if how == "never":
        return None
    if how == "auto":
        found = checkpoints.latest_valid(log=say)
        _set_aside_damaged(checkpoints, dist, found is None, say)
        if found is None:
            say(f"[hpcforge] resume=auto: no checkpoint in {checkpoints.folder}, starting fresh")
        return found
    path = Path(how)
    if not path.is_file():
        raise UserError(f"train.resume={how}: no such checkpoint file; use auto, never, "
                        f"or a path to a .pt file")
    return path, load(path)


class AllCheckpointsDamaged(UserError):
    """train.resume=auto found checkpoints, and none of them loads: every rank meets it alike."""


def _set_aside_damaged(checkpoints: Checkpoints, dist: Dist, none_valid: bool, say: Say) -> None:
    """Damaged checkpoints move aside (issue 25: never destroy evidence), by rank 0 once every
    rank has looked; when none was valid, resume=auto refuses rather than train over them."""
    damaged = checkpoints.damaged
    if dist.world_size > 1:
        dist.barrier()  # every rank has chosen before any file moves
    if not damaged:
        return
    moved = checkpoints.set_aside(damaged) if dist.is_main else \
        [p.with_name(p.name + DAMAGED_SUFFIX) for p in damaged]
    if none_valid:
        raise AllCheckpointsDamaged(
            f"train.resume=auto: every checkpoint in {checkpoints.folder} is damaged; moved "
            f"aside as {', '.join(p.name for p in moved)}; to start over set train.resume=never "
            f"(they stay as they are), or resume from a good copy with train.resume=PATH")
    say(f"[hpcforge] moved damaged checkpoint(s) aside: {', '.join(map(str, moved))}")


def _restore_position(ckpt: dict[str, Any], loader: ShardedLoader, model: torch.nn.Module,
                      dist: Dist, say: Say) -> None:
    """The same world size goes on from the very batch, RNG and statistics of each rank; another
    splits the epoch differently across ranks, so it restarts that epoch."""
    rank, size = dist.rank, dist.world_size
    if ckpt["ranks"] == size:
        loader.load_state_dict(ckpt["loader"])
        torch.set_rng_state(ckpt["rng"][rank])
        own = ckpt.get("rank_buffers") or [[]] * size  # (older ones: the mean)
        for b, mine in zip(float_buffers(model), own[rank]):
            b.copy_(mine)
    else:
        loader.load_state_dict({"epoch": ckpt["loader"]["epoch"], "batch": 0})
        say(f"[hpcforge] checkpoint has {ckpt['ranks']} ranks, this run {size}: "
                  f"restarting epoch {ckpt['loader']['epoch']}")
