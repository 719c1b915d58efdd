"""The metrics of one log line: losses averaged over the steps since the last one and over
ranks, with the throughput and the fraction of time spent waiting for data."""
from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from tqdm import tqdm

from pipeline.data.loader import ShardedLoader
from pipeline.runtime.dist import Dist
from pipeline.runtime.tracking import Tracker
from pipeline.train.profile import StepTimer
from pipeline.train.progress import Progress


class Sums:
    """Per-step metrics summed over steps without reading them on the host (issue 28): a step's
    0-d tensors are stacked into one vector and added on their device (two small ops a step,
    float64 sums; torch.stack promotes mixed dtypes itself); plain floats (the lr) are summed
    here. `means` reads them in one transfer."""

    def __init__(self) -> None:
        self.vectors: dict[tuple[str, ...], list] = {}  # keys -> [sum vector, steps]
        self.floats: dict[str, list[float]] = {}        # key -> [sum, steps]

    def add(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        keys = tuple(k for k, v in metrics.items() if isinstance(v, torch.Tensor))
        if keys:
            vec = torch.stack([metrics[k] for k in keys])
            if keys in self.vectors:
                self.vectors[keys][0].add_(vec)
                self.vectors[keys][1] += 1
            else:
                self.vectors[keys] = [vec.double(), 1]
        for k, v in metrics.items():
            if not isinstance(v, torch.Tensor):
                total = self.floats.setdefault(k, [0.0, 0])
                total[0] += float(v)
                total[1] += 1

    def fold_into(self, *others: Sums) -> None:
        """Add these sums to each of `others` (on the device, nothing read), and clear them."""
        for other in others:
            for keys, (vec, n) in self.vectors.items():
                if keys in other.vectors:
                    other.vectors[keys][0].add_(vec)
                    other.vectors[keys][1] += n
                else:
                    other.vectors[keys] = [vec.clone(), n]
            for k, (total, n) in self.floats.items():
                mine = other.floats.setdefault(k, [0.0, 0])
                mine[0] += total
                mine[1] += n
        self.vectors, self.floats = {}, {}

    def means(self) -> dict[str, float]:
        """Each metric's mean over the steps it was added in; clears the sums."""
        out = {k: total / n for k, (total, n) in self.floats.items()}
        if self.vectors:
            means = torch.cat([vec / n for vec, n in self.vectors.values()]).tolist()  # one read
            out.update(zip((k for keys in self.vectors for k in keys), means))
        self.vectors, self.floats = {}, {}
        return out


class Window:
    """The losses since the last log line, and the time, samples and data wait they took; and the
    losses of the epoch so far (`epoch`). A step's losses are added once, into `pending`, which
    is folded into both at log steps and at the epoch's end: one sum a step, not two. It reads
    the loader's data wait, averages over `dist`'s ranks and gathers the step timer's shares."""

    def __init__(self, loader: ShardedLoader, dist: Dist, timer: StepTimer,
                 samples_per_step: int, log_every: int):
        self.pending, self.losses, self.epoch = Sums(), Sums(), Sums()
        self.loader, self.dist, self.timer = loader, dist, timer
        self.samples_per_step, self.log_every = samples_per_step, log_every
        self._restart()

    def _restart(self) -> None:
        self.t0, self.steps, self.wait0 = time.perf_counter(), 0, self.loader.wait_s

    def add(self, losses: Mapping[str, torch.Tensor | float]) -> None:
        self.steps += 1
        self.pending.add(losses)

    def epoch_means(self) -> dict[str, float]:
        """The epoch's mean losses (read on the host; `opt/` entries left out), and a new epoch."""
        self.pending.fold_into(self.losses, self.epoch)
        means = self.epoch.means()
        return {k: v for k, v in means.items() if not k.startswith("opt/")}

    def log(self, progress: Progress, tracker: Tracker, bar: tqdm, loss_key: str) -> None:
        """Rank-averaged losses and throughput at `progress`, to the tracker and the progress bar
        (its postfix: the metric `loss_key`); then a new window."""
        self.pending.fold_into(self.losses, self.epoch)
        means = self.losses.means()  # (read first: on a GPU it waits for the queued steps)
        elapsed, dist = time.perf_counter() - self.t0, self.dist
        metrics = dist.mean({f"train/{k}" if "/" in k and not k.startswith("opt/") else k: v
                             for k, v in means.items()})
        metrics.update({"perf/samples_per_s": self.steps * self.samples_per_step / elapsed,
                        "perf/step_time_s": elapsed / self.log_every,
                        "perf/data_wait_fraction": (self.loader.wait_s - self.wait0) / elapsed,
                        "train/nonfinite_steps": float(progress.nonfinite_total),
                        "dist/ranks": float(dist.world_size),
                        "dist/nodes": float(max(1, dist.world_size // dist.local_size)),
                        "epoch": float(progress.epoch)})
        metrics.update(self._profile())
        if dist.device.type == "cuda":
            metrics["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(dist.device) / 2 ** 30
        tracker.log(metrics, progress.step)
        if loss_key in metrics:
            bar.set_postfix(loss=f"{metrics[loss_key]:.4g}")
        self._restart()

    def _profile(self) -> dict[str, float]:
        """train.profile: every rank's shares of the step time, and their mean (none if off)."""
        if not self.timer.active:
            return {}
        ranks, metrics = self.dist.gather_object(self.timer.shares()), {}
        for rank, shares in enumerate(ranks):
            metrics.update({f"profile/rank{rank}/{k}": v for k, v in shares.items()})
        metrics.update({f"profile/{k}": sum(r.get(k, 0.0) for r in ranks) / len(ranks)
                        for k in ranks[0]})
        return metrics


def progress_bar(loader: ShardedLoader, per_step: int, epoch: int, epochs: int,
                 is_main: bool) -> tqdm:
    """Epoch `epoch`'s bar on rank 0: `loader`'s steps of `per_step` batches, from its place."""
    return tqdm(total=len(loader) // per_step, initial=loader.start_batch // per_step,
                desc=f"epoch {epoch + 1}/{epochs}", disable=not is_main,
                dynamic_ncols=True, mininterval=1.0)  # redrawn once a second at most
