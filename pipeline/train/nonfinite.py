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
from pipeline.train.optim import clip_gradients
from pipeline.train.progress import Progress


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps (or one, with train.nonfinite=fail)."""


FOLD_EVERY = 1024  # unread flags are joined into one tensor this often (bounded Python objects)


def judge(params: list[torch.nn.Parameter], one_kind: bool, clip: float, want_norm: bool
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bad, norm) of a phase's averaged gradients: `bad` as `check` gives it, and their global
    norm (before clipping them to `clip`, if set) where it is needed, with clipping or when
    `want_norm` (a log step), else None: the norm takes four kernels, the check one."""
    if not (clip or want_norm):
        return check(params, one_kind), None
    norm = clip_gradients(params, clip)
    bad = torch.where(norm < _INF, 0.0, 1.0)  # (a norm is >= 0 or NaN: NaN < inf is false)
    return (bad if bad.dtype == torch.float32 else bad.float()), norm


_INF = float("inf")


def check(params: list[torch.nn.Parameter], one_kind: bool = False) -> torch.Tensor:
    """1.0 if any of `params`' gradients holds an inf or a NaN, else 0.0: a 0-d float32 on their
    device, computed there in one kernel per device and dtype (torch's AMP check, which
    GradScaler uses, at scale 1: the gradients are multiplied by 1.0, which changes no value, NaN
    included). Complex gradients (FNO) are checked as their real views. `one_kind`: the caller
    knows that every parameter is real and of one device and dtype (`Phase.one_kind`), so no
    grouping is needed. Measured against the global norm's `norm < inf` it replaced where no
    norm is needed: 19 against 46 us a step for the VAE's 16 gradients, 5 against 20 us for the
    MLP's 6 (CPU, 1 thread)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None, dtype=torch.float32)
    if one_kind:
        groups = {grads[0].device: grads}
    else:
        groups = {}
        for g in grads:
            g = torch.view_as_real(g) if g.is_complex() else g
            groups.setdefault((g.device, g.dtype), []).append(g)
    found = None
    for same in groups.values():
        device = same[0].device
        flag = torch.zeros((), device=device, dtype=torch.float32)
        torch._amp_foreach_non_finite_check_and_unscale_(same, flag, _one(device))
        found = flag if found is None else found + flag.to(found.device)
    return found


_ONES: dict[torch.device, torch.Tensor] = {}


def _one(device: torch.device) -> torch.Tensor:
    if device not in _ONES:
        _ONES[device] = torch.ones((), device=device, dtype=torch.float32)
    return _ONES[device]


@dataclass
class NonFinite:
    """The steps' flags (0-d float, 0 for a good step) not yet read on the host, and what a bad step
    means: `mode` (train.nonfinite: skip or fail) and `limit` (train.max_nonfinite) bad steps in a
    row; `folder` holds the last good checkpoint, which the error names."""
    mode: str
    limit: int
    folder: Path
    unread: list[torch.Tensor] = field(default_factory=list)

    def note(self, bad: torch.Tensor) -> None:
        """Keep the step's flag (0-d, nonzero where a phase's gradients were not finite) on the
        device until `settle`; many steps between reads (a large train.logger.log_every) are
        joined into one tensor every FOLD_EVERY steps."""
        self.unread.append(bad)
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
        for i, bad in enumerate(flags):
            self._count(progress, bool(bad), first + i)

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
    """The flags as one vector: a stack of the steps' 0-d flags (a reshape of each before a cat
    cost ~4 us a flag), after the vector of those joined earlier, if any."""
    if flags[0].dim() == 0:
        return torch.stack(flags)
    return torch.cat([flags[0], torch.stack(flags[1:])]) if len(flags) > 1 else flags[0]


def inject_nan(batches: list[Batch], step: int, at: list[int], is_main: bool) -> None:
    """Fault injection (train.inject_nan_at, the steps `at`): when `step` is one of them, rank 0's
    first float input becomes NaN."""
    if step in at and is_main:
        for k, v in batches[0].items():
            if v.is_floating_point():
                batches[0][k] = torch.full_like(v, float("nan"))
                break
