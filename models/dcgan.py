"""Deep convolutional GAN (Radford et al. 2015, arXiv:1511.06434): strided convolutions in D,
transposed convolutions in G, batchnorm everywhere except G's output and D's input, ReLU in G
with a tanh (or sigmoid) output, LeakyReLU(0.2) in D, N(0, 0.02) initialisation, Adam beta1 0.5.
The objective is the GAN one (`models.gan.GAN`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.gan import GAN
from models.layers import conv_decoder, conv_encoder, init_dcgan_weights, output_activation


@dataclass
class DCGANConfig:
    in_channels: int = 1
    image_size: int = 32                   # H = W = 4 * 2**len(channels)
    channels: tuple[int, ...] = (64, 32, 16)  # G widths from 4x4 upward; D mirrors them
    latent_dim: int = 32
    output: Literal["sigmoid", "tanh"] = "sigmoid"  # G's range: data in [0, 1] or [-1, 1]
    d_lr_scale: float = 1.0                # discriminator lr relative to train.lr
    beta1: float = 0.5                     # Adam beta1 (Radford et al.: 0.9 oscillated)


class Generator(nn.Module):
    def __init__(self, latent_dim: int, channels: tuple[int, ...], out_channels: int, output: str):
        super().__init__()
        self.net = nn.Sequential(
            nn.Unflatten(1, (latent_dim, 1, 1)),
            # (B, latent_dim, 1, 1) -> (B, channels[0], 4, 4)
            nn.ConvTranspose2d(latent_dim, channels[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(channels[0]), nn.ReLU(),
            # (B, channels[0], 4, 4) -> (B, out_channels, S, S), S = 4 * 2**len(channels)
            conv_decoder(channels, out_channels), output_activation(output))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """norm=False gives the WGAN-GP critic (Gulrajani et al. 2017: no batchnorm with a
    per-sample gradient penalty)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], norm: bool = True):
        super().__init__()
        rev = channels[::-1]
        self.net = nn.Sequential(
            # (B, C, S, S) -> (B, channels[-1], S/2, S/2) -> ... -> (B, channels[0], 4, 4)
            conv_encoder((in_channels, *rev), norm=norm),
            # (B, channels[0], 4, 4) -> (B, 1, 1, 1) -> (B, 1) logits
            nn.Conv2d(rev[-1], 1, 4, 1, 0), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def check_size(family: str, image_size: int, channels: tuple[int, ...]) -> None:
    if image_size != 4 * 2 ** len(channels):
        raise ValueError(f"{family}: image_size {image_size} must equal 4 * 2**len(channels) = "
                         f"{4 * 2 ** len(channels)}; add or drop entries of channels")


class DCGAN(GAN):
    def __init__(self, cfg: DCGANConfig):
        check_size("dcgan", cfg.image_size, cfg.channels)
        super().__init__(Generator(cfg.latent_dim, cfg.channels, cfg.in_channels, cfg.output),
                         Discriminator(cfg.in_channels, cfg.channels), cfg.latent_dim,
                         (cfg.in_channels, cfg.image_size, cfg.image_size), cfg.output,
                         cfg.d_lr_scale, (cfg.beta1, 0.999), "dcgan")
        self.cfg = cfg
        init_dcgan_weights(self)


def build(cfg: DCGANConfig) -> DCGAN:
    return DCGAN(cfg)
