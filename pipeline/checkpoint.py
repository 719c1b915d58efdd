"""Checkpoints: written by rank 0 only, atomically; loaded with torch's safe (weights-only) loader.

Writes happen on a background thread by default (like Lightning's AsyncCheckpointIO or torch's
`dcp.async_save`): the step pays for a copy of the state in memory, training goes on while the
file is written, and at most one write is in flight. `Checkpoints.wait()` makes it durable and
re-raises its error; the trainer calls it before exiting for any reason.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` so that a crash leaves either the old file or the new one, whole.

    torch.save to a temporary file in the same folder, fsync it, rename over the target (atomic on
    POSIX), then fsync the folder so the rename itself survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without executing pickled code (`weights_only=True`)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def link_atomic(src: Path, dst: Path) -> None:
    """Point `dst` at `src`'s contents (a hard link, swapped in by rename: never half there)."""
    tmp = dst.with_name(f".{dst.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.link(src, tmp)
    os.replace(tmp, dst)


def snapshot(state: Any) -> Any:
    """A copy of `state` that later training cannot change: tensors copied to CPU memory,
    containers rebuilt; other leaves (numbers, strings) are immutable already."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: snapshot(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(snapshot(v) for v in state)
    return state


class Checkpoints:
    """A run's checkpoint folder: step-NNNNNNNN.pt (the newest `keep`), last.pt, best.pt."""

    def __init__(self, folder: str | Path, keep: int = 3, best_metric: str = "",
                 best_mode: str = "min", background: bool = False):
        self.folder, self.keep = Path(folder), max(1, keep)
        self.best_metric, self.best_mode = best_metric, best_mode
        self.best_value: float | None = None
        self._writer = (ThreadPoolExecutor(1, thread_name_prefix="hpcforge-checkpoint")
                        if background else None)
        self._pending: Future | None = None

    def steps(self) -> list[Path]:
        return sorted(self.folder.glob("step-*.pt"), reverse=True)

    def save(self, state: dict[str, Any], step: int, metrics: dict[str, float]) -> Path:
        """Checkpoint `state` as it is now; returns the path it has (or will have, once the
        background write is done: see `wait`)."""
        self.wait()  # one write in flight at most, and the previous one's error surfaces here
        path = self.folder / f"step-{step:08d}.pt"
        value = metrics.get(self.best_metric) if self.best_metric else None
        best = value is not None and self._better(value)
        if best:  # decided now, in step order
            self.best_value = value
        if self._writer is None:
            self._write(state, path, best)
        else:
            self._pending = self._writer.submit(self._write, snapshot(state), path, best)
        return path

    def wait(self) -> None:
        """Block until the last checkpoint is on disk; raise what its write raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, state: dict[str, Any], path: Path, best: bool) -> None:
        save_atomic(state, path)
        link_atomic(path, self.folder / "last.pt")
        if best:
            link_atomic(path, self.folder / "best.pt")
        for old in self.steps()[self.keep:]:
            old.unlink()

    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value < self.best_value if self.best_mode == "min" else value > self.best_value

    def latest_valid(self, log=print) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads; unreadable ones are reported and passed over."""
        for path in self.steps():
            try:
                return path, load(path)
            except Exception as e:  # truncated or corrupt: fall back to an older one
                log(f"[hpcforge] skipping unreadable checkpoint {path} ({type(e).__name__}: {e})")
        return None


def check_compatible(ckpt: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint written for another model or data layout, naming the first mismatch."""
    from pipeline.errors import UserError

    saved = ckpt.get("config", {})
    for section in ("model", "data.inputs", "data.source"):
        head, *rest = section.split(".")
        a, b = saved.get(head, {}), config.get(head, {})
        for key in rest:
            a, b = a.get(key), b.get(key)
        if a != b:
            diff = _first_difference(section, a, b)
            raise UserError(f"checkpoint {path} does not fit this run: {diff}; resume with the "
                            f"config it was written with, or train.resume=never")


def _first_difference(prefix: str, a: Any, b: Any) -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(f"{prefix}.{k}", a.get(k), b.get(k))
    return f"{prefix} is {a!r} in the checkpoint but {b!r} here"
