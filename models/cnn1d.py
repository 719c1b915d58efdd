"""1-D convolutional network for signals and sequences (B, C, T): classification of a window, or
regression of the next `horizon` steps of every channel (next-window forecasting)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import Batch, check_shape
from models.blocks import activation
from models.figures import forecast_figure
from models.objectives import Supervised, check_loss


@dataclass
class CNN1DConfig:
    in_channels: int = 1                  # signal channels C
    seq_len: int = 64                     # input window T; must be divisible by 2**len(channels)
    channels: tuple[int, ...] = (16, 32)  # one conv + max-pool (halving T) per entry
    kernel_size: int = 5                  # odd; "same" padding
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = "relu"
    loss: Literal["ce", "hinge", "mse"] = "ce"  # ce/hinge: classify the window; mse: forecast
    n_classes: int = 2                    # classes (ce, hinge)
    horizon: int = 8                      # steps forecast after the window (mse): y (B, C, horizon)


class CNN1D(Supervised):
    def __init__(self, cfg: CNN1DConfig):
        super().__init__()
        check_loss("cnn1d", cfg.loss, ("ce", "hinge", "mse"))
        if cfg.seq_len % 2 ** len(cfg.channels) or cfg.kernel_size % 2 == 0:
            raise ValueError(f"cnn1d: seq_len {cfg.seq_len} must be divisible by "
                             f"2**{len(cfg.channels)} and kernel_size {cfg.kernel_size} odd")
        self.cfg = cfg
        chans, layers = (cfg.in_channels, *cfg.channels), []
        for a, b in zip(chans[:-1], chans[1:]):
            # (B, a, t) -> (B, b, t/2)
            layers += [nn.Conv1d(a, b, cfg.kernel_size, padding=cfg.kernel_size // 2, bias=False),
                       nn.BatchNorm1d(b), activation(cfg.activation), nn.MaxPool1d(2)]
        self.features = nn.Sequential(*layers)
        t_out = cfg.seq_len // 2 ** len(cfg.channels)
        if cfg.loss == "mse":  # (B, channels[-1], T') -> (B, C * horizon): keeps time order
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * t_out,
                                                              cfg.in_channels * cfg.horizon))
        else:                  # (B, channels[-1], T') -> (B, n_classes)
            self.head = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                                      nn.Linear(chans[-1], cfg.n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> logits (B, n_classes), or the forecast (B, C, horizon) for mse."""
        check_shape("cnn1d input x", x, (None, self.cfg.in_channels, self.cfg.seq_len))
        out = self.head(self.features(x))
        if self.cfg.loss == "mse":
            return out.view(-1, self.cfg.in_channels, self.cfg.horizon)
        return out

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.cfg.loss != "mse":
            return {}
        pred, y = self(batch["x"][:8])[:, 0], batch["y"][:8, 0]  # first channel
        return forecast_figure(pred, y)


def build(cfg: CNN1DConfig) -> CNN1D:
    return CNN1D(cfg)
