"""Residual network of basic blocks (He et al. 2016, arXiv:1512.03385), CIFAR-style: a 3x3 stem,
stages of blocks where every stage after the first halves the resolution, global average pooling
and a linear head."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import check_shape, with_channel_axis
from models.blocks import BasicBlock, conv_block
from models.objectives import Supervised, check_loss


@dataclass
class ResNetConfig:
    in_channels: int = 1                    # unset: the store's (1 for (H, W) fields)
    stem_channels: int = 16                   # width after the 3x3 stem
    channels: tuple[int, ...] = (16, 32, 64)  # stage widths; stages after the first halve H, W
    blocks_per_stage: tuple[int, ...] = (2, 2, 2)  # depth: basic blocks in each stage
    n_outputs: int = 10                       # classes (ce, hinge) or targets (mse); unset: the store's
    loss: Literal["ce", "hinge", "mse"] = "ce"


class ResNet(Supervised):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        check_loss("resnet", cfg.loss, ("ce", "hinge", "mse"))
        if len(cfg.blocks_per_stage) != len(cfg.channels) or min(cfg.blocks_per_stage) < 1:
            raise ValueError(f"resnet: blocks_per_stage {cfg.blocks_per_stage} must give >= 1 "
                             f"block for each of the {len(cfg.channels)} entries of channels")
        self.cfg = cfg
        # (B, in_channels, H, W) -> (B, stem_channels, H, W)
        self.stem = conv_block(cfg.in_channels, cfg.stem_channels)
        blocks, width = [], cfg.stem_channels
        for i, (c, n) in enumerate(zip(cfg.channels, cfg.blocks_per_stage)):
            # (B, width, h, w) -> (B, c, h/s, w/s), s = 2 except in the first stage; the first
            # block of a stage projects the shortcut when the shape changes
            blocks += [BasicBlock(width if j == 0 else c, c, 2 if i > 0 and j == 0 else 1)
                       for j in range(n)]
            width = c
        self.stages = nn.Sequential(*blocks)
        # (B, channels[-1], h, w) -> (B, n_outputs)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(width, cfg.n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = with_channel_axis(x, self.cfg.in_channels)
        check_shape("resnet input x", x, (None, self.cfg.in_channels, None, None))
        return self.head(self.stages(self.stem(x)))


def build(cfg: ResNetConfig) -> ResNet:
    return ResNet(cfg)
