"""Validation and early stopping: the first phase's losses on the validation split.

Validation reads the same batches every time (epoch 0), with the ranks' mean batch-norm
statistics and training's RNG untouched, so its numbers compare across steps and resumes.
"""
from __future__ import annotations

import torch

from pipeline.train.run import Run, autocast
from pipeline.train.state import averaged_buffers


def validate(run: Run) -> dict[str, float]:
    """Mean losses of the first phase over the validation split, averaged over ranks."""
    if run.val_loader is None:
        return {}
    # fork_rng: training's RNG stays untouched; the ranks' mean batch-norm statistics
    with torch.no_grad(), torch.random.fork_rng(devices=[]), averaged_buffers(run):
        run.model.eval()
        sums: dict[str, torch.Tensor] = {}  # float64 on the device, read once (issue 28)
        run.val_loader.set_epoch(0)
        n = 0
        for n, batch in enumerate(run.val_loader, 1):
            run.heartbeat.beat("validation")
            batch = {k: v.to(run.dist.device) for k, v in batch.items()}
            with autocast(run):
                for k, v in run.losses(batch, run.phases[0].name).items():
                    v = v.detach().double()
                    sums[k] = sums[k] + v if k in sums else v
        values = torch.stack(list(sums.values())).tolist() if sums else []
        return run.dist.mean({f"val/{k}": v / max(n, 1) for k, v in zip(sums, values)})


def after_validation(run: Run, metrics: dict[str, float]) -> bool:
    """Record the validation metrics; returns whether early stopping says stop."""
    run.tracker.log(metrics, run.progress.step)  # the step is the row's own (an int), once
    metrics = {**metrics, "step": float(run.progress.step)}
    run.progress.history.append(metrics)
    return _early_stop(run, metrics)


def _early_stop(run: Run, metrics: dict[str, float]) -> bool:
    es, p = run.cfg.train.early_stopping, run.progress
    if not es.metric or es.metric not in metrics:
        return False
    value = metrics[es.metric]
    better = (p.stop_best is None or
              (value < p.stop_best - es.min_delta if es.mode == "min"
               else value > p.stop_best + es.min_delta))
    p.stop_best, p.stop_bad = (value, 0) if better else (p.stop_best, p.stop_bad + 1)
    return p.stop_bad >= es.patience
