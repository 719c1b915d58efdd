"""What rank 0 draws every train.logger.images_every steps, as hooks the loop calls in turn.

The loop never asks which model or data set it trains (STYLE.md, "the loop never branches on the
model's kind"): `build` (pipeline.train.assembly) picks the hooks once, from what the model can do
and what the source declares. A hook takes the model (in eval mode, training's RNG forked) and the
step's first batch, and returns images to log and scalar metrics to log beside them.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.base import Batch, Trainable, sampler
from pipeline.runtime.tracking import Tracker
from pipeline.runtime.watchdog import Heartbeat
from pipeline.train.ema import EMA

ImageHook = Callable[[Trainable, Batch], tuple[dict[str, Any], dict[str, float]]]


def model_figures(model: Trainable, batch: Batch) -> tuple[dict[str, Any], dict[str, float]]:
    """The model family's own figures (samples, reconstructions)."""
    return dict(model.figures(batch)), {}


def source_has_observables(source: str) -> bool:
    from pipeline.sources import observables
    return observables(source) is not None


def physics_hook(source: str, affine: tuple[np.ndarray, np.ndarray] | None) -> ImageHook:
    """Generated vs real samples in physical units (`affine` undoes the store's normalisation):
    the source's observables plotted, and their 1-Wasserstein distances as physics/<name>."""
    from pipeline.core import figures
    from pipeline.sources import observables

    def draw(model: Trainable, batch: Batch) -> tuple[dict[str, Any], dict[str, float]]:
        sample = sampler(model)
        generated = sample(batch["x"].shape[0], batch).float().cpu().numpy()
        real = {"x": batch["x"].float().cpu().numpy()}
        images, distances = figures.physics_figures(observables(source), real, generated, affine)
        return images, {f"physics/{k}": v for k, v in distances.items()}
    return draw


def image_hooks(model: Trainable, source: str, has_x: bool,
                affine: tuple[np.ndarray, np.ndarray] | None) -> list[ImageHook]:
    """The model's figures always; physics plots when the model can sample, the source declares
    observables and batches carry the samples ("x") to compare with."""
    hooks: list[ImageHook] = [model_figures]
    if sampler(model) is not None and has_x and source_has_observables(source):
        hooks.append(physics_hook(source, affine))
    return hooks


def draw_all(hooks: list[ImageHook], model: Trainable,
             batch: Batch) -> tuple[dict[str, Any], dict[str, float]]:
    """Every hook's images and metrics; figures never shift training's RNG."""
    images: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    model.eval()
    with torch.random.fork_rng(devices=[]):
        for hook in hooks:
            more_images, more_metrics = hook(model, batch)
            images.update(more_images)
            metrics.update(more_metrics)
    return images, metrics


@dataclass
class Drawing:
    """The run's image hooks and what they draw with and into: the model (sampled through the
    weight average `ema` when there is one, as evaluate does) and the tracker, which records
    images on rank 0 alone; the heartbeat hears of it (drawing takes a while)."""
    hooks: list[ImageHook]
    model: Trainable
    ema: EMA | None
    tracker: Tracker
    heartbeat: Heartbeat

    def log(self, batch: Batch, step: int) -> None:
        """What the hooks draw from `batch` (a step's first), to the tracker at `step`."""
        if not self.tracker.records_images:
            return
        self.heartbeat.beat("images")
        with self.ema.applied() if self.ema is not None else nullcontext():
            images, metrics = draw_all(self.hooks, self.model, batch)
        self.tracker.images(images, step)
        if metrics:
            self.tracker.log(metrics, step)
