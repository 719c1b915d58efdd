"""Optimizers and learning-rate schedules from config.

The peak learning rate is `lr` times the rank scaling (linear: x ranks, sqrt: x sqrt(ranks)), reached
by a linear warm-up from the unscaled `lr` (Goyal et al. 2017, arXiv:1706.02677), then held
(constant), annealed (cosine) or decayed in steps (step).
"""
from __future__ import annotations

import math

import torch

from models.base import OptimizerSpec
from pipeline.config import OptimConfig, ScheduleConfig


def rank_scale(how: str, ranks: int) -> float:
    return {"none": 1.0, "linear": float(ranks), "sqrt": math.sqrt(ranks)}[how]


def build_optimizer(spec: OptimizerSpec, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    params = spec.module.parameters()
    lr = lr * spec.lr_scale
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=spec.betas, weight_decay=cfg.weight_decay)


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


def build_scheduler(opt: torch.optim.Optimizer, cfg: ScheduleConfig, total: int,
                    scale: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step, total, scale))
