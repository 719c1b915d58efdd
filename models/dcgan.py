"""Deep convolutional GAN (Radford et al. 2015, arXiv:1511.06434): strided convolutions in D,
transposed convolutions in G, batchnorm everywhere except G's output and D's input, ReLU in G
with a tanh (or sigmoid) output, LeakyReLU(0.2) in D, N(0, 0.02) initialisation, Adam beta1 0.5.
The objective is the GAN one (`models.gan.GAN`).

For Ising lattices (issue #15) three options, all off by default: `circular` (periodic padding in
G and D, as the Hamiltonian wraps around), `cond_temperature` (G and D see the temperature, a
conditional GAN after Mirza & Osindero 2014, arXiv:1411.1784, as in the SpinGAN thesis and Zhang
2021; T is drawn from the training mix when a sample has none) and `refine_sweeps` (that many
Metropolis sweeps at the sample's temperature on the spins drawn from G, part of the model's
sampler: `models.ising.refine_spins`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import Batch
from models.blocks import (conv_decoder, conv_encoder, init_dcgan_weights, output_activation,
                           periodic_decoder)
from models.figures import to_unit
from models.gan import GAN
from models.ising import TemperatureCondition, refine_spins


@dataclass
class DCGANConfig:
    in_channels: int = 1
    image_size: int = 32                   # H = W = 4 * 2**len(channels)
    channels: tuple[int, ...] = (64, 32, 16)  # G widths from 4x4 upward; D mirrors them
    latent_dim: int = 32
    output: Literal["sigmoid", "tanh"] = "sigmoid"  # G's range: data in [0, 1] or [-1, 1]
    d_lr_scale: float = 1.0                # discriminator lr relative to train.lr
    beta1: float = 0.5                     # Adam beta1 (Radford et al.: 0.9 oscillated)
    circular: bool = False                 # periodic padding in G and D (lattices that wrap)
    cond_temperature: bool = False         # G(z, T), D(x, T) with T = batch["cond"]
    t_range: tuple[float, float] = (1.6, 3.2)  # T mapped onto [0, 1]; the training grid's ends
    t_levels: int = 16                     # grid size: T drawn from it when a sample has none
    refine_sweeps: int = 0                 # Metropolis sweeps on sampled spins (needs T)


class Generator(nn.Module):
    """cond_dim extra inputs (the unit temperature) are appended to z."""

    def __init__(self, latent_dim: int, channels: tuple[int, ...], out_channels: int, output: str,
                 circular: bool = False, cond_dim: int = 0):
        super().__init__()
        decoder = periodic_decoder if circular else conv_decoder
        self.net = nn.Sequential(
            nn.Unflatten(1, (latent_dim + cond_dim, 1, 1)),
            # (B, latent_dim [+ cond_dim], 1, 1) -> (B, channels[0], 4, 4)
            nn.ConvTranspose2d(latent_dim + cond_dim, channels[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(channels[0]), nn.ReLU(),
            # (B, channels[0], 4, 4) -> (B, out_channels, S, S), S = 4 * 2**len(channels)
            decoder(channels, out_channels), output_activation(output))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """norm=False gives the WGAN-GP critic (Gulrajani et al. 2017: no batchnorm with a
    per-sample gradient penalty). A conditional D gets the condition as extra input channels."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], norm: bool = True,
                 circular: bool = False):
        super().__init__()
        rev = channels[::-1]
        self.net = nn.Sequential(
            # (B, C, S, S) -> (B, channels[-1], S/2, S/2) -> ... -> (B, channels[0], 4, 4)
            conv_encoder((in_channels, *rev), norm=norm,
                         padding_mode="circular" if circular else "zeros"),
            # (B, channels[0], 4, 4) -> (B, 1, 1, 1) -> (B, 1) logits
            nn.Conv2d(rev[-1], 1, 4, 1, 0), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def check_size(family: str, image_size: int, channels: tuple[int, ...]) -> None:
    if image_size != 4 * 2 ** len(channels):
        raise ValueError(f"{family}: image_size {image_size} must equal 4 * 2**len(channels) = "
                         f"{4 * 2 ** len(channels)}; add or drop entries of channels")


def check_refine(family: str, cfg) -> None:
    if cfg.refine_sweeps < 0 or (cfg.refine_sweeps and not cfg.cond_temperature):
        raise ValueError(f"{family}: refine_sweeps {cfg.refine_sweeps}: expected 0, or a positive "
                         f"count with cond_temperature true (the sweeps run at the sample's T)")


class TemperatureConditioned(GAN):
    """GAN plumbing of the Ising options (module docstring); `cfg` is a DCGAN-style config."""

    cfg: DCGANConfig

    def setup_temperature(self, family: str) -> None:
        check_refine(family, self.cfg)
        self.temperature = TemperatureCondition(self.cfg.t_range, self.cfg.t_levels)

    def generate(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self.cfg.cond_temperature:
            return self.generator(z)
        t = self.temperature.unit(self.temperature.of(batch, z.shape[0], z.device))
        return self.generator(torch.cat([z, t[:, None]], dim=1))

    def discriminate(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        if not self.cfg.cond_temperature:
            return self.discriminator(x)
        t = self.temperature.unit(self.temperature.of(batch, x.shape[0], x.device))
        return self.discriminator(torch.cat([x, t.view(-1, 1, 1, 1).expand_as(x[:, :1])], dim=1))

    @property
    def conditional(self) -> bool:
        return self.cfg.cond_temperature

    @torch.no_grad()
    def sample(self, n: int, batch: Batch | None = None) -> torch.Tensor:
        """n samples in G's output range; with refine_sweeps, exact spins after the sweeps at
        each sample's T (the batch's, else drawn from the training mix)."""
        batch = dict(batch or {})
        if self.cfg.cond_temperature and "cond" not in batch:
            batch["cond"] = self.temperature.of(batch, n, self.z_fixed.device)
        x = self.generate(torch.randn(n, self.latent_dim, device=self.z_fixed.device), batch)
        if not self.cfg.refine_sweeps:
            return x
        spins01 = refine_spins(to_unit(x, self.output), batch["cond"].float(), self.cfg.refine_sweeps)
        return spins01 if self.output == "sigmoid" else 2 * spins01 - 1

    def figure_batch(self, batch: Batch) -> Batch:
        """Fixed noise at temperatures evenly over t_range (conditional), else no condition."""
        if not self.cfg.cond_temperature:
            return {}
        return {"cond": self.temperature.sweep(self.z_fixed.shape[0], self.z_fixed.device)}


class DCGAN(TemperatureConditioned):
    def __init__(self, cfg: DCGANConfig):
        check_size("dcgan", cfg.image_size, cfg.channels)
        cond = int(cfg.cond_temperature)
        super().__init__(Generator(cfg.latent_dim, cfg.channels, cfg.in_channels, cfg.output,
                                   cfg.circular, cond),
                         Discriminator(cfg.in_channels + cond, cfg.channels,
                                       circular=cfg.circular), cfg.latent_dim,
                         (cfg.in_channels, cfg.image_size, cfg.image_size), cfg.output,
                         cfg.d_lr_scale, (cfg.beta1, 0.999), "dcgan")
        self.cfg = cfg
        self.setup_temperature("dcgan")
        init_dcgan_weights(self)


def build(cfg: DCGANConfig) -> DCGAN:
    return DCGAN(cfg)
