"""Objectives shared by several model families: checked losses and labels, supervised, relative L2,
reconstruction and adversarial losses, and `Supervised`, a network trained on (x, y)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from models.base import Batch, InputShapeError, Trainable, check_shape


def check_loss(family: str, loss: str, allowed: tuple[str, ...]) -> None:
    if loss not in allowed:
        raise ValueError(f"{family}: loss {loss!r}: expected one of {', '.join(allowed)}")


def check_labels(name: str, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Class labels as int64 indices: any integer dtype (stores keep int8) in [0, n_classes).
    The range is checked on the labels' device, not read on the host at every step (issue 28: a
    read waits for a GPU's queue): on the CPU a bad label is refused here, on a GPU it is a
    device-side assert (the store's class table is checked before the run starts, run.py)."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputShapeError(f"{name}: expected integer class indices, got dtype {y.dtype}; "
                              f"store labels as integers or use a regression loss")
    if y.numel() and not _in_range(y, n_classes):
        raise InputShapeError(f"{name}: expected class indices in [0, {n_classes}), got values in "
                              f"[{int(y.min())}, {int(y.max())}]; check the model's class count")
    return y.long()


def _in_range(y: torch.Tensor, n: int) -> bool:
    try:
        torch._assert_async(((y >= 0) & (y < n)).all(), "class index out of range")
        return True
    except RuntimeError:  # (raised at once on the CPU; on a GPU the assert fires on the device)
        return False


def supervised_losses(out: torch.Tensor, y: torch.Tensor, loss: str) -> dict[str, torch.Tensor]:
    """Named losses of a prediction `out` against the target `y`.

    ce / hinge: logits (B, K, ...) against int64 labels (B, ...), also reports accuracy;
    bce: one logit per sample (B, 1) against 0/1 targets (B,); mse: `y` shaped like `out`, or
    one scalar per sample (B,) for one output (B, 1), as a store keeps a per-sample quantity.
    """
    if loss == "mse":
        if y.dim() == 1 and tuple(out.shape[1:]) == (1,):
            y = y[:, None]
        check_shape("target y", y, tuple(out.shape))
        return {"loss": F.mse_loss(out, y.to(out.dtype))}
    if loss == "bce":
        check_shape("target y", y, (out.shape[0],))
        logit = out.squeeze(1)
        acc = ((logit > 0) == (y > 0.5)).float().mean()
        return {"loss": F.binary_cross_entropy_with_logits(logit, y.to(out.dtype)), "accuracy": acc}
    check_shape("target y", y, (out.shape[0], *out.shape[2:]))
    y = check_labels("target y", y, out.shape[1])
    acc = (out.argmax(1) == y).float().mean()
    if loss == "ce":
        return {"loss": F.cross_entropy(out, y), "accuracy": acc}
    if loss == "hinge":  # multi-class margin loss (Crammer & Singer style, torch's multi_margin)
        flat = out.movedim(1, -1).reshape(-1, out.shape[1])
        return {"loss": F.multi_margin_loss(flat, y.reshape(-1)), "accuracy": acc}
    raise ValueError(f"loss {loss!r}: expected one of ce, hinge, bce, mse")


def relative_l2(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||pred - truth|| / ||truth|| (the usual error of field surrogates)."""
    err = (pred - truth).flatten(1).norm(dim=1)
    return (err / truth.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()


def reconstruction_loss(out: torch.Tensor, x: torch.Tensor, decoder: str) -> torch.Tensor:
    """Mean per element: BCE on logits ("bernoulli", x in [0, 1]) or MSE ("gaussian")."""
    if decoder == "bernoulli":
        return F.binary_cross_entropy_with_logits(out, x)
    return F.mse_loss(out, x)


def decoded(out: torch.Tensor, decoder: str) -> torch.Tensor:
    """The decoder's mean: sigmoid of the logits (Bernoulli) or the output itself (Gaussian)."""
    return torch.sigmoid(out) if decoder == "bernoulli" else out


def adversarial_loss(logits: torch.Tensor, real: bool, kind: str = "bce") -> torch.Tensor:
    """Loss pushing D's logits toward "real" or "fake": BCE (Goodfellow et al. 2014) or least
    squares (LSGAN, Mao et al. 2017). For G, real=True gives the non-saturating loss."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    raise ValueError(f"adversarial loss {kind!r}: expected 'bce' or 'lsgan'")


class Supervised(Trainable):
    """A single network trained on (x, y) with `self.cfg.loss` (see `supervised_losses`)."""

    cfg: Any  # the family's config dataclass; it has a `loss` field

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        return supervised_losses(self(batch["x"]), batch["y"], self.cfg.loss)
