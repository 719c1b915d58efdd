"""What a training run is: its parts (`Run`), one optimizer phase (`Phase`), its progress
(`Progress`, from pipeline.train.progress), and the few functions of a run's state every part uses
(seeds, weight digests, buffers, autocast).

`pipeline.train.assembly.build(cfg, dist)` makes a Run; the loop (pipeline.train.loop) reads and
steps it; pipeline.train.state checkpoints and resumes it. This module imports none of them (issue
#27: the assembly and the state module both need Run, and resuming happens in the assembly).
"""
from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.base import Batch, Trainable
from pipeline.config import Config, TrainConfig
from pipeline.core.checkpoint import Checkpoints
from pipeline.data.loader import ShardedLoader
from pipeline.runtime.dist import Dist
from pipeline.runtime.preemption import Preemption
from pipeline.runtime.tracking import Tracker
from pipeline.runtime.watchdog import Heartbeat
from pipeline.train.adversarial import adversarial_batch
from pipeline.train.ema import EMA
from pipeline.train.image_hooks import ImageHook
from pipeline.train.nonfinite import NonFinite
from pipeline.train.profile import StepTimer
from pipeline.train.progress import Progress
from pipeline.train.transfer import Matched


def seed_for(seed: int, rank: int, epoch: int = 0) -> int:
    """The one place seeds come from: distinct per (seed, rank, epoch), stable across runs."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in name order: equal digests, equal weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def float_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's batch-norm statistics (and any other floating-point buffers)."""
    return [b for b in model.buffers() if b.is_floating_point()]


class BufferGuard:
    """Batch-norm statistics as they were before the step: a non-finite batch poisons them too,
    so a skipped step is undone in them as well. The buffers are looked up once (walking the
    module tree every step costs more than the small models' math) and copied in one batched
    call into the same memory."""

    def __init__(self, model: torch.nn.Module):
        self.buffers = float_buffers(model)
        # where the buffers share a dtype and device and are contiguous, the saved copy and the
        # step's values are each one flat tensor with views made once, so that `restore_if_bad`
        # is three kernels and no Python loop however many buffers there are (a GPU pays ~5 us
        # a kernel; on CPU the views cost ~1 us each, made every step before)
        kinds = {(b.dtype, b.device) for b in self.buffers}
        flat = len(kinds) == 1 and all(b.is_contiguous() for b in self.buffers)
        sizes = [b.numel() for b in self.buffers]
        self.flat = torch.cat([b.detach().reshape(-1) for b in self.buffers]) if flat else None
        if self.flat is not None:
            self.saved = [part.view_as(b) for part, b in zip(self.flat.split(sizes), self.buffers)]
            self.now = torch.empty_like(self.flat)
            self.now_parts = [part.view_as(b) for part, b in zip(self.now.split(sizes),
                                                                 self.buffers)]
            self.flat_views = [b.detach().view(-1) for b in self.buffers]  # the buffers' memory
        else:
            self.saved = [b.clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.saved, self.buffers)

    def restore(self) -> None:
        for b, old in zip(self.buffers, self.saved):
            b.copy_(old)

    def restore_if_bad(self, bad: torch.Tensor) -> None:
        """`restore` if the 0-d tensor `bad` is nonzero (a phase's gradients were not finite),
        decided on its device without reading it on the host (issue 28). torch.where, not a lerp:
        a poisoned buffer is NaN, and NaN * 0 is NaN."""
        if not self.buffers:
            return
        finite = bad == 0
        if self.flat is None:
            for b, old in zip(self.buffers, self.saved):
                torch.where(finite, b, old, out=b)
            return
        torch.cat(self.flat_views, out=self.now)
        torch.where(finite, self.now, self.flat, out=self.now)
        torch._foreach_copy_(self.buffers, self.now_parts)


@dataclass
class Phase:
    """One network's update: its parameters, optimizer (already wrapped to average gradients over
    ranks) and lr schedule. A step runs the phases in the model's order, each `repeats` times,
    each repetition on a batch group of its own (n_critic critic updates per generator update,
    each on a fresh real batch: Algorithm 1 of Gulrajani et al. 2017, arXiv:1704.00028)."""
    name: str
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    repeats: int = 1

    def __post_init__(self) -> None:
        kinds = {(p.device, p.dtype) for p in self.params}
        # every parameter real and of one device and dtype: one non-finite check kernel, no grouping
        self.one_kind = len(kinds) == 1 and not any(p.is_complex() for p in self.params)


@dataclass
class Run:
    """The parts of one training run on this rank; pipeline.train.loop.fit trains it."""
    cfg: Config
    dist: Dist
    heartbeat: Heartbeat
    model: Trainable               # the raw module: checkpoints hold its state_dict
    compiled_losses: Any           # model.losses through torch.compile (train.compile), or None
    phases: list[Phase]
    loader: ShardedLoader
    val_loader: ShardedLoader | None
    checkpoints: Checkpoints
    preemption: Preemption
    hooks: list[ImageHook]
    store_meta: dict[str, Any]     # the dataset's identity, kept in checkpoints and W&B
    provenance: dict[str, Any]     # versions and git revision, asked once per run
    buffer_guard: BufferGuard
    scaler: torch.amp.GradScaler | None = None
    tracker: Tracker | None = None
    draws: int = 1                 # batch groups per step: the most repeats of any phase
    progress: Progress = field(default_factory=Progress)
    resumed_from: Path | None = None  # what train.resume found (pipeline.train.state.resume)
    transfer: Matched | None = None   # what train.init_from loaded (pipeline.train.transfer)
    ema: EMA | None = None         # the generating network's weight average (train.ema.decay)
    timer: StepTimer = field(default_factory=StepTimer)  # train.profile (pipeline.train.profile)
    # the steps' non-finite flags still on the device and what a bad one means (train.nonfinite,
    # train.max_nonfinite); read at log steps and before checkpoints (pipeline.train.nonfinite)
    nonfinite: NonFinite = field(init=False)

    def __post_init__(self) -> None:
        train_cfg = self.cfg.train
        self.nonfinite = NonFinite(train_cfg.nonfinite, train_cfg.max_nonfinite,
                                   self.checkpoints.folder)

    @property
    def train_cfg(self) -> TrainConfig:
        return self.cfg.train

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir) / "train"

    @property
    def batches_per_step(self) -> int:
        """`accumulate` batches for each of `draws` phase repetitions."""
        return self.cfg.train.accumulate * self.draws

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader) // self.batches_per_step

    @property
    def phase_order(self) -> list[tuple[Phase, int]]:
        """(phase, repetition) for each update of a step, in the model's order (e.g. critic x5,
        then generator); repetition r trains on the step's r-th batch group."""
        return [(p, r) for p in self.phases for r in range(p.repeats)]

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        """The model's named losses for `phase` (looked up at each call: tests wrap it)."""
        return (self.compiled_losses or self.model.losses)(batch, phase)

    def train_losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        """The losses a training step backpropagates: with train.adversarial.eps > 0, on the batch
        with part of it replaced by adversarial examples made on this rank
        (pipeline.train.adversarial)."""
        adv = self.cfg.train.adversarial
        if adv.eps > 0:
            batch = adversarial_batch(self.model, batch, adv.eps, adv.method, adv.steps,
                                      adv.fraction)
        return self.losses(batch, phase)

    def print(self, msg: str) -> None:
        """Rank 0 owns the terminal."""
        if self.dist.is_main:
            print(msg, flush=True)


def autocast(precision: str, device: torch.device):
    """The forward's precision (train.precision) on `device`; fp32 runs without autocast."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
