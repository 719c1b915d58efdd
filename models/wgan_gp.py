"""Wasserstein GAN with gradient penalty (Gulrajani et al. 2017, arXiv:1704.00028).

The critic has no sigmoid and estimates the Wasserstein-1 distance E[C(real)] - E[C(fake)]; the
Lipschitz constraint is enforced softly by penalising (||grad C(x_hat)|| - 1)^2 on random
interpolates x_hat between real and fake samples (their eq. 3). The critic steps n_critic times
per generator step; DCGAN-style networks, without batchnorm in the critic (it breaks the per-sample
penalty), Adam with betas (0, 0.9) as in their Algorithm 1. The Ising options (circular padding,
temperature conditioning, Metropolis refinement) are those of `models.dcgan`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import Batch
from models.blocks import init_dcgan_weights
from models.dcgan import Discriminator, Generator, TemperatureConditioned, check_size


@dataclass
class WGANGPConfig:
    in_channels: int = 1
    image_size: int = 32                      # H = W = 4 * 2**len(channels)
    channels: tuple[int, ...] = (64, 32, 16)  # G widths from 4x4 upward; the critic mirrors them
    latent_dim: int = 32
    output: Literal["sigmoid", "tanh"] = "sigmoid"  # G's range: data in [0, 1] or [-1, 1]
    gp_weight: float = 10.0                   # lambda of the gradient penalty (paper: 10)
    n_critic: int = 5                         # critic updates per generator update (paper: 5)
    critic_lr_scale: float = 1.0              # critic lr relative to train.lr
    beta1: float = 0.0                        # Adam betas (beta1, 0.9) of Algorithm 1
    beta2: float = 0.9
    circular: bool = False                    # as in DCGANConfig
    cond_temperature: bool = False
    t_range: tuple[float, float] = (1.6, 3.2)
    t_levels: int = 16
    refine_sweeps: int = 0


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """E[(||grad_x C(x_hat)||_2 - 1)^2] over x_hat = eps * real + (1 - eps) * fake, eps ~ U[0, 1]
    per sample. create_graph=True so the penalty itself is differentiated into C's weights."""
    eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
    with torch.enable_grad():  # also under no_grad (validation), where the penalty is only logged
        x_hat = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
        return (grad.flatten(1).norm(2, dim=1) - 1).pow(2).mean()


class WGANGP(TemperatureConditioned):
    d_phase = "critic"

    def __init__(self, cfg: WGANGPConfig):
        check_size("wgan_gp", cfg.image_size, cfg.channels)
        cond = int(cfg.cond_temperature)
        super().__init__(Generator(cfg.latent_dim, cfg.channels, cfg.in_channels, cfg.output,
                                   cfg.circular, cond),
                         Discriminator(cfg.in_channels + cond, cfg.channels, norm=False,
                                       circular=cfg.circular), cfg.latent_dim,
                         (cfg.in_channels, cfg.image_size, cfg.image_size), cfg.output,
                         cfg.critic_lr_scale, (cfg.beta1, cfg.beta2), "wgan_gp")
        self.cfg = cfg
        self.setup_temperature("wgan_gp")
        init_dcgan_weights(self)

    @property
    def schedule(self) -> dict[str, int]:
        return {"critic": self.cfg.n_critic, "generator": 1}

    def discriminator_losses(self, real: torch.Tensor, fake: torch.Tensor,
                             batch: Batch) -> dict[str, torch.Tensor]:
        wasserstein = self.discriminate(real, batch).mean() - self.discriminate(fake, batch).mean()
        # the penalty's interpolates keep each sample's condition (a per-sample constraint)
        gp = gradient_penalty(lambda x: self.discriminate(x, batch), real, fake)
        return {"loss": -wasserstein + self.cfg.gp_weight * gp, "wasserstein": wasserstein.detach(),
                "gradient_penalty": gp.detach()}

    def generator_losses(self, fake: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return {"loss": -self.discriminate(fake, batch).mean()}


def build(cfg: WGANGPConfig) -> WGANGP:
    return WGANGP(cfg)
