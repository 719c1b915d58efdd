"""Adversarial autoencoder (Makhzani et al. 2015, arXiv:1511.05644): an autoencoder whose code
distribution q(z) is matched to the prior p(z) = N(0, I) by a GAN on the latent space. Their sec. 2
trains, per mini-batch, the reconstruction (encoder + decoder), the discriminator (prior samples
real, codes fake) and the encoder as generator (fool the discriminator).

Here the reconstruction and generator updates share one optimizer over encoder + decoder, with loss
recon + adversarial_weight * generator loss, stepped after the discriminator: a parameter must not
belong to two optimizers, since Horovod's DistributedOptimizer hooks every parameter it is given and
a second optimizer's pending hooks on the encoder make its next zero_grad() fail. MLP networks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import Batch, OptimizerSpec, Trainable, check_shape
from models.blocks import fc_autoencoder, frozen, mlp
from models.figures import as_images, fixed_noise
from models.objectives import adversarial_loss, decoded, reconstruction_loss


@dataclass
class AAEConfig:
    data_shape: tuple[int, ...] = (1, 16, 16)  # one sample, e.g. (C, H, W) or (features,)
    hidden: tuple[int, ...] = (128,)           # encoder hidden widths (the decoder mirrors them)
    latent_dim: int = 8
    d_hidden: tuple[int, ...] = (64, 64)       # latent discriminator hidden widths
    decoder: Literal["bernoulli", "gaussian"] = "bernoulli"  # BCE (x in [0, 1]) or MSE
    adversarial_weight: float = 0.1            # weight of the encoder's generator loss
    d_lr_scale: float = 1.0                    # discriminator lr relative to train.lr
    beta1: float = 0.5                         # Adam beta1 of the discriminator


class AAE(Trainable):
    def __init__(self, cfg: AAEConfig):
        super().__init__()
        if cfg.decoder not in ("bernoulli", "gaussian"):
            raise ValueError(f"aae: decoder {cfg.decoder!r}: expected 'bernoulli' or 'gaussian'")
        self.cfg = cfg
        # (B, *data_shape) -> (B, latent_dim) -> (B, *data_shape) logits or means
        encoder, decoder = fc_autoencoder(cfg.data_shape, cfg.hidden, cfg.latent_dim)
        self.autoencoder = nn.ModuleDict({"encoder": encoder, "decoder": decoder})
        # (B, latent_dim) -> (B, 1) logits: prior sample (real) or code (fake)
        self.discriminator = mlp((cfg.latent_dim, *cfg.d_hidden, 1), "leaky_relu")
        self.register_buffer("z_fixed", fixed_noise(16, cfg.latent_dim), persistent=False)

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("discriminator", self.discriminator, self.cfg.d_lr_scale,
                              (self.cfg.beta1, 0.999)),
                OptimizerSpec("autoencoder", self.autoencoder)]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        check_shape("aae input x", x, (None, *self.cfg.data_shape))
        return self.autoencoder["encoder"](x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return decoded(self.autoencoder["decoder"](z), self.cfg.decoder)

    # ---- latent space (pipeline/analysis/latent.py, issue #16); the prior is N(0, I)
    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    @torch.no_grad()
    def encode_latent(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.encode(x)

    @torch.no_grad()
    def decode_latent(self, z: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.decode(z)

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        x = batch["x"]
        if phase == "discriminator":  # regularisation, first half: prior real, codes fake
            with torch.no_grad():     # D's update must not reach the encoder
                code = self.encode(x)
            prior = torch.randn_like(code)
            loss = (adversarial_loss(self.discriminator(prior), True)
                    + adversarial_loss(self.discriminator(code), False))
            return {"loss": loss}
        if phase == "autoencoder":    # reconstruction, and the encoder as generator
            code = self.encode(x)
            rec = reconstruction_loss(self.autoencoder["decoder"](code), x, self.cfg.decoder)
            with frozen(self.discriminator):  # gradients only into the autoencoder
                gen = adversarial_loss(self.discriminator(code), True)
            return {"loss": rec + self.cfg.adversarial_weight * gen, "recon": rec.detach(),
                    "generator": gen.detach()}
        raise ValueError(f"aae: unknown phase {phase!r}; expected discriminator or autoencoder")

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """Decode n prior samples: (n, *data_shape)."""
        return self.decode(torch.randn(n, self.cfg.latent_dim, device=self.z_fixed.device))

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch["x"][:8]
        pairs = torch.cat([x, self.decode(self.encode(x))])
        return {"reconstructions": as_images(pairs.clamp(0, 1)),
                "samples": as_images(self.decode(self.z_fixed).clamp(0, 1))}


def build(cfg: AAEConfig) -> AAE:
    return AAE(cfg)
