"""Plain convolutional classifier/regressor: conv stages with pooling or strided downsampling,
global average pooling and one linear head. Presets give a LeNet-5-style net (LeCun et al. 1998)
and a small VGG-style net (Simonyan & Zisserman 2015, arXiv:1409.1556)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import check_shape, with_channel_axis
from models.blocks import conv_block
from models.objectives import Supervised, check_loss

# A preset replaces the architecture fields below; loss, in_channels, n_outputs, dropout stay.
PRESETS = {
    # 5x5 convs, average pooling, tanh, no normalisation; widths 6 and 16 as in LeNet-5
    "lenet5": dict(channels=(6, 16), convs_per_stage=1, kernel_size=5, downsample="avg",
                   activation="tanh", batchnorm=False),
    # stacks of two 3x3 convs then max pooling, with batchnorm, narrowed for small fields
    "vgg": dict(channels=(16, 32, 64), convs_per_stage=2, kernel_size=3, downsample="max",
                activation="relu", batchnorm=True),
}


@dataclass
class CNNConfig:
    in_channels: int = 1                    # unset: the store's (1 for (H, W) fields)
    preset: Literal["custom", "lenet5", "vgg"] = "custom"  # non-custom replaces the 6 fields below
    channels: tuple[int, ...] = (16, 32)    # width of each stage; each stage halves H and W
    convs_per_stage: int = 1                # convolutions per stage
    kernel_size: int = 3                    # odd; "same" padding
    downsample: Literal["max", "avg", "stride"] = "max"  # pool, or stride 2 in a stage's last conv
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = "relu"
    batchnorm: bool = True
    dropout: float = 0.0                    # before the linear head
    n_outputs: int = 10                     # classes (ce, hinge) or targets (mse); unset: the store's
    loss: Literal["ce", "hinge", "mse"] = "ce"


def resolve(cfg: CNNConfig) -> CNNConfig:
    """The config with the preset's architecture fields applied."""
    if cfg.preset == "custom":
        return cfg
    if cfg.preset not in PRESETS:
        raise ValueError(f"cnn: preset {cfg.preset!r}: expected custom, {', '.join(PRESETS)}")
    return dataclasses.replace(cfg, **PRESETS[cfg.preset])


class CNN(Supervised):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        cfg = resolve(cfg)
        check_loss("cnn", cfg.loss, ("ce", "hinge", "mse"))
        if cfg.downsample not in ("max", "avg", "stride"):
            raise ValueError(f"cnn: downsample {cfg.downsample!r}: expected max, avg or stride")
        self.cfg = cfg
        chans = (cfg.in_channels, *cfg.channels)
        stages = []
        for a, b in zip(chans[:-1], chans[1:]):
            # (B, a, H, W) -> (B, b, H/2, W/2)
            n = cfg.convs_per_stage
            stride = [2 if cfg.downsample == "stride" and i == n - 1 else 1 for i in range(n)]
            convs = [conv_block(a if i == 0 else b, b, cfg.kernel_size, stride[i],
                                norm=cfg.batchnorm, act=cfg.activation) for i in range(n)]
            pool = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "stride": nn.Identity()}
            stages.append(nn.Sequential(*convs, pool[cfg.downsample]))
        self.features = nn.Sequential(*stages)
        # (B, channels[-1], h, w) -> (B, channels[-1]) -> (B, n_outputs)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(cfg.dropout),
                                  nn.Linear(chans[-1], cfg.n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = with_channel_axis(x, self.cfg.in_channels)
        check_shape("cnn input x", x, (None, self.cfg.in_channels, None, None))
        smallest = 2 ** len(self.cfg.channels)
        if min(x.shape[-2:]) < smallest:
            raise ValueError(f"cnn input x: expected H, W >= {smallest} (one halving per stage), "
                             f"got {tuple(x.shape)}; use fewer channels entries")
        return self.head(self.features(x))


def build(cfg: CNNConfig) -> CNN:
    return CNN(cfg)
