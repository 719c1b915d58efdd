"""One run, one record (issue 24): a training run writes into `<output_dir>/train/` only when that
folder holds no other run's files.

A second run into a used folder once pruned the first run's step files as "older", linked
final.pt/best.pt/last.pt across the two and appended both to metrics.jsonl. Lightning answers this
with a fresh `version_N` folder, Hydra with a dated one; here every later stage (evaluate, report,
jobs/) finds a run at `<output_dir>/train`, so a new run into a used folder is refused before any
rank starts, naming both ways on: `train.resume=auto` continues the run there (what a requeued
Slurm job does: jobs/tasks.py sets it), and a free `<output_dir>-N` starts a new one.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from pipeline.core.errors import UserError


def run_files(run_dir: Path) -> list[str]:
    """The files of a run in `run_dir` (`<output_dir>/train`), by name; [] when it holds none.
    Only what a run writes counts: an empty checkpoints/ folder or a stray file does not."""
    held = [str(p.relative_to(run_dir)) for p in sorted((run_dir / "checkpoints").glob("*.pt"))]
    held += [name for name in ("metrics.jsonl", "summary.json", "ranks.json")
             if (run_dir / name).is_file()]
    held += [f"wandb/{p.name}" for p in sorted((run_dir / "wandb").glob("*run-*"))]
    return held


def free_output_dir(output_dir: str) -> str:
    """The first `<output_dir>-N` (N = 2, 3, ...) that holds no run, as Lightning's version_N."""
    n = 2
    while run_files(Path(f"{output_dir}-{n}") / "train"):
        n += 1
    return f"{output_dir}-{n}"


def check_writable(folder: Path, key: str, value: str) -> None:
    """Make `folder` (and its parents) and write a probe file in it; a file where a folder is
    expected, a read-only filesystem or a missing permission is one line naming `key`=`value`
    (the setting that chose the folder) and the fix, before any work or rank starts (issue 24)."""
    probe = folder / f".hpcforge-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()),
                        folder)
        raise UserError(f"{key}={value}: {blocking} is a file, where a folder is expected; set "
                        f"{key} to a folder, or move the file away") from None
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise UserError(f"{key}={value}: cannot write in {folder} ({e.strerror}); set {key} to a "
                        f"folder you can write to") from None


def check_run_dir(output_dir: str, resume: str) -> None:
    """Refuse a new run into an output_dir that holds one (`train.resume=auto` continues the run
    there; so does a checkpoint path inside its own checkpoints/), or one that cannot be written."""
    output_dir = output_dir.rstrip("/") or "/"
    run_dir = Path(output_dir) / "train"
    held = run_files(run_dir)
    if resume == "auto" or not held or _inside(resume, run_dir / "checkpoints"):
        check_writable(run_dir, "output_dir", output_dir)
        return
    shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
    started = "a new run" if resume == "never" else f"train.resume={resume} (another run's checkpoint)"
    raise UserError(f"output_dir={output_dir} already holds a run ({shown} in {run_dir}), and "
                    f"{started} would mix with it; continue that run with train.resume=auto, or "
                    f"start a new one in a fresh folder, e.g. output_dir={free_output_dir(output_dir)}")


def _inside(resume: str, folder: Path) -> bool:
    if resume in ("never", "auto"):
        return False
    return Path(resume).resolve().parent == folder.resolve()
