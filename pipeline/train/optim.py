"""Optimizers and learning-rate schedules from config.

The peak learning rate is `lr` times the rank scaling (linear: x ranks, sqrt: x sqrt(ranks)),
reached by a linear warm-up from the unscaled `lr` (Goyal et al. 2017, arXiv:1706.02677), then held
(constant), annealed (cosine) or decayed in steps (step).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from models.base import OptimizerSpec
from pipeline.config import OptimConfig, ScheduleConfig
from pipeline.core.errors import UserError


def rank_scale(how: str, ranks: int) -> float:
    return {"none": 1.0, "linear": float(ranks), "sqrt": math.sqrt(ranks)}[how]


_IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def build_optimizer(spec: OptimizerSpec, cfg: OptimConfig, lr: float,
                    groups: list[tuple[float, list[torch.nn.Parameter]]] | None = None
                    ) -> torch.optim.Optimizer:
    """The optimizer of `spec`'s network (already on its device), with torch's update kernels
    chosen by `cfg.impl`. auto: fused where torch has fused kernels for the optimizer, device and
    dtype (CPU and CUDA for adam, adamw and sgd): one kernel for every parameter instead of a
    Python loop over them, 3.5x faster steps of Adam on CPU here (README, Benchmarks); else torch's
    own default. The result is the same update up to rounding. `groups` ((lr scale, parameters),
    pipeline.train.transfer.lr_groups) become param groups; by default every trainable parameter at
    scale 1 (frozen ones, requires_grad=False, stay out of the optimizer)."""
    lr = lr * spec.lr_scale
    if groups is None:
        groups = [(1.0, [p for p in spec.module.parameters() if p.requires_grad])]
    if cfg.name == "sgd":
        cls, args = torch.optim.SGD, dict(lr=lr, momentum=cfg.momentum,
                                          weight_decay=cfg.weight_decay)
    else:
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        args = dict(lr=lr, betas=spec.betas, weight_decay=cfg.weight_decay)
    params, devices = [p for _, ps in groups for p in ps], _fused_devices()
    unfused = [f"{p.dtype} on {p.device}" for p in params
               if not (p.is_floating_point() and p.device.type in devices)]
    impl = cfg.impl
    if impl == "auto":
        impl = None if unfused else "fused"  # None: torch's own default
    if impl == "fused" and unfused:
        raise UserError(f"train.optim.impl=fused: torch has no fused {cfg.name} for "
                        f"{spec.name!r}'s parameters ({unfused[0]}); use train.optim.impl=auto")
    param_groups = [{"params": ps, "lr": lr * scale} for scale, ps in groups]
    return cls(param_groups, **args, **_IMPLS.get(impl, {}))


def _fused_devices() -> list[str]:
    """Device types with fused optimizer kernels (torch checks this only at the first step)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return _get_fused_kernels_supported_devices()
    except ImportError:  # a private helper: if it moves, the two devices we know
        return ["cpu", "cuda"]


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state but keep this run's update kernels: torch would take
    the saved param groups' `fused`/`foreach` flags, so a checkpoint written with another
    train.optim.impl (or before it existed) would silently switch them."""
    impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, flags in zip(opt.param_groups, impl):
        group.update(flags)


def lr_factor(cfg: ScheduleConfig, step: int, total: int, scale: float) -> float:
    """Multiplier of the optimizer's base lr (already x scale) at optimizer step `step`."""
    if step < cfg.warmup_steps:
        start = 1.0 / scale if scale > 1 else 0.0  # from the unscaled lr, or from ~0 if unscaled
        return start + (1.0 - start) * (step + 1) / cfg.warmup_steps
    t = step - cfg.warmup_steps
    if cfg.name == "cosine":
        frac = min(1.0, t / max(1, total - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    if cfg.name == "step":
        return cfg.gamma ** (t // cfg.step_size)
    return 1.0


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    """torch's LambdaLR, whose `step` only counts once the lr can no longer change (a constant
    schedule after its warm-up, the default): LambdaLR.step recomputes every group's lr in Python,
    ~15 us a step measured on CPU, which a ~0.5 ms step of a small model shows (issue 28). The
    count (`last_epoch`) and the checkpointed state are what LambdaLR's step would leave."""

    def __init__(self, opt: torch.optim.Optimizer, factor: Any, constant_from: float):
        self._constant_from = constant_from
        super().__init__(opt, factor)

    def step(self, epoch: int | None = None) -> None:
        if epoch is None and self.last_epoch >= self._constant_from:
            self.last_epoch += 1
            self._step_count += 1
            return
        super().step(epoch)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_constant_from", None)
        return state


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleConfig, total: int,
                    scale: float) -> Schedule:
    constant_from = cfg.warmup_steps if cfg.name == "constant" else math.inf
    return Schedule(opt, lambda step: lr_factor(cfg, step, total, scale), constant_from)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """The gradients' global norm (before clipping), clipped to `max_norm` if set; on the device.
    Non-finite gradients are clipped too (NaN stays NaN): their update is skipped anyway."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else None)
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if max_norm:  # (with the norm just taken, not again)
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def fused(opt: torch.optim.Optimizer) -> bool:
    """Whether every param group steps with torch's fused kernels (build_optimizer, impl=auto)."""
    return all(group.get("fused") for group in opt.param_groups)
