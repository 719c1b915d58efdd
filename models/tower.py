"""Several fields of different shapes as one input: one small convolutional tower per field, their
features joined, one head (issue 24). Made for calorimeter showers stored as CaloGAN does
(Paganini et al. 2018, arXiv:1705.02355): layer_0 (3, 96), layer_1 (12, 12) and layer_2 (12, 6)
of one event, each a 2-D image of its own granularity that no single convolution fits.

The input is the fields flattened and joined, in order, as the loader gives several variables
(`data.inputs.x=[layer_0, layer_1, layer_2]`: (B, 288 + 144 + 72)); the model cuts it back into
`layer_shapes`, each (H, W) or (C, H, W), so it takes each layer as it is stored. Left unset,
`layer_shapes` and `n_outputs` come from the store (pipeline.train.shapes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import InputShapeError
from models.blocks import conv_block, mlp
from models.objectives import Supervised, check_loss


@dataclass
class TowerConfig:
    # each field's shape as stored, (H, W) or (C, H, W), in the order of data.inputs.x; unset: the store's
    layer_shapes: tuple[tuple[int, ...], ...] = ((3, 96), (12, 12), (12, 6))
    channels: tuple[int, ...] = (8, 16)   # each tower's 3x3 convolutions (no downsampling)
    pooled: int = 2                       # each tower ends in a pooled x pooled grid per channel
    hidden: int = 64                      # width of the joined head's hidden layer
    dropout: float = 0.0                  # before the head's last layer
    n_outputs: int = 3                    # classes (ce, hinge) or targets (mse); unset: the store's
    loss: Literal["ce", "hinge", "mse"] = "ce"


def _image(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of a field stored as (H, W) or (C, H, W)."""
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return tuple(shape)  # type: ignore[return-value]
    raise ValueError(f"tower: layer shape {tuple(shape)}: expected (H, W) or (C, H, W); join "
                     f"vectors through model=mlp")


class Tower(nn.Module):
    """(B, C, H, W) -> (B, channels[-1] * pooled**2): convolutions at the field's own granularity,
    then adaptive average pooling, so fields of any size give features of one size."""

    def __init__(self, c_in: int, channels: tuple[int, ...], pooled: int):
        super().__init__()
        chans = (c_in, *channels)
        self.convs = nn.Sequential(*(conv_block(a, b) for a, b in zip(chans[:-1], chans[1:])))
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(pooled), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.convs(x))


class TowerNet(Supervised):
    def __init__(self, cfg: TowerConfig):
        super().__init__()
        check_loss("tower", cfg.loss, ("ce", "hinge", "mse"))
        if not cfg.layer_shapes or not cfg.channels:
            raise ValueError("tower: layer_shapes and channels need one entry or more")
        self.cfg = cfg
        self.images = [_image(s) for s in cfg.layer_shapes]
        self.sizes = [math.prod(s) for s in self.images]
        # one tower per field: (B, C_i, H_i, W_i) -> (B, channels[-1] * pooled**2)
        self.towers = nn.ModuleList(Tower(c, cfg.channels, cfg.pooled) for c, _, _ in self.images)
        # joined: (B, fields * channels[-1] * pooled**2) -> (B, hidden) -> (B, n_outputs)
        joined = len(self.images) * cfg.channels[-1] * cfg.pooled ** 2
        self.head = mlp((joined, cfg.hidden, cfg.n_outputs), "relu", cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, sum of the fields' sizes), the fields flattened and joined -> (B, n_outputs)."""
        total = sum(self.sizes)
        if x.dim() != 2 or x.shape[1] != total:
            shapes = " + ".join(str(tuple(s)) for s in self.cfg.layer_shapes)
            raise InputShapeError(f"tower input x: expected shape (*, {total}) (the fields "
                                  f"{shapes} flattened and joined), got {tuple(x.shape)}")
        fields = torch.split(x, self.sizes, dim=1)
        feats = [t(f.reshape(-1, *img)) for t, f, img in zip(self.towers, fields, self.images)]
        return self.head(torch.cat(feats, 1))


def build(cfg: TowerConfig) -> TowerNet:
    return TowerNet(cfg)
