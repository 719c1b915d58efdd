"""Convolutional variational autoencoder (Kingma & Welling 2014, arXiv:1312.6114).

Gaussian encoder q(z|x), reparameterisation, KL to N(0, I) weighted by beta (Higgins et al. 2017),
and a Bernoulli (binary fields such as Ising spins in [0, 1]) or Gaussian decoder p(x|z).

For Ising lattices (issue #15), off by default: `cond_temperature` makes it a conditional VAE
(Sohn et al. 2015): q(z|x, T) and p(x|z, T), T drawn from the training mix when a sample has none;
`refine_sweeps` makes the sampler draw spins from the Bernoulli decoder and then run that many
Metropolis sweeps at the sample's T (`models.ising.refine_spins`). A factorised Bernoulli decoder
draws every spin independently and so cannot make nearest-neighbour correlations; the sweeps are
the part of the model that does. The ELBO is that of the Bernoulli decoder alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Batch, Trainable, check_shape
from models.blocks import conv_down, conv_up
from models.figures import as_images
from models.ising import TemperatureCondition, refine_spins


@dataclass
class VAEConfig:
    in_channels: int = 1
    image_size: int = 32        # H = W; must be divisible by 2**len(channels)
    channels: tuple[int, ...] = (32, 64)  # one strided conv per entry
    latent_dim: int = 16
    beta: float = 1.0           # weight of the KL term (beta-VAE)
    decoder: str = "bernoulli"  # "bernoulli" (targets in [0, 1]) or "gaussian" (unit variance)
    cond_temperature: bool = False  # q(z|x, T), p(x|z, T) with T = batch["cond"]
    t_range: tuple[float, float] = (1.6, 3.2)  # T mapped onto [0, 1]; the training grid's ends
    t_levels: int = 16          # grid size: T drawn from it when a sample has none
    refine_sweeps: int = 0      # Metropolis sweeps on sampled spins (Bernoulli decoder, needs T)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans = (cfg.in_channels + int(cfg.cond_temperature), *cfg.channels)  # T as a channel
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
        self.fc = nn.Linear(cfg.latent_dim + int(cfg.cond_temperature), rev[0] * self.start ** 2)
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
        if cfg.refine_sweeps < 0 or (cfg.refine_sweeps and not (cfg.cond_temperature and
                                                                cfg.decoder == "bernoulli")):
            raise ValueError(f"vae: refine_sweeps {cfg.refine_sweeps}: expected 0, or a positive "
                             f"count with cond_temperature true and the bernoulli decoder")
        self.cfg = cfg
        self.temperature = TemperatureCondition(cfg.t_range, cfg.t_levels)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t: (B,) temperatures when cond_temperature; None draws them from the training mix,
        the rule for samples without a temperature (`hpcforge evaluate` calls forward(x) alone)."""
        c, s = self.cfg.in_channels, self.cfg.image_size
        check_shape("vae input x", x, (None, c, s, s))
        if self.cfg.cond_temperature and t is None:
            t = self.temperature.of({}, x.shape[0], x.device)
        mu, logvar = self.encoder(self.with_t_channel(x, t))
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)  # reparameterisation trick
        return self.decoder(self.with_t(z, t)), mu, logvar

    def with_t_channel(self, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if not self.cfg.cond_temperature:
            return x
        return torch.cat([x, self.temperature.unit(t).view(-1, 1, 1, 1).expand_as(x[:, :1])], 1)

    def with_t(self, z: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        if not self.cfg.cond_temperature:
            return z
        return torch.cat([z, self.temperature.unit(t)[:, None]], dim=1)

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        x = batch["x"]
        t = self.temperature.of(batch, x.shape[0], x.device) if self.cfg.cond_temperature else None
        out, mu, logvar = self(x, t)
        if self.cfg.decoder == "bernoulli":
            rec = F.binary_cross_entropy_with_logits(out, x, reduction="sum") / x.shape[0]
        else:
            rec = 0.5 * F.mse_loss(out, x, reduction="sum") / x.shape[0]
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
        return {"loss": rec + self.cfg.beta * kl, "recon": rec, "kl": kl, "elbo": -(rec + kl)}

    @property
    def conditional(self) -> bool:
        return self.cfg.cond_temperature

    @torch.no_grad()
    def sample(self, n: int, batch: Batch | None = None) -> torch.Tensor:
        """n decoded prior draws z ~ N(0, I): (n, C, S, S); probabilities for a Bernoulli decoder,
        or exact 0/1 spins after refine_sweeps Metropolis sweeps at each sample's T (the batch's
        cond, else drawn from the training mix)."""
        device = next(self.parameters()).device
        t = self.temperature.of(batch or {}, n, device) if self.cfg.cond_temperature else None
        p = self.decode(torch.randn(n, self.cfg.latent_dim, device=device), t)
        return refine_spins(p, t, self.cfg.refine_sweeps) if self.cfg.refine_sweeps else p

    # ---- latent space (pipeline/analysis/latent.py, issue #16): encode, decode and rank dimensions
    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def _t(self, batch: Batch, n: int, device: torch.device) -> torch.Tensor | None:
        return self.temperature.of(batch, n, device) if self.cfg.cond_temperature else None

    @torch.no_grad()
    def encode_latent(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The posterior means mu(x) (B, latent_dim), at batch["cond"] when conditional."""
        return self.encoder(self.with_t_channel(x, self._t(batch, len(x), x.device)))[0]

    @torch.no_grad()
    def decode_latent(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Decoded z (B, latent_dim), in sample()'s range, at batch["cond"] when conditional."""
        return self.decode(z, self._t(batch, len(z), z.device))

    @torch.no_grad()
    def latent_kl(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """KL(q(z_d|x) || N(0, 1)) of each latent dimension, mean over x: (latent_dim,). The
        dimensions that carry information have large KL; collapsed ones are near 0."""
        mu, logvar = self.encoder(self.with_t_channel(x, self._t(batch, len(x), x.device)))
        return (0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)).mean(0)

    def decode(self, z: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        out = self.decoder(self.with_t(z, t))
        return torch.sigmoid(out) if self.cfg.decoder == "bernoulli" else out

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch["x"][:8]
        cond = self.cfg.cond_temperature
        t = self.temperature.of(batch, len(batch["x"]), x.device)[:8] if cond else None
        mu, _ = self.encoder(self.with_t_channel(x, t))
        z = torch.randn(16, self.cfg.latent_dim, generator=torch.Generator().manual_seed(0))
        t_sweep = self.temperature.sweep(16, x.device) if cond else None  # T evenly over t_range
        return {"reconstructions": as_images(torch.cat([x, self.decode(mu, t)]).clamp(0, 1)),
                "samples": as_images(self.decode(z.to(x.device), t_sweep).clamp(0, 1))}


def build(cfg: VAEConfig) -> VAE:
    return VAE(cfg)
