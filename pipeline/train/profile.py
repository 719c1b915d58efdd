"""Where step time goes (issue 28, `train.profile`): per rank, the share of each step spent in

    data       waiting for the loader's next batches and moving them to the device
    forward    the model's losses
    backward   their gradients (with ddp/Horovod, all-reduces overlap this)
    allreduce  waiting, after backward, for the gradients averaged over ranks
    optimizer  clipping, the non-finite check, the update, lr schedule, EMA
    logging    the step's end: log lines, figures, validation, checkpoints
    other      the rest of the loop (the remainder: the shares sum to 1)

logged as `profile/rank<r>/<part>` and their mean over ranks `profile/<part>` every log_every
steps, with `train.profile=steps`. `train.profile=trace` also writes a torch.profiler trace of
train.profile_steps ([first step, count]) per rank to <run>/profile/trace_rank<r>.json, which
opens in Perfetto (ui.perfetto.dev) or chrome://tracing; the parts above are named ranges in it.
Lightning's `profiler="simple"` and `"pytorch"` are the models.

Timing a part on a GPU needs the device's queue drained at its edges, so a profiled run
synchronises at each part (it measures where time goes, at some cost); `train.profile=off` (the
default) times nothing: `StepTimer.part` hands back one shared no-op context.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

PARTS = ("data", "forward", "backward", "allreduce", "optimizer", "logging")
_OFF = nullcontext()


class StepTimer:
    """train.profile=off: every part is the same no-op context; nothing is timed or logged."""
    active = False

    def part(self, name: str) -> Any:
        return _OFF

    def step_done(self) -> None:
        pass

    def shares(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class PartTimer(StepTimer):
    """train.profile=steps: seconds per part since the last `shares` (at each log line), which
    reads and restarts them on one clock. Parts do not nest; one open at a `shares` (the step end
    that logs) is split there, so no second is counted twice or lost."""
    active = True

    def __init__(self, device: torch.device):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.since = time.perf_counter()
        self.open: _Part | None = None

    def part(self, name: str) -> Any:
        return _Part(self, name)

    def label(self, name: str) -> Any:
        """A named range in the trace (TraceTimer); none here."""
        return None

    def shares(self) -> dict[str, float]:
        """Each part's share of the wall time since the last call, and `other`, the rest."""
        now = time.perf_counter()
        if self.open is not None:  # credit the open part up to now; it goes on from now
            self.seconds[self.open.name] += now - self.open.t0
            self.open.t0 = now
        elapsed, self.since = now - self.since, now
        out = {k: v / elapsed for k, v in self.seconds.items()}
        out["other"] = 1.0 - sum(out.values())
        self.seconds = dict.fromkeys(PARTS, 0.0)
        return out


class _Part:
    __slots__ = ("timer", "name", "t0", "label")

    def __init__(self, timer: PartTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.timer.sync()
        self.label = self.timer.label(self.name)
        self.timer.open = self
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.timer.sync()
        self.timer.seconds[self.name] += time.perf_counter() - self.t0
        self.timer.open = None
        if self.label is not None:
            self.label.__exit__(*exc)


class TraceTimer(PartTimer):
    """train.profile=trace: the parts' shares, and a torch.profiler trace of the chosen steps.
    The profiler records from step `first` for `count` steps (one warm-up step before them, as
    torch.profiler.schedule needs) and writes Chrome trace JSON once they are done."""

    def __init__(self, device: torch.device, folder: Path, rank: int, first: int, count: int):
        super().__init__(device)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"trace_rank{rank}.json"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(skip_first=max(0, first - 2), wait=0,
                                             warmup=1 if first > 1 else 0, active=count, repeat=1),
            on_trace_ready=lambda p: p.export_chrome_trace(str(self.path)),
            record_shapes=False, with_stack=False)
        self.profiler.__enter__()

    def label(self, name: str) -> Any:
        ctx = torch.profiler.record_function(name)
        ctx.__enter__()
        return ctx

    def step_done(self) -> None:
        self.profiler.step()

    def close(self) -> None:
        self.profiler.__exit__(None, None, None)


def step_timer(mode: str, device: torch.device, folder: Path, rank: int,
               steps: list[int]) -> StepTimer:
    """The timer train.profile asks for."""
    if mode == "steps":
        return PartTimer(device)
    if mode == "trace":
        first, count = steps
        return TraceTimer(device, folder, rank, first, count)
    return StepTimer()
