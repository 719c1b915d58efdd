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
