"""The non-finite guard: each step's flag stays on the device, and is read and counted at log steps,
before every checkpoint and at the end (issue 28), so a bad step never reaches a checkpoint and
NonFiniteError names the step that crossed the limit. Also the fault injection that tests it.

A read waits for the device's queue to drain, and a GPU runs a step of these models in about a
millisecond. torch's fused optimizers (train.optim.impl=auto picks them) take the check as
`found_inf` and skip the update on the device, as they do under AMP's GradScaler; unfused
optimizers, and fp16 with a GradScaler, read it at each step (pipeline.train.loop._update).
"""
from __future__ import annotations

import torch

from models.base import Batch
from pipeline.train.run import Run


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps (or one, with train.nonfinite=fail)."""


FOLD_EVERY = 1024  # unread flags are joined into one tensor this often (bounded Python objects)


def note(run: Run, finite: torch.Tensor) -> None:
    """Keep the step's flag (0-d, true for a good step) on the device until `settle`; many steps
    between reads (a large train.logger.log_every) are joined into one tensor every FOLD_EVERY
    steps."""
    run.unread.append(finite)
    if len(run.unread) >= FOLD_EVERY:
        run.unread[:] = [_joined(run.unread)]


def _joined(flags: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([f.reshape(-1) for f in flags])


def settle(run: Run) -> None:
    """Read the unread steps' non-finite flags on the host and count them, raising
    NonFiniteError for the step that crossed the limit, as a check at that step would have.
    Called at log steps, before every checkpoint and at the end; the skipped steps changed no
    weights, so what is saved after a settle never holds a bad step. Every rank settles at the
    same steps and reads the same flags (decided on averaged gradients)."""
    if not run.unread:
        return
    flags = _joined(run.unread).tolist()
    run.unread.clear()
    first = run.progress.step - len(flags) + 1  # the steps they belong to end at this one
    for i, finite in enumerate(flags):
        _count_nonfinite(run, not finite, first + i)


def _count_nonfinite(run: Run, bad: bool, step: int) -> None:
    progress, train_cfg = run.progress, run.cfg.train
    progress.nonfinite_total += bad
    progress.nonfinite_run = progress.nonfinite_run + 1 if bad else 0
    if bad and (train_cfg.nonfinite == "fail" or progress.nonfinite_run >= train_cfg.max_nonfinite):
        raise NonFiniteError(f"{progress.nonfinite_run} non-finite step(s) in a row at step "
                             f"{step} (train.nonfinite={train_cfg.nonfinite}, "
                             f"train.max_nonfinite={train_cfg.max_nonfinite}); the last good "
                             f"checkpoint is in {run.checkpoints.folder}. Lower train.lr or set "
                             f"train.grad_clip")


def inject_nan(run: Run, batches: list[Batch]) -> None:
    """Fault injection (train.inject_nan_at): rank 0's first float input becomes NaN."""
    if run.progress.step + 1 in run.cfg.train.inject_nan_at and run.dist.is_main:
        for k, v in batches[0].items():
            if v.is_floating_point():
                batches[0][k] = torch.full_like(v, float("nan"))
                break
