"""The metrics of one log line: losses averaged over the steps since the last one and over
ranks, with the throughput and the fraction of time spent waiting for data."""
from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from pipeline.run import Run


class Window:
    """The losses since the last log line, and the time, samples and data wait they took."""

    def __init__(self, run: Run):
        self.losses: dict[str, list[float]] = defaultdict(list)
        self.samples_per_step = run.cfg.train.batch_size * run.batches_per_step * run.dist.world_size
        self._restart(run)

    def _restart(self, run: Run) -> None:
        self.t0, self.steps, self.wait0 = time.perf_counter(), 0, run.loader.wait_s

    def add(self, losses: dict[str, float]) -> None:
        self.steps += 1
        for k, v in losses.items():
            self.losses[k].append(v)

    def log(self, run: Run, bar: tqdm) -> None:
        """Rank-averaged losses and throughput, to the tracker and the progress bar."""
        elapsed, dist = time.perf_counter() - self.t0, run.dist
        metrics = dist.mean({f"train/{k}" if "/" in k and not k.startswith("opt/") else k:
                             float(np.mean(v)) for k, v in self.losses.items()})
        metrics.update({"perf/samples_per_s": self.steps * self.samples_per_step / elapsed,
                        "perf/step_time_s": elapsed / run.cfg.train.logger.log_every,
                        "perf/data_wait_fraction": (run.loader.wait_s - self.wait0) / elapsed,
                        "train/nonfinite_steps": float(run.progress.nonfinite_total),
                        "dist/ranks": float(dist.world_size),
                        "dist/nodes": float(max(1, dist.world_size // dist.local_size)),
                        "epoch": float(run.progress.epoch)})
        if dist.device.type == "cuda":
            metrics["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(dist.device) / 2 ** 30
        run.tracker.log(metrics, run.progress.step)
        key = f"train/{run.phases[0].name}/loss"
        if key in metrics:
            bar.set_postfix(loss=f"{metrics[key]:.4g}")
        self.losses.clear()
        self._restart(run)
