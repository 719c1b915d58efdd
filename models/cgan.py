"""Conditional GAN (Mirza & Osindero 2014, arXiv:1411.1784): G(z, c) and D(x, c) both see the
condition c, a class index (learned embedding) or a continuous value such as the incident energy
of a calorimeter shower (mapped onto [0, 1] over `cond_range`, linearly or in log, then a learned
linear projection). MLP networks and the non-saturating GAN objective of `models.gan`."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import Batch, InputShapeError, check_shape
from models.gan import GAN, MLPDiscriminator, MLPGenerator
from models.objectives import check_labels


@dataclass
class CGANConfig:
    data_shape: tuple[int, ...] = (1, 16, 16)  # one sample, e.g. (C, H, W) or (features,)
    latent_dim: int = 16
    cond: Literal["class", "continuous"] = "class"  # batch["cond"]: int64 (B,) or float (B,)
    n_classes: int = 10                        # cond "class": labels in [0, n_classes)
    cond_range: tuple[float, float] = (0.0, 1.0)  # cond "continuous": mapped onto [0, 1]
    cond_scale: Literal["linear", "log"] = "linear"  # ... linearly, or in log (log-uniform E)
    embed_dim: int = 8                         # size of the condition's embedding
    g_hidden: tuple[int, ...] = (128, 128)
    d_hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.0                       # in the discriminator
    output: Literal["sigmoid", "tanh"] = "sigmoid"  # G's range: data in [0, 1] or [-1, 1]
    d_lr_scale: float = 1.0
    beta1: float = 0.5


def cond_embedding(cfg: CGANConfig) -> nn.Module:
    """class: (B,) int64 -> (B, embed_dim); continuous: (B, 1) -> (B, embed_dim)."""
    if cfg.cond == "class":
        return nn.Embedding(cfg.n_classes, cfg.embed_dim)
    return nn.Linear(1, cfg.embed_dim)


class Conditioned(nn.Module):
    """net([x flattened, embed(c)]): the condition's embedding appended to the network's input."""

    def __init__(self, net: nn.Module, embed: nn.Module):
        super().__init__()
        self.net, self.embed = net, embed

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1), self.embed(c)], dim=1))


class CGAN(GAN):
    conditional = True  # (Trainable.conditional) generates at batch["cond"], class or value

    def __init__(self, cfg: CGANConfig):
        if cfg.cond not in ("class", "continuous"):
            raise ValueError(f"cgan: cond {cfg.cond!r}: expected 'class' or 'continuous'")
        lo, hi = cfg.cond_range
        if not (0 if cfg.cond_scale == "log" else -math.inf) < lo < hi:
            raise ValueError(f"cgan: cond_range {cfg.cond_range}: expected lo < hi (and lo > 0 "
                             f"for cond_scale 'log')")
        # G and D each own an embedding of c, trained by that network's optimizer
        g = MLPGenerator(cfg.latent_dim, cfg.g_hidden, cfg.data_shape, cfg.output, cfg.embed_dim)
        d = MLPDiscriminator(cfg.data_shape, cfg.d_hidden, cfg.dropout, cfg.embed_dim)
        super().__init__(Conditioned(g, cond_embedding(cfg)), Conditioned(d, cond_embedding(cfg)),
                         cfg.latent_dim, cfg.data_shape, cfg.output, cfg.d_lr_scale,
                         (cfg.beta1, 0.999), "cgan")
        self.cfg = cfg

    def condition(self, batch: Batch, n: int) -> torch.Tensor:
        if "cond" not in batch:
            raise InputShapeError("cgan: the batch has no 'cond' key; expected the condition as "
                                  "batch['cond'] (class index int64 or float value, shape (B,))")
        c = batch["cond"]
        check_shape("cgan condition cond", c, (n,))
        if self.cfg.cond == "class":
            return check_labels("cgan condition cond", c, self.cfg.n_classes)
        return self.unit_condition(c.to(self.z_fixed.dtype)).unsqueeze(1)

    def unit_condition(self, c: torch.Tensor) -> torch.Tensor:
        """A continuous condition mapped onto [0, 1] over cond_range (linear or log scale)."""
        lo, hi = self.cfg.cond_range
        if self.cfg.cond_scale == "log":
            c, lo, hi = c.log(), math.log(lo), math.log(hi)
        return (c - lo) / (hi - lo)

    def generate(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.generator(z, self.condition(batch, z.shape[0]))

    def discriminate(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.discriminator(x, self.condition(batch, x.shape[0]))

    def figure_batch(self, batch: Batch) -> Batch:
        """Fixed conditions for the fixed noise: classes 0, 1, ... cycling, or an even sweep."""
        n, dev = self.z_fixed.shape[0], self.z_fixed.device
        if self.cfg.cond == "class":
            return {"cond": torch.arange(n, device=dev) % self.cfg.n_classes}
        lo, hi = self.cfg.cond_range
        if self.cfg.cond_scale == "log":
            return {"cond": torch.logspace(math.log10(lo), math.log10(hi), n, device=dev)}
        return {"cond": torch.linspace(lo, hi, n, device=dev)}


def build(cfg: CGANConfig) -> CGAN:
    return CGAN(cfg)
