"""The contract between a model family and the trainer.

The trainer never branches on the kind of model: it asks the model which optimizers it needs
(`optimizers()`), how often each one steps (`schedule`), and for the named losses of one phase
(`losses(batch, phase)`). A phase is one optimizer's update; its losses dict must hold "loss", the
scalar that optimizer's parameters are trained on, plus any other named terms worth logging.

Single-network models keep the defaults: one optimizer called "model" over every parameter.
Multi-network models (GANs, CycleGAN, AAE) override `optimizers()` with one entry per network, in the
order they are stepped (e.g. discriminator before generator), and `schedule` for n_critic-style
updates. Models never touch ranks, loggers or files.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

Batch = dict[str, torch.Tensor]  # "x": input, "y": target or label, "cond": conditioning value


class InputShapeError(ValueError):
    """A batch whose shape is not what the model was built for."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: its name (also the Horovod parameter-name prefix) and the module it trains."""
    name: str
    module: nn.Module
    lr_scale: float = 1.0  # relative to train.lr (e.g. TTUR for GANs)
    betas: tuple[float, float] = (0.9, 0.999)


class Trainable(nn.Module):
    """Base class of every model in `models/`."""

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("model", self)]

    @property
    def schedule(self) -> dict[str, int]:
        """Updates per training step for each optimizer (default: one each)."""
        return {spec.name: 1 for spec in self.optimizers()}

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        """Named losses for the update of optimizer `phase`; must contain "loss"."""
        raise NotImplementedError

    def reset_state(self) -> None:
        """Forget state carried between batches (stateful RNNs); call at the start of each epoch.
        A no-op for models that carry none, so the loop can call it without asking."""

    # Optional capability of generative models: `sample(n) -> (n, *data_shape)` in the data's
    # normalised range. The trainer and `hpcforge evaluate` use it for physics plots and distances.

    @property
    def conditional(self) -> bool:
        """Whether `sample(n, batch)` generates at the conditions in batch["cond"] (e.g. Ising
        temperatures): evaluate then compares curves over the condition, real against generated."""
        return False

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Images for rank 0 to log, each (N, C, H, W) in [0, 1] (e.g. samples, reconstructions)."""
        return {}


def sampler(model: nn.Module):
    """`(n, batch) -> n samples` for a model that can generate (the batch carries conditioning
    for conditional models), or None for one that cannot."""
    sample = getattr(model, "sample", None)
    if sample is None:
        return None
    import inspect
    takes_batch = len(inspect.signature(sample).parameters) > 1
    return lambda n, batch: sample(n, batch) if takes_batch else sample(n)


def with_channel_axis(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(B, H, W) -> (B, 1, H, W) for a one-channel image network: stores keep single-channel
    fields without the axis (a calorimeter layer (N, 12, 12); issue 24). Anything else as is,
    for the network's own shape check to name."""
    return x.unsqueeze(1) if x.dim() == 3 and in_channels == 1 else x


def field_target(y: torch.Tensor, out: torch.Tensor, loss: str) -> torch.Tensor:
    """A regression target field stored without its channel axis, (B, H, W), as the one-channel
    output (B, 1, H, W) it is compared with (a NetCDF (time, y, x) variable; issue 24)."""
    if loss == "mse" and y.dim() == 3 and out.dim() == 4 and out.shape[1] == 1:
        return y.unsqueeze(1)
    return y


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    """Raise InputShapeError unless `tensor` has `expected` shape (None matches any size)."""
    got = tuple(tensor.shape)
    ok = len(got) == len(expected) and all(e is None or e == g for e, g in zip(expected, got))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise InputShapeError(f"{name}: expected shape {want}, got {got}")
