"""Deterministic autoencoders, fully connected or convolutional, with two regularised variants:
denoising (Vincent et al. 2008: corrupt the input with Gaussian noise, reconstruct the clean
sample) and sparse (an L1 penalty on the code, Ng 2011). `anomaly_score` ranks samples by their
reconstruction error (high = unlike the training data)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import Batch, Trainable, check_shape
from models.blocks import conv_decoder, conv_encoder, fc_autoencoder
from models.figures import as_images
from models.objectives import decoded, reconstruction_loss


@dataclass
class AutoencoderConfig:
    kind: Literal["fc", "conv"] = "conv"      # fully connected or convolutional encoder/decoder
    in_channels: int = 1
    image_size: int = 16                      # H = W; conv: divisible by 2**len(channels)
    hidden: tuple[int, ...] = (128,)          # fc: hidden widths of the encoder (mirrored)
    channels: tuple[int, ...] = (16, 32)      # conv: one strided conv per entry (mirrored)
    latent_dim: int = 8                       # size of the code
    decoder: Literal["bernoulli", "gaussian"] = "bernoulli"  # BCE (x in [0, 1]) or MSE
    noise_std: float = 0.0                    # > 0: denoising AE, N(0, std^2) noise on the input
    l1_weight: float = 0.0                    # > 0: sparse AE, weight of mean |code|


class Autoencoder(Trainable):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if cfg.kind not in ("fc", "conv") or cfg.decoder not in ("bernoulli", "gaussian"):
            raise ValueError(f"autoencoder: kind {cfg.kind!r} / decoder {cfg.decoder!r}: expected "
                             f"kind fc or conv, decoder bernoulli or gaussian")
        if cfg.kind == "conv" and cfg.image_size % 2 ** len(cfg.channels):
            raise ValueError(f"autoencoder: image_size {cfg.image_size} is not divisible by "
                             f"2**{len(cfg.channels)} (one halving per entry of channels)")
        self.cfg = cfg
        self.shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if cfg.kind == "fc":
            # (B, C, S, S) -> (B, C*S*S) -> ... -> (B, latent_dim) -> ... -> (B, C, S, S)
            self.encoder, self.decoder = fc_autoencoder(self.shape, cfg.hidden, cfg.latent_dim)
        else:
            s = cfg.image_size // 2 ** len(cfg.channels)
            flat = cfg.channels[-1] * s * s
            # (B, C, S, S) -> (B, channels[-1], s, s) -> (B, latent_dim)
            self.encoder = nn.Sequential(conv_encoder((cfg.in_channels, *cfg.channels)),
                                         nn.Flatten(), nn.Linear(flat, cfg.latent_dim))
            # (B, latent_dim) -> (B, channels[-1], s, s) -> (B, C, S, S)
            self.decoder = nn.Sequential(nn.Linear(cfg.latent_dim, flat), nn.ReLU(),
                                         nn.Unflatten(1, (cfg.channels[-1], s, s)),
                                         conv_decoder(cfg.channels[::-1], cfg.in_channels))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, S, S) -> (logits or means (B, C, S, S), code (B, latent_dim))."""
        check_shape("autoencoder input x", x, (None, *self.shape))
        code = self.encoder(x)
        return self.decoder(code), code

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        x = batch["x"]
        noisy = x + self.cfg.noise_std * torch.randn_like(x) if self.training else x
        out, code = self(noisy)  # denoising: corrupted input, clean target
        rec = reconstruction_loss(out, x, self.cfg.decoder)
        l1 = code.abs().mean()
        return {"loss": rec + self.cfg.l1_weight * l1, "recon": rec, "code_l1": l1.detach()}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return decoded(self(x)[0], self.cfg.decoder)

    @torch.no_grad()
    def anomaly_score(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error per sample, (B,): high for inputs unlike the
        training data."""
        return (self.reconstruct(x) - x).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch["x"][:8]
        return {"reconstructions": as_images(torch.cat([x, self.reconstruct(x)]).clamp(0, 1))}


def build(cfg: AutoencoderConfig) -> Autoencoder:
    return Autoencoder(cfg)
