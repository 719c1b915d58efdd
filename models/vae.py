"""Convolutional variational autoencoder (Kingma & Welling 2014, arXiv:1312.6114).

Gaussian encoder q(z|x), reparameterisation, KL to N(0, I) weighted by beta (Higgins et al. 2017),
and a Bernoulli (binary fields such as Ising spins in [0, 1]) or Gaussian decoder p(x|z).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Batch, Trainable, check_shape
from models.layers import as_images, conv_down, conv_up


@dataclass
class VAEConfig:
    in_channels: int = 1
    image_size: int = 32        # H = W; must be divisible by 2**len(channels)
    channels: tuple[int, ...] = (32, 64)  # one strided conv per entry
    latent_dim: int = 16
    beta: float = 1.0           # weight of the KL term (beta-VAE)
    decoder: str = "bernoulli"  # "bernoulli" (targets in [0, 1]) or "gaussian" (unit variance)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = (cfg.in_channels, *cfg.channels)
        # (B, C, S, S) -> (B, channels[-1], S / 2**n, S / 2**n)
        self.features = nn.Sequential(*[conv_down(a, b, norm=i > 0) for i, (a, b) in
                                        enumerate(zip(chans[:-1], chans[1:]))])
        flat = cfg.channels[-1] * (cfg.image_size // 2 ** len(cfg.channels)) ** 2
        self.mu = nn.Linear(flat, cfg.latent_dim)
        self.logvar = nn.Linear(flat, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x).flatten(1)
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.start = cfg.image_size // 2 ** len(cfg.channels)
        rev = tuple(reversed(cfg.channels))
        self.fc = nn.Linear(cfg.latent_dim, rev[0] * self.start ** 2)
        # (B, rev[0], s, s) -> ... -> (B, in_channels, S, S), logits (Bernoulli) or means (Gaussian)
        ups = [conv_up(a, b) for a, b in zip(rev[:-1], rev[1:])]
        self.features = nn.Sequential(*ups, nn.ConvTranspose2d(rev[-1], cfg.in_channels, 4, 2, 1))
        self.width = rev[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.width, self.start, self.start)
        return self.features(F.relu(h))


class VAE(Trainable):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if cfg.image_size % 2 ** len(cfg.channels):
            raise ValueError(f"vae: image_size {cfg.image_size} is not divisible by "
                             f"2**{len(cfg.channels)} (one halving per entry of channels)")
        if cfg.decoder not in ("bernoulli", "gaussian"):
            raise ValueError(f"vae: decoder {cfg.decoder!r}: expected 'bernoulli' or 'gaussian'")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, s = self.cfg.in_channels, self.cfg.image_size
        check_shape("vae input x", x, (None, c, s, s))
        mu, logvar = self.encoder(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation trick
        return self.decoder(z), mu, logvar

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        x = batch["x"]
        out, mu, logvar = self(x)
        if self.cfg.decoder == "bernoulli":
            rec = F.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]
        else:
            rec = 0.5 * F.mse_loss(out, x, reduction="sum") / x.shape[0]
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
        return {"loss": rec + self.cfg.beta * kl, "recon": rec, "kl": kl, "elbo": -(rec + kl)}

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n decoded prior draws z ~ N(0, I): (n, C, S, S); probabilities for a Bernoulli decoder."""
        device = next(self.parameters()).device
        return self.decode(torch.randn(n, self.cfg.latent_dim, device=device))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)
        return torch.sigmoid(out) if self.cfg.decoder == "bernoulli" else out

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch["x"][:8]
        mu, _ = self.encoder(x)
        z = torch.randn(16, self.cfg.latent_dim, generator=torch.Generator().manual_seed(0))
        return {"reconstructions": as_images(torch.cat([x, self.decode(mu)]).clamp(0, 1)),
                "samples": as_images(self.decode(z.to(x.device)).clamp(0, 1))}


def build(cfg: VAEConfig) -> VAE:
    return VAE(cfg)
