"""FGSM and PGD examples against a model's own training loss, for adversarial training and attacks.

FGSM (Goodfellow et al. 2014, arXiv:1412.6572) and PGD (Madry et al. 2018, arXiv:1706.06083: L-inf
ball, uniform random start, `steps` signed-gradient steps of 2.5 eps / steps, projected back onto
the ball) against `model.losses` (cross-entropy for a classifier, MSE for a regressor). Used by
training (`train.adversarial`: `adversarial_batch`) and by `hpcforge attack`
(pipeline/analysis/attack.py), which sits above training and imports this module, never the other
way (issue #27).

Both attacks are written here with plain autograd: they are the textbook definitions in a dozen
lines, while torchattacks and ART are not pinned in this project, and captum.robust's FGSM/PGD
attack a forward function with a loss over (output, target) only, not a model's `losses(batch)`
with its conditioning inputs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from models.base import Trainable

Batch = dict[str, torch.Tensor]
PGD_STEP = 2.5  # step size = PGD_STEP * eps / steps (Madry et al. 2018)


def loss_grad(model: Trainable, batch: Batch, x: torch.Tensor) -> torch.Tensor:
    """d(model's training loss)/dx at x, the rest of the batch (y, cond) unchanged. Only x's
    gradient is computed: the parameters' .grad (and the ranks' gradient hooks) are untouched."""
    x = x.detach().requires_grad_()
    loss = model.losses({**batch, "x": x}, "model")["loss"]
    return torch.autograd.grad(loss, x)[0]


def fgsm(model: Trainable, batch: Batch, eps: float, **_: Any) -> torch.Tensor:
    """One step of size eps along the sign of the loss gradient."""
    x = batch["x"]
    return (x + eps * loss_grad(model, batch, x).sign()).detach()


def pgd(model: Trainable, batch: Batch, eps: float, steps: int = 10,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Random start in the eps-ball, then `steps` signed-gradient steps, each projected onto it."""
    x0 = batch["x"]
    noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) * 2 - 1
    x = x0 + eps * noise
    for _ in range(steps):
        x = x + PGD_STEP * eps / steps * loss_grad(model, batch, x).sign()
        x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).detach()
    return x


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {"fgsm": fgsm, "pgd": pgd}


def adversarial_batch(model: Trainable, batch: Batch, eps: float, method: str, steps: int,
                      fraction: float) -> Batch:
    """`batch` with its first `fraction` of samples (at least one) replaced by FGSM/PGD examples
    against the model's own loss (Goodfellow et al. 2014; Madry et al. 2018 train on all-PGD
    batches, fraction=1). The examples are made in eval mode: batch norm normalises them with
    its running statistics and does not update those, so only the training forward does."""
    n = len(batch["x"])
    k = min(n, max(1, round(fraction * n)))
    head = {key: v[:k] for key, v in batch.items()}
    model.eval()
    try:
        x_adv = ATTACKS[method](model, head, eps, steps=steps)
    finally:
        model.train()
    return {**batch, "x": torch.cat([x_adv.to(batch["x"].dtype), batch["x"][k:]])}
