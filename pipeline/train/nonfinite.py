"""The non-finite guard: each step's flag stays on the device, and is read and counted at log steps,
before every checkpoint and at the end (issue 28), so a bad step never reaches a checkpoint and
NonFiniteError names the step that crossed the limit. Also the fault injection that tests it.

A read waits for the device's queue to drain, and a GPU runs a step of these models in about a
millisecond. torch's fused optimizers (train.optim.impl=auto picks them) take the check as
`found_inf` and skip the update on the device, as they do under AMP's GradScaler; unfused
optimizers, and fp16 with a GradScaler, read it at each step (pipeline.train.loop._update).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.base import Batch
from pipeline.train.progress import Progress


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps (or one, with train.nonfinite=fail)."""


FOLD_EVERY = 1024  # unread flags are joined into one tensor this often (bounded Python objects)


@dataclass
class NonFinite:
    """The steps' flags (0-d, true for a good step) not yet read on the host, and what a bad step
    means: `mode` (train.nonfinite: skip or fail) and `limit` (train.max_nonfinite) bad steps in a
    row; `folder` holds the last good checkpoint, which the error names."""
    mode: str
    limit: int
    folder: Path
    unread: list[torch.Tensor] = field(default_factory=list)

    def note(self, finite: torch.Tensor) -> None:
        """Keep the step's flag on the device until `settle`; many steps between reads (a large
        train.logger.log_every) are joined into one tensor every FOLD_EVERY steps."""
        self.unread.append(finite)
        if len(self.unread) >= FOLD_EVERY:
            self.unread[:] = [_joined(self.unread)]

    def settle(self, progress: Progress) -> None:
        """Read the unread steps' flags on the host and count them in `progress`, raising
        NonFiniteError for the step that crossed the limit, as a check at that step would have.
        Called at log steps, before every checkpoint and at the end; the skipped steps changed no
        weights, so what is saved after a settle never holds a bad step. Every rank settles at
        the same steps and reads the same flags (decided on averaged gradients)."""
        if not self.unread:
            return
        flags = _joined(self.unread).tolist()
        self.unread.clear()
        first = progress.step - len(flags) + 1  # the steps they belong to end at this one
        for i, finite in enumerate(flags):
            self._count(progress, not finite, first + i)

    def _count(self, progress: Progress, bad: bool, step: int) -> None:
        progress.nonfinite_total += bad
        progress.nonfinite_run = progress.nonfinite_run + 1 if bad else 0
        if bad and (self.mode == "fail" or progress.nonfinite_run >= self.limit):
            raise NonFiniteError(f"{progress.nonfinite_run} non-finite step(s) in a row at step "
                                 f"{step} (train.nonfinite={self.mode}, "
                                 f"train.max_nonfinite={self.limit}); the last good "
                                 f"checkpoint is in {self.folder}. Lower train.lr or set "
                                 f"train.grad_clip")


def _joined(flags: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([f.reshape(-1) for f in flags])


def inject_nan(batches: list[Batch], step: int, at: list[int], is_main: bool) -> None:
    """Fault injection (train.inject_nan_at, the steps `at`): when `step` is one of them, rank 0's
    first float input becomes NaN."""
    if step in at and is_main:
        for k, v in batches[0].items():
            if v.is_floating_point():
                batches[0][k] = torch.full_like(v, float("nan"))
                break
