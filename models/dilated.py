"""Context aggregation by dilated convolutions (Yu & Koltun 2016, arXiv:1511.07122): the resolution
stays constant while dilations 1, 2, 4, ... grow the receptive field exponentially. A dense head
predicts every pixel (field regression or per-pixel classes); a pooled head predicts per sample."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import Batch, check_shape
from models.blocks import conv_block
from models.figures import field_figures
from models.objectives import Supervised, check_loss


@dataclass
class DilatedConfig:
    in_channels: int = 1
    width: int = 16                             # channels of every dilated layer
    dilations: tuple[int, ...] = (1, 2, 4, 8)   # one 3x3 conv each; receptive field 1 + 2 * sum
    out_channels: int = 1                       # per-pixel fields (mse) / classes (ce), or outputs
    head: Literal["dense", "pooled"] = "dense"  # dense: (B, out, H, W); pooled: (B, out)
    loss: Literal["mse", "ce", "hinge"] = "mse"


class DilatedCNN(Supervised):
    def __init__(self, cfg: DilatedConfig):
        super().__init__()
        check_loss("dilated_cnn", cfg.loss, ("mse", "ce", "hinge"))
        if cfg.head not in ("dense", "pooled"):
            raise ValueError(f"dilated_cnn: head {cfg.head!r}: expected 'dense' or 'pooled'")
        self.cfg = cfg
        chans = (cfg.in_channels, *[cfg.width] * len(cfg.dilations))
        # (B, in_channels, H, W) -> (B, width, H, W), same resolution throughout
        self.context = nn.Sequential(*[conv_block(a, b, 3, dilation=d) for a, b, d in
                                       zip(chans[:-1], chans[1:], cfg.dilations)])
        if cfg.head == "dense":  # (B, width, H, W) -> (B, out_channels, H, W)
            self.head: nn.Module = nn.Conv2d(cfg.width, cfg.out_channels, 1)
        else:                    # (B, width, H, W) -> (B, out_channels)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                      nn.Linear(cfg.width, cfg.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("dilated_cnn input x", x, (None, self.cfg.in_channels, None, None))
        return self.head(self.context(x))

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.cfg.head != "dense":
            return {}
        return field_figures(self(batch["x"][:8]), batch["y"][:8], self.cfg.loss)


def build(cfg: DilatedConfig) -> DilatedCNN:
    return DilatedCNN(cfg)
