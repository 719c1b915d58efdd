"""An exponential moving average of the generating network's weights (issue #15), for sampling.

GAN generators oscillate around a good solution rather than settle in it; the average of the
iterates is closer to it (Yazici et al. 2019, arXiv:1806.04498, "The unusual effectiveness of
averaging in GAN training"; Karras et al. 2018, arXiv:1710.10196, sample with an EMA of G).
With `train.ema.decay` > 0 the run keeps, beside the raw weights,

    ema <- decay * ema + (1 - decay) * w       after each optimizer step that changes w,

for the network that generates: a GAN's `generator`; otherwise the whole model (a VAE's encoder
and decoder share one optimizer, and `hpcforge evaluate` scores the averaged decoder's samples
and the test ELBO of the averaged pair, so both halves are averaged). Before `train.ema.start`
updates the average is the weights themselves. Batch-norm statistics are not averaged: the
averaged network samples with the raw network's running statistics.

Every rank holds the same average without communication: the ranks' weights are identical after
each averaged-gradient step, and the average starts from the broadcast initial weights (or the
checkpoint's). Checkpoints keep it under "ema"; resume restores it exactly. Evaluation, probes
and the training figures sample with it unless `train.ema.weights=raw`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def averaged_module(model: nn.Module) -> nn.Module:
    """The network that generates: a GAN's generator, else the whole model (module docstring)."""
    generator = getattr(model, "generator", None)
    return generator if isinstance(generator, nn.Module) else model


class EMA:
    """The averaged copy of `averaged_module(model)`'s parameters, keyed by their names in
    `model.state_dict()` (so a checkpoint's "ema" loads into a freshly built model)."""

    def __init__(self, model: nn.Module, decay: float, start: int = 0):
        self.decay, self.start, self.updates = decay, start, 0
        module = averaged_module(model)
        prefix = next((f"{n}." for n, m in model.named_modules() if m is module and n), "")
        self.names = [prefix + n for n, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.ids = {id(p) for p in self.params}

    def follows(self, params: list[nn.Parameter]) -> bool:
        """Whether an optimizer over `params` changes the averaged network."""
        return any(id(p) in self.ids for p in params)

    @torch.no_grad()
    def reset(self) -> None:
        """The average restarts from the weights as they are (after the initial broadcast)."""
        torch._foreach_copy_(self.shadow, [p.detach() for p in self.params])

    @torch.no_grad()
    def update(self) -> None:
        """One optimizer step of the averaged network is done: fold its weights in."""
        self.updates += 1
        weights = [p.detach() for p in self.params]
        if self.updates <= self.start:
            torch._foreach_copy_(self.shadow, weights)
        else:
            torch._foreach_lerp_(self.shadow, weights, 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "start": self.start, "updates": self.updates,
                "weights": {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow)}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = state["updates"]
        for name, s in zip(self.names, self.shadow):
            s.copy_(state["weights"][name])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the live network for the block (figures), the raw ones after."""
        raw = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], raw)


def build(model: nn.Module, decay: float, start: int) -> EMA | None:
    """The run's average, or None with train.ema.decay=0 (off)."""
    return EMA(model, decay, start) if decay > 0 else None


def load_weights(model: nn.Module, ckpt: dict[str, Any], weights: str) -> str:
    """Load a checkpoint's weights into `model` for sampling: the averaged ones where the
    checkpoint has them and `weights` is "ema", else the raw ones. Returns which were loaded."""
    model.load_state_dict(ckpt["model"])
    if weights != "ema" or not ckpt.get("ema"):
        return "raw"
    model.load_state_dict(ckpt["ema"]["weights"], strict=False)
    return "ema"


def digest(ema: EMA) -> str:
    """sha256 of the averaged weights, in name order: equal on every rank (module docstring)."""
    import hashlib
    h = hashlib.sha256()
    for name, s in sorted(zip(ema.names, ema.shadow), key=lambda t: t[0]):
        h.update(name.encode())
        h.update(s.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
