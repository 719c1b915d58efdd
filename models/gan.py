"""Generative adversarial network (Goodfellow et al. 2014, arXiv:1406.2661) with MLP generator and
discriminator on flattened samples. The generator minimises the non-saturating loss -log D(G(z))
(their sec. 3) rather than log(1 - D(G(z))), which gives weak gradients early in training.

`GAN` is also the trainer-facing class of the DCGAN, WGAN-GP and conditional GAN families, which
swap in their own networks (and, for WGAN-GP, their own objective)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import Batch, OptimizerSpec, Trainable, check_shape
from models.blocks import frozen, mlp, output_activation
from models.figures import as_images, fixed_noise, to_unit
from models.objectives import adversarial_loss


@dataclass
class GANConfig:
    data_shape: tuple[int, ...] = (1, 16, 16)  # one sample, e.g. (C, H, W) or (features,)
    latent_dim: int = 16                       # size of the noise z ~ N(0, I)
    g_hidden: tuple[int, ...] = (128, 128)     # generator hidden widths (ReLU)
    d_hidden: tuple[int, ...] = (128, 64)      # discriminator hidden widths (LeakyReLU 0.2)
    dropout: float = 0.0                       # in the discriminator (Goodfellow et al. used it)
    output: Literal["sigmoid", "tanh"] = "sigmoid"  # G's range: data in [0, 1] or [-1, 1]
    d_lr_scale: float = 1.0                    # discriminator lr relative to train.lr (TTUR)
    beta1: float = 0.5                         # Adam beta1; 0.5 steadies GANs (Radford et al.)


class GAN(Trainable):
    """Generator G(z) and discriminator D(x) (logits), stepped discriminator first."""

    d_phase = "discriminator"  # the name of D's optimizer and phase

    def __init__(self, generator: nn.Module, discriminator: nn.Module, latent_dim: int,
                 data_shape: tuple[int, ...], output: str, d_lr_scale: float = 1.0,
                 betas: tuple[float, float] = (0.5, 0.999), name: str = "gan"):
        super().__init__()
        self.generator, self.discriminator = generator, discriminator
        self.latent_dim, self.data_shape, self.output = latent_dim, data_shape, output
        self.name = name  # the family, for error messages
        self.d_lr_scale, self.betas = d_lr_scale, betas
        self.register_buffer("z_fixed", fixed_noise(16, latent_dim), persistent=False)  # figures

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec(self.d_phase, self.discriminator, self.d_lr_scale, self.betas),
                OptimizerSpec("generator", self.generator, 1.0, self.betas)]

    # ---- the two networks; conditional families pass batch["cond"] through these
    def generate(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.generator(z)

    def discriminate(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.discriminator(x)

    @torch.no_grad()
    def decode_latent(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        """G(z) at batch's condition (pipeline/analysis/latent.py, issue #16); no refinement sweeps, so a
        path through z stays continuous."""
        return self.generate(z, batch)

    @torch.no_grad()
    def sample(self, n: int, batch: Batch | None = None) -> torch.Tensor:
        """n samples (n, *data_shape) in G's output range."""
        z = torch.randn(n, self.latent_dim, device=self.z_fixed.device)
        return self.generate(z, batch or {})

    # ---- objective
    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        real = batch["x"]
        check_shape(f"{self.name} input x", real, (None, *self.data_shape))
        z = torch.randn(real.shape[0], self.latent_dim, device=real.device)
        if phase == self.d_phase:
            with torch.no_grad():  # D's update must not reach G
                fake = self.generate(z, batch)
            return self.discriminator_losses(real, fake, batch)
        if phase == "generator":
            with frozen(self.discriminator):  # gradients only into G
                return self.generator_losses(self.generate(z, batch), batch)
        raise ValueError(f"{self.name}: unknown phase {phase!r}; expected {self.d_phase} or "
                         f"generator")

    def discriminator_losses(self, real: torch.Tensor, fake: torch.Tensor,
                             batch: Batch) -> dict[str, torch.Tensor]:
        d_real, d_fake = self.discriminate(real, batch), self.discriminate(fake, batch)
        loss = adversarial_loss(d_real, True) + adversarial_loss(d_fake, False)
        return {"loss": loss, "d_real": torch.sigmoid(d_real).mean().detach(),
                "d_fake": torch.sigmoid(d_fake).mean().detach()}

    def generator_losses(self, fake: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        return {"loss": adversarial_loss(self.discriminate(fake, batch), True)}  # non-saturating

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        samples = self.generate(self.z_fixed, self.figure_batch(batch))
        return {"samples": as_images(to_unit(samples, self.output))}

    def figure_batch(self, batch: Batch) -> Batch:
        """The conditioning that goes with the fixed noise (none for unconditional GANs)."""
        return {}


class MLPGenerator(nn.Module):
    def __init__(self, latent_dim: int, hidden: tuple[int, ...], data_shape: tuple[int, ...],
                 output: str, cond_dim: int = 0):
        super().__init__()
        # (B, latent_dim [+ cond_dim]) -> (B, prod(data_shape)) -> (B, *data_shape)
        self.net = nn.Sequential(mlp((latent_dim + cond_dim, *hidden, math.prod(data_shape))),
                                 output_activation(output), nn.Unflatten(1, data_shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MLPDiscriminator(nn.Module):
    def __init__(self, data_shape: tuple[int, ...], hidden: tuple[int, ...], dropout: float,
                 cond_dim: int = 0):
        super().__init__()
        # (B, prod(data_shape) [+ cond_dim]) -> (B, 1) logits
        self.net = mlp((math.prod(data_shape) + cond_dim, *hidden, 1), "leaky_relu", dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(cfg: GANConfig) -> GAN:
    g = MLPGenerator(cfg.latent_dim, cfg.g_hidden, cfg.data_shape, cfg.output)
    d = nn.Sequential(nn.Flatten(), MLPDiscriminator(cfg.data_shape, cfg.d_hidden, cfg.dropout))
    return GAN(g, d, cfg.latent_dim, cfg.data_shape, cfg.output, cfg.d_lr_scale,
               (cfg.beta1, 0.999), "gan")
