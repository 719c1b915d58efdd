"""The metrics of one log line: losses averaged over the steps since the last one and over
ranks, with the throughput and the fraction of time spent waiting for data."""
from __future__ import annotations

import time
from collections.abc import Mapping
from functools import cache

import torch
from tqdm import tqdm

from pipeline.data.loader import ShardedLoader
from pipeline.runtime.dist import Dist
from pipeline.runtime.tracking import Tracker
from pipeline.train.profile import StepTimer
from pipeline.train.progress import Progress


@cache
def metric_name(*parts: str) -> str:
    """A metric's name, made once (f-strings for each metric of each step cost ~3 us a step)."""
    return "/".join(parts)


class Sums:
    """Per-step metrics, averaged without reading them on the host between log steps (issue 28).
    `add` keeps a step's metrics as they are (0-d tensors on the device, and plain floats such as
    the lr): nothing is computed per step. `means` (or every FOLD steps, so a large log_every
    holds few Python objects) groups the steps' values by key and sums each key's values in one
    stack on the device, in float64; `means` then reads every key's sum in one transfer. A key
    present in only some steps (the grad norm and lr, taken at log steps) is averaged over the
    steps that have it. Summing on the device at each step cost ~30 us a step on CPU (a stack
    and an add_), measured; this costs ~5 us a step at log_every=10."""
    FOLD = 256

    def __init__(self) -> None:
        self.steps: list[Mapping[str, torch.Tensor | float]] = []  # not yet summed
        self.totals: dict[str, list] = {}  # key -> [sum (0-d float64 tensor, or float), steps]

    def add(self, metrics: Mapping[str, torch.Tensor | float]) -> None:
        self.steps.append(metrics)
        if len(self.steps) >= self.FOLD:
            self._fold()

    def _fold(self) -> None:
        values: dict[str, list] = {}
        for metrics in self.steps:
            for k, v in metrics.items():
                values.setdefault(k, []).append(v)
        for k, vs in values.items():
            total = (torch.stack(vs).double().sum() if isinstance(vs[0], torch.Tensor)
                     else float(sum(vs)))
            if k in self.totals:
                self.totals[k][0] = self.totals[k][0] + total
                self.totals[k][1] += len(vs)
            else:
                self.totals[k] = [total, len(vs)]
        self.steps = []

    def means(self) -> dict[str, float]:
        """Each metric's mean over the steps it was added in; clears the sums."""
        self._fold()
        tensors = [k for k, (total, _) in self.totals.items() if isinstance(total, torch.Tensor)]
        out = {k: total / n for k, (total, n) in self.totals.items() if k not in tensors}
        if tensors:
            sums = torch.stack([self.totals[k][0] for k in tensors]).tolist()  # one read
            out.update({k: s / self.totals[k][1] for k, s in zip(tensors, sums)})
        self.totals = {}
        return out


class Window:
    """The losses since the last log line, and the time, samples and data wait they took; and the
    losses of the epoch so far (`epoch`). It reads the loader's data wait, averages over `dist`'s
    ranks and gathers the step timer's shares."""

    def __init__(self, loader: ShardedLoader, dist: Dist, timer: StepTimer,
                 samples_per_step: int, log_every: int):
        self.losses, self.epoch = Sums(), Sums()
        self.loader, self.dist, self.timer = loader, dist, timer
        self.samples_per_step, self.log_every = samples_per_step, log_every
        self._restart()

    def _restart(self) -> None:
        self.t0, self.steps, self.wait0 = time.perf_counter(), 0, self.loader.wait_s

    def add(self, losses: Mapping[str, torch.Tensor | float]) -> None:
        self.steps += 1
        self.losses.add(losses)
        self.epoch.add(losses)

    def epoch_means(self) -> dict[str, float]:
        """The epoch's mean losses (read on the host; `opt/` entries left out), and a new epoch."""
        means = self.epoch.means()
        return {k: v for k, v in means.items() if not k.startswith("opt/")}

    def log(self, progress: Progress, tracker: Tracker, bar: tqdm, loss_key: str) -> None:
        """Rank-averaged losses and throughput at `progress`, to the tracker and the progress bar
        (its postfix: the metric `loss_key`); then a new window."""
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
            bar.set_postfix(loss=f"{metrics[loss_key]:.4g}", refresh=False)  # (drawn at the
            # bar's next redraw, within its mininterval: a forced redraw cost ~1-2 ms a log line)
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
