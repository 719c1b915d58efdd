"""U-Net (Ronneberger et al. 2015, arXiv:1505.04597): a contracting encoder and an expanding decoder
joined by skip connections, for field-to-field regression (surrogates of PDE solvers, MSE with the
relative L2 error reported) or per-pixel segmentation (cross-entropy)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import Batch, check_shape, field_target, with_channel_axis
from models.blocks import conv_block
from models.figures import field_figures
from models.objectives import Supervised, check_loss, relative_l2, supervised_losses


def double_conv(c_in: int, c_out: int) -> nn.Sequential:
    """(B, c_in, H, W) -> (B, c_out, H, W): two 3x3 conv + BN + ReLU (same padding, unlike the
    paper's valid convs, so outputs align with inputs without cropping)."""
    return nn.Sequential(conv_block(c_in, c_out), conv_block(c_out, c_out))


@dataclass
class UNetConfig:
    in_channels: int = 1
    out_channels: int = 1                   # output fields (mse) or classes (ce)
    base_width: int = 16                    # channels at full resolution; doubled at each level
    depth: int = 3                          # down-samplings; H and W must be divisible by 2**depth
    loss: Literal["mse", "ce"] = "mse"      # mse: field regression, ce: segmentation
    pad: bool = False                       # zero-pad H, W up to a multiple of 2**depth, crop back


class UNet(Supervised):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        check_loss("unet", cfg.loss, ("mse", "ce"))
        if cfg.depth < 1:
            raise ValueError(f"unet: depth {cfg.depth}: expected >= 1")
        self.cfg = cfg
        w = [cfg.base_width * 2 ** i for i in range(cfg.depth + 1)]
        # encoder level i: (B, w[i-1], H/2**(i-1), .) -> pool -> (B, w[i], H/2**i, .)
        self.inc = double_conv(cfg.in_channels, w[0])  # (B, C_in, H, W) -> (B, w0, H, W)
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), double_conv(a, b))
                                  for a, b in zip(w[:-1], w[1:]))
        # decoder level i: (B, w[i+1], h, .) -> up (B, w[i], 2h, .) -> cat skip (B, 2 w[i], 2h, .)
        #                  -> (B, w[i], 2h, .)
        self.up = nn.ModuleList(nn.ConvTranspose2d(b, a, 2, stride=2)
                                for a, b in zip(w[:-1], w[1:]))
        self.dec = nn.ModuleList(double_conv(2 * a, a) for a in w[:-1])
        self.out = nn.Conv2d(w[0], cfg.out_channels, 1)  # (B, w0, H, W) -> (B, out_channels, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = with_channel_axis(x, self.cfg.in_channels)
        check_shape("unet input x", x, (None, self.cfg.in_channels, None, None))
        k = 2 ** self.cfg.depth
        h_in, w_in = x.shape[-2:]
        if self.cfg.pad:  # e.g. the FNO paper's 85 x 85 Darcy grid: 85 -> 88 at depth 3
            x = nn.functional.pad(x, (0, -w_in % k, 0, -h_in % k))
        if x.shape[-2] % k or x.shape[-1] % k:
            raise ValueError(f"unet input x: expected H and W divisible by 2**depth = {k}, got "
                             f"{tuple(x.shape)}; set model.pad=true, crop the fields, or lower depth")
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up, dec in zip(reversed(self.up), reversed(self.dec)):
            h = dec(torch.cat([up(h), skips.pop()], dim=1))
        return self.out(h)[..., :h_in, :w_in]

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        out = self(batch["x"])
        y = field_target(batch["y"], out, self.cfg.loss)
        terms = supervised_losses(out, y, self.cfg.loss)
        if self.cfg.loss == "mse":
            terms["rel_l2"] = relative_l2(out.detach(), y)
        return terms

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        out = self(batch["x"][:8])
        return field_figures(out, field_target(batch["y"][:8], out, self.cfg.loss), self.cfg.loss)


def build(cfg: UNetConfig) -> UNet:
    return UNet(cfg)
