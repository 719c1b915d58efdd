"""CycleGAN (Zhu et al. 2017, arXiv:1703.10593): unpaired translation between domain A (batch "x")
and domain B (batch "y") with generators G_ab, G_ba and PatchGAN discriminators D_a, D_b (Isola et
al. 2017), trained with an adversarial loss (least squares as in the paper, or BCE), the cycle
consistency L1 loss ||G_ba(G_ab(a)) - a|| + ||G_ab(G_ba(b)) - b||, and optionally the identity loss
||G_ab(b) - b|| + ||G_ba(a) - a||. Small ResNet generators with instance norm. The paper's pool of
past fakes is left out (one less piece of state to checkpoint)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Batch, OptimizerSpec, Trainable, check_shape
from models.blocks import BasicBlock, conv_block, conv_down, conv_up, frozen, output_activation
from models.figures import as_images, to_unit
from models.objectives import adversarial_loss


@dataclass
class CycleGANConfig:
    channels_a: int = 1                 # channels of domain A (batch "x")
    channels_b: int = 1                 # channels of domain B (batch "y")
    width: int = 16                     # generator width at full resolution
    n_down: int = 1                     # generator down/up-samplings (H, W divisible by 2**n_down)
    n_res_blocks: int = 2               # residual blocks at the bottleneck (paper: 6 or 9)
    d_width: int = 16                   # discriminator width of the first layer
    adversarial: Literal["lsgan", "bce"] = "lsgan"
    cycle_weight: float = 10.0          # lambda_cyc (paper: 10)
    identity_weight: float = 0.5        # x cycle_weight (paper: 0.5); needs equal channels; 0: off
    output: Literal["sigmoid", "tanh"] = "sigmoid"  # G's range: data in [0, 1] or [-1, 1]
    beta1: float = 0.5                  # Adam beta1 (paper: 0.5)


class ResnetGenerator(nn.Module):
    def __init__(self, c_in: int, c_out: int, cfg: CycleGANConfig):
        super().__init__()
        w = [cfg.width * 2 ** i for i in range(cfg.n_down + 1)]  # widths per resolution
        self.net = nn.Sequential(
            # (B, c_in, H, W) -> (B, w0, H, W) -> (B, w[-1], H / 2**n_down, W / 2**n_down)
            conv_block(c_in, w[0], 7, norm="instance"),
            *[conv_down(a, b, "instance") for a, b in zip(w[:-1], w[1:])],
            *[BasicBlock(w[-1], w[-1], norm="instance") for _ in range(cfg.n_res_blocks)],
            # (B, w[-1], H / 2**n_down, W / 2**n_down) -> (B, w0, H, W) -> (B, c_out, H, W)
            *[conv_up(b, a, "instance") for a, b in zip(w[-2::-1], w[:0:-1])],
            nn.Conv2d(w[0], c_out, 7, padding=3), output_activation(cfg.output))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def patch_discriminator(c_in: int, width: int) -> nn.Sequential:
    """PatchGAN: one logit per overlapping patch, (B, c_in, H, W) -> (B, 1, H/4, W/4)."""
    return nn.Sequential(conv_down(c_in, width, norm=False),
                         conv_down(width, 2 * width, "instance"),
                         nn.Conv2d(2 * width, 1, 3, padding=1))


class CycleGAN(Trainable):
    def __init__(self, cfg: CycleGANConfig):
        super().__init__()
        if cfg.identity_weight > 0 and cfg.channels_a != cfg.channels_b:
            raise ValueError(f"cyclegan: identity_weight {cfg.identity_weight} needs channels_a == "
                             f"channels_b, got {cfg.channels_a} and {cfg.channels_b}; set "
                             f"identity_weight: 0")
        self.cfg = cfg
        a, b = cfg.channels_a, cfg.channels_b
        self.generators = nn.ModuleDict({"ab": ResnetGenerator(a, b, cfg),
                                         "ba": ResnetGenerator(b, a, cfg)})
        self.discriminators = nn.ModuleDict({"a": patch_discriminator(a, cfg.d_width),
                                             "b": patch_discriminator(b, cfg.d_width)})

    def optimizers(self) -> list[OptimizerSpec]:
        betas = (self.cfg.beta1, 0.999)
        return [OptimizerSpec("discriminator", self.discriminators, betas=betas),
                OptimizerSpec("generator", self.generators, betas=betas)]

    def domains(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = batch["x"], batch["y"]
        check_shape("cyclegan domain A x", a, (None, self.cfg.channels_a, None, None))
        check_shape("cyclegan domain B y", b, (None, self.cfg.channels_b, None, None))
        k = max(2 ** self.cfg.n_down, 4)  # G halves n_down times; PatchGAN needs >= 4 pixels
        if any(s % k for s in (*a.shape[-2:], *b.shape[-2:])):
            raise ValueError(f"cyclegan: expected H and W divisible by {k}, got {tuple(a.shape)} "
                             f"and {tuple(b.shape)}; crop or pad the images")
        return a, b

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        a, b = self.domains(batch)
        g = self.generators
        if phase == "discriminator":
            with torch.no_grad():  # D's update must not reach the generators
                fake_b, fake_a = g["ab"](a), g["ba"](b)
            d_a = self.discriminator_loss("a", a, fake_a)
            d_b = self.discriminator_loss("b", b, fake_b)
            return {"loss": d_a + d_b, "d_a": d_a.detach(), "d_b": d_b.detach()}
        if phase == "generator":
            with frozen(self.discriminators):
                return self.generator_losses(a, b)
        raise ValueError(f"cyclegan: unknown phase {phase!r}; expected discriminator or generator")

    def discriminator_loss(self, domain: str, real: torch.Tensor,
                           fake: torch.Tensor) -> torch.Tensor:
        """Real patches toward 1, fake toward 0, halved so D learns slower than G (Zhu et al. 4)."""
        d, kind = self.discriminators[domain], self.cfg.adversarial
        return 0.5 * (adversarial_loss(d(real), True, kind)
                      + adversarial_loss(d(fake), False, kind))

    def generator_losses(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        g, d, adv = self.generators, self.discriminators, self.cfg.adversarial
        fake_b, fake_a = g["ab"](a), g["ba"](b)
        gan = (adversarial_loss(d["b"](fake_b), True, adv)
               + adversarial_loss(d["a"](fake_a), True, adv))
        cycle = F.l1_loss(g["ba"](fake_b), a) + F.l1_loss(g["ab"](fake_a), b)
        terms = {"gan": gan, "cycle": cycle}
        loss = gan + self.cfg.cycle_weight * cycle
        if self.cfg.identity_weight > 0:
            terms["identity"] = F.l1_loss(g["ab"](b), b) + F.l1_loss(g["ba"](a), a)
            loss = loss + self.cfg.cycle_weight * self.cfg.identity_weight * terms["identity"]
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Rows of real, translated and cycled images for each domain."""
        a, b = self.domains({"x": batch["x"][:8], "y": batch["y"][:8]})
        g = self.generators
        fake_b, fake_a = g["ab"](a), g["ba"](b)
        images = {"a_cycled": torch.cat([a, g["ba"](fake_b)]), "a_to_b": fake_b,
                  "b_cycled": torch.cat([b, g["ab"](fake_a)]), "b_to_a": fake_a}
        return {k: as_images(to_unit(v, self.cfg.output)) for k, v in images.items()}


def build(cfg: CycleGANConfig) -> CycleGAN:
    return CycleGAN(cfg)
