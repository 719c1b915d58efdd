"""Checkpoints: written by rank 0 only, atomically; loaded with torch's safe (weights-only) loader."""
from __future__ import annotations

import os
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


class Checkpoints:
    """A run's checkpoint folder: step-NNNNNNNN.pt (the newest `keep`), last.pt, best.pt."""

    def __init__(self, folder: str | Path, keep: int = 3, best_metric: str = "",
                 best_mode: str = "min"):
        self.folder, self.keep = Path(folder), max(1, keep)
        self.best_metric, self.best_mode = best_metric, best_mode
        self.best_value: float | None = None

    def steps(self) -> list[Path]:
        return sorted(self.folder.glob("step-*.pt"), reverse=True)

    def save(self, state: dict[str, Any], step: int, metrics: dict[str, float]) -> Path:
        path = save_atomic(state, self.folder / f"step-{step:08d}.pt")
        link_atomic(path, self.folder / "last.pt")
        value = metrics.get(self.best_metric) if self.best_metric else None
        if value is not None and self._better(value):
            self.best_value = value
            link_atomic(path, self.folder / "best.pt")
        for old in self.steps()[self.keep:]:
            old.unlink()
        return path

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
