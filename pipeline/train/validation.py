"""Validation and early stopping: the first phase's losses on the validation split.

Validation reads the same batches every time (epoch 0), with the ranks' mean batch-norm
statistics and training's RNG untouched, so its numbers compare across steps and resumes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from models.base import Batch
from pipeline.config import EarlyStopConfig
from pipeline.data.loader import ShardedLoader
from pipeline.runtime.dist import Dist
from pipeline.runtime.tracking import Tracker
from pipeline.runtime.watchdog import Heartbeat
from pipeline.train.progress import Progress
from pipeline.train.run import autocast
from pipeline.train.state import averaged_buffers

Losses = Callable[[Batch], dict[str, torch.Tensor]]  # a batch's named losses


def validate(loader: ShardedLoader | None, model: torch.nn.Module, losses: Losses, dist: Dist,
             precision: str, heartbeat: Heartbeat) -> dict[str, float]:
    """Mean `losses` (the first phase's, of `model`) over the validation split in `loader`, in
    train.precision, averaged over ranks."""
    if loader is None:
        return {}
    # fork_rng: training's RNG stays untouched; the ranks' mean batch-norm statistics
    with torch.no_grad(), torch.random.fork_rng(devices=[]), averaged_buffers(model, dist):
        model.eval()
        sums: dict[str, torch.Tensor] = {}  # float64 on the device, read once (issue 28)
        loader.set_epoch(0)
        n = 0
        for n, batch in enumerate(loader, 1):
            heartbeat.beat("validation")
            batch = {k: v.to(dist.device) for k, v in batch.items()}
            with autocast(precision, dist.device):
                for k, v in losses(batch).items():
                    v = v.detach().double()
                    sums[k] = sums[k] + v if k in sums else v
        values = torch.stack(list(sums.values())).tolist() if sums else []
        return dist.mean({f"val/{k}": v / max(n, 1) for k, v in zip(sums, values)})


def after_validation(metrics: dict[str, float], progress: Progress, tracker: Tracker,
                     es: EarlyStopConfig) -> bool:
    """Record the validation metrics in the tracker and the history; returns whether early
    stopping (train.early_stopping: `es`) says stop."""
    tracker.log(metrics, progress.step)  # the step is the row's own (an int), once
    metrics = {**metrics, "step": float(progress.step)}
    progress.history.append(metrics)
    return _early_stop(progress, es, metrics)


def _early_stop(p: Progress, es: EarlyStopConfig, metrics: dict[str, float]) -> bool:
    if not es.metric or es.metric not in metrics:
        return False
    value = metrics[es.metric]
    better = (p.stop_best is None or
              (value < p.stop_best - es.min_delta if es.mode == "min"
               else value > p.stop_best + es.min_delta))
    p.stop_best, p.stop_bad = (value, 0) if better else (p.stop_best, p.stop_bad + 1)
    return p.stop_bad >= es.patience
