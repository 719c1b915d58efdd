"""Fully connected network (multilayer perceptron) for classification or regression of vectors."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from models.base import InputShapeError
from models.blocks import mlp
from models.objectives import Supervised, check_loss


@dataclass
class MLPConfig:
    in_features: int = 16                  # values per input sample (flattened); unset: the store's
    hidden: tuple[int, ...] = (64, 64)     # width of each hidden layer
    out_features: int = 2                  # classes (ce, hinge), 1 (bce), targets (mse); unset: the store's
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = "relu"
    dropout: float = 0.0                   # after each hidden activation; 0 disables
    batchnorm: bool = False                # BatchNorm1d before each hidden activation
    loss: Literal["ce", "hinge", "bce", "mse"] = "ce"  # ce/hinge: classes; bce: binary; mse


class MLP(Supervised):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        check_loss("mlp", cfg.loss, ("ce", "hinge", "bce", "mse"))
        if cfg.loss == "bce" and cfg.out_features != 1:
            raise ValueError(f"mlp: loss 'bce' needs out_features 1 (one logit), got "
                             f"{cfg.out_features}; set out_features: 1 or use loss 'ce'")
        self.cfg = cfg
        # (B, in_features) -> (B, hidden[0]) -> ... -> (B, out_features)
        self.net = mlp((cfg.in_features, *cfg.hidden, cfg.out_features), cfg.activation,
                       cfg.dropout, cfg.batchnorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features), or any (B, ...) of in_features values per sample (e.g. an image,
        flattened) -> (B, out_features)."""
        n = self.cfg.in_features
        if x.dim() < 2 or math.prod(x.shape[1:]) != n:
            raise InputShapeError(f"mlp input x: expected shape (*, {n}) (or any sample shape of "
                                  f"{n} values), got {tuple(x.shape)}")
        return self.net(x.flatten(1))


def build(cfg: MLPConfig) -> MLP:
    return MLP(cfg)
