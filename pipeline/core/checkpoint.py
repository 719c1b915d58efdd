"""Checkpoints: written by rank 0 only, atomically; loaded with torch's safe (weights-only) loader.

Writes happen on a background thread by default (like Lightning's AsyncCheckpointIO or torch's
`dcp.async_save`): the step pays for a copy of the state in memory, training goes on while the
file is written, and at most one write is in flight. `Checkpoints.wait()` makes it durable and
re-raises its error; the trainer calls it before exiting for any reason.

Integrity (issue 14): torch.save writes a zip archive whose every record (the pickle, each
tensor's storage) carries a CRC32, but torch.load never checks them, so flipped bytes loaded
silently. `load` checks them first (`zipfile.testzip`): a damaged checkpoint is refused with one
line, and `latest_valid` passes over it. Nothing new is stored, so checkpoints written before
this check are verified too; only the pre-1.6 non-zip format has no checksum (loaded with a note).
A write that runs out of disk space is one line naming the path, the bytes needed and free.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from pipeline.core.errors import UserError

DAMAGED_SUFFIX = ".damaged"  # what a damaged checkpoint is renamed to (Checkpoints.set_aside)


class DamagedCheckpoint(UserError):
    """A checkpoint whose bytes changed after it was written (a record fails its CRC32)."""


class UnreadableCheckpoint(DamagedCheckpoint):
    """A file torch.load cannot read at all: empty, cut short, text, another format."""


class CheckpointDiskFull(UserError):
    """A checkpoint write that ran out of space; the previous checkpoint is untouched."""


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
    except Exception as e:
        tmp.unlink(missing_ok=True)  # first: the space it held counts as free below
        full = _disk_full(e, path, state)
        if full is None:
            raise
        raise full from None
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _disk_full(e: Exception, path: Path, state: Any) -> CheckpointDiskFull | None:
    """The one-line error for a write that failed for want of space, else None. torch.save into a
    file reports a short write as `RuntimeError: ... unexpected pos` with no errno, so besides
    ENOSPC/EDQUOT a failure counts as disk full when the free space is below the payload's size."""
    needed = _payload_bytes(state)
    free = shutil.disk_usage(path.parent).free
    no_space = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    if not no_space and free >= needed:
        return None
    return CheckpointDiskFull(
        f"no space left for checkpoint {path}: it needs about {needed / 2**20:.1f} MiB, "
        f"{free / 2**20:.1f} MiB free in {path.parent}; the previous checkpoint there is intact. "
        f"Free space or set output_dir to a larger disk, then continue with train.resume=auto")


def _payload_bytes(state: Any) -> int:
    """Bytes of the tensors in `state` (what dominates a checkpoint file; each storage once)."""
    seen: dict[int, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(state)
    return sum(seen.values())


def verify(path: str | Path) -> bool:
    """Check every record of a checkpoint against its CRC32; False for a file with none (torch's
    pre-zip format). Raises DamagedCheckpoint naming the first record that fails."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return False  # truncated (no zip directory at the end) or legacy: torch.load decides
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # a damaged header or directory
        raise DamagedCheckpoint(f"checkpoint {path} is damaged ({type(e).__name__}: {e}); "
                                f"use an older checkpoint or train again") from None
    if bad is not None:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: its record {bad!r} fails its "
                                f"CRC32 check (the file changed after it was written); use an "
                                f"older checkpoint or train again")
    return True


def load(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint, its CRC32s checked first, without executing pickled code
    (`weights_only=True`)."""
    checked = verify(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if checked:  # a whole archive torch refused (pickled code): its own error says why
            raise
        raise _unreadable(Path(path), e) from None
    if not checked:
        print(f"[hpcforge] note: checkpoint {path} is in torch's pre-zip format, which carries no "
              f"checksum: loaded unverified", file=sys.stderr, flush=True)
    return ckpt


def _unreadable(path: Path, e: Exception) -> UnreadableCheckpoint:
    """What a file that torch.load cannot read is, in plain words (issue 24: a truncated
    checkpoint said "(OSError: [Errno 22] Invalid argument)", a text file "(KeyError: 101)")."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(256)
    text = head.decode("utf-8", errors="ignore")
    if size == 0:
        what = "is empty (0 bytes): its write never happened, or its copy failed"
    elif head.startswith(b"PK\x03\x04"):  # a zip archive's first record, but no directory
        what = (f"is cut short ({size} bytes, the end of the archive torch.save writes is "
                f"missing): its write or copy did not finish")
    elif text and b"\x00" not in head and all(c.isprintable() or c in "\r\n\t" for c in text):
        what = (f"is a text file (it begins {text.splitlines()[0][:40]!r}), not a file "
                f"torch.save wrote")
    else:
        cause = (str(e).strip().splitlines() or [""])[0][:120]
        what = f"is not in torch's checkpoint format ({type(e).__name__}: {cause})"
    return UnreadableCheckpoint(f"{path} is not a readable hpcforge checkpoint: it {what}; pass "
                             f"one that `hpcforge train` wrote (<output_dir>/train/checkpoints/"
                             f"*.pt), use an older checkpoint, or train again")


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
        """The newest checkpoint that loads; unreadable or damaged ones are reported, passed over
        and listed in `self.damaged` (`set_aside` moves them out of the way)."""
        self.damaged: list[Path] = []
        for path in self.steps():
            try:
                return path, load(path)
            except FileNotFoundError:  # set aside by rank 0 meanwhile
                continue
            except UnreadableCheckpoint as e:
                log(f"[hpcforge] skipping unreadable checkpoint {path} ({e})")
            except DamagedCheckpoint as e:
                log(f"[hpcforge] skipping damaged checkpoint {path} ({e})")
            except Exception as e:  # truncated or corrupt: fall back to an older one
                log(f"[hpcforge] skipping unreadable checkpoint {path} ({type(e).__name__}: {e})")
            self.damaged.append(path)
        return None

    def set_aside(self, paths: list[Path]) -> list[Path]:
        """Rename damaged checkpoints to `<name>.damaged` (issue 25: never destroy evidence): a
        run that goes on writes its step files again, and would replace them. Returns the new
        paths; a name already taken gets a number."""
        moved = []
        for path in paths:
            target, n = path.with_name(path.name + DAMAGED_SUFFIX), 1
            while target.exists():
                target, n = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{n}"), n + 1
            os.replace(path, target)
            moved.append(target)
        return moved


def check_compatible(ckpt: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint written for another model or data layout, naming the first mismatch."""
    from pipeline.core.errors import UserError

    saved = ckpt.get("config", {})
    for section in ("model", "data.inputs", "data.source"):
        head, *rest = section.split(".")
        a, b = saved.get(head, {}), config.get(head, {})
        for key in rest:
            a, b = a.get(key), b.get(key)
        if a != b:
            diff = first_difference(section, a, b)
            raise UserError(f"checkpoint {path} does not fit this run: {diff}; resume with the "
                            f"config it was written with, or train.resume=never")


def first_difference(prefix: str, a: Any, b: Any) -> str:
    """'<dotted key> is <a> in the checkpoint but <b> here' for the first key where two configs
    differ: the wording of every refusal of a checkpoint (resume, train.init_from)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(f"{prefix}.{k}", a.get(k), b.get(k))
    return f"{prefix} is {a!r} in the checkpoint but {b!r} here"
