"""Fourier Neural Operator (Li et al. 2021, arXiv:2010.08895) for field-to-field regression, built on
the maintained `neuraloperator` library (Kossaifi et al., `neuralop.models.FNO`) rather than a hand-written
spectral layer: lifting, `n_layers` Fourier layers (a truncated-spectrum convolution keeping `modes`
frequencies per axis plus a pointwise skip), projection. Spectral weights act on frequencies, not on grid
nodes, so the same model runs at any resolution (the paper's zero-shot super-resolution) and needs no
H, W divisible by anything, unlike the U-Net.

Trained like models/unet.py: MSE on the (standardised) target, the relative L2 error reported beside it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from models.base import Batch, check_shape
from models.figures import field_figures
from models.objectives import Supervised, check_loss, relative_l2, supervised_losses


@dataclass
class FNOConfig:
    in_channels: int = 1
    out_channels: int = 1
    modes: int = 12            # Fourier modes kept per axis (paper, Darcy: 12)
    width: int = 32            # channels of the Fourier layers (paper: 32)
    n_layers: int = 4          # Fourier layers (paper: 4)
    # Between Fourier layers the paper has only a pointwise linear skip; neuraloperator's default
    # adds a channel MLP per layer (more parameters, ~1.5x the CPU per step at 85 x 85).
    channel_mlp: bool = False
    # Zero nodes appended after the last row and column, cropped from the output: the FFT then
    # sees no wrap-around between opposite (non-periodic, Dirichlet) edges (Li et al.'s Darcy code
    # pads 9). 11 takes 85 to 96 = 2^5 * 3, an FFT ~3x cheaper than 85 = 5 * 17.
    pad: int = 0
    loss: Literal["mse"] = "mse"  # field regression (the one objective; named as other families do)


class FNO(Supervised):
    def __init__(self, cfg: FNOConfig):
        super().__init__()
        check_loss("fno", cfg.loss, ("mse",))
        for key, least in (("modes", 1), ("width", 1), ("n_layers", 1), ("pad", 0)):
            if getattr(cfg, key) < least:
                raise ValueError(f"fno: {key} {getattr(cfg, key)}: expected >= {least}")
        from neuralop.models import \
            FNO as NeuralOpFNO  # imports tensorly & co (seconds): only when built
        self.cfg = cfg
        # (B, C_in, H + pad, W + pad) + 2 grid channels -> lift (B, 2 width) -> (B, width)
        #   -> n_layers x [spectral conv on modes x modes + linear skip, GELU] -> project -> (B, C_out, H, W)
        self.net = NeuralOpFNO(n_modes=(cfg.modes, cfg.modes), in_channels=cfg.in_channels,
                               out_channels=cfg.out_channels, hidden_channels=cfg.width,
                               n_layers=cfg.n_layers, use_channel_mlp=cfg.channel_mlp)

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        """Parameters only: neuralop's BaseModel.state_dict adds a `_metadata` entry (its constructor
        arguments, the GELU function among them) that torch.load(weights_only=True), the way
        pipeline/core/checkpoint.py reads checkpoints, refuses. The checkpoint's config rebuilds the model."""
        state = super().state_dict(*args, **kwargs)
        state.pop("_metadata", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("fno input x", x, (None, self.cfg.in_channels, None, None))
        h, w = x.shape[-2:]
        p = self.cfg.pad
        return self.net(nn.functional.pad(x, (0, p, 0, p)))[..., :h, :w]

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        out = self(batch["x"])
        terms = supervised_losses(out, batch["y"], self.cfg.loss)
        terms["rel_l2"] = relative_l2(out.detach(), batch["y"])
        return terms

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        return field_figures(self(batch["x"][:8]), batch["y"][:8], self.cfg.loss)


def build(cfg: FNOConfig) -> FNO:
    return FNO(cfg)
