"""Rank 0's record of a run: a W&B run (offline by default) and the trainer's own metrics.jsonl.

Other ranks get a Tracker whose methods do nothing, so callers never test the rank themselves.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import LoggerConfig
from pipeline.core.errors import UserError
from pipeline.core.redaction import redact


def image_grid(images: torch.Tensor, ncol: int = 8, pad: int = 1, zoom: int = 4) -> np.ndarray:
    """Tile (N, C, H, W) images in [0, 1] into one uint8 (H', W') or (H', W', 3) picture."""
    x = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = x.shape
    ncol = min(ncol, n)
    nrow = -(-n // ncol)
    grid = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    grid = grid.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2)  # small fields: enlarge
    arr = (grid.numpy() * 255).round().astype(np.uint8)
    return arr[0] if c == 1 else arr[:3].transpose(1, 2, 0)


def _picture(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A batch of images (N, C, H, W) in [0, 1] becomes a grid; a ready picture passes as is."""
    return image if isinstance(image, np.ndarray) else image_grid(image)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# Room asked for before W&B starts and before it finishes: its offline files for a short run are
# well under this. W&B does not report a full disk (measured with 0.31 on a full tmpfs: its writer
# drops the records without a word, its log handlers print a traceback per line), so a full disk
# is caught here, around W&B, with one line.
W_AND_B_ROOM = 1 << 20


def disk_full(path: Path | str, e: OSError) -> UserError:
    """The one line for a full disk (or quota): the path, and what keeps the run's work."""
    return UserError(f"disk full writing {path} ({e.strerror}); free space on that filesystem "
                     f"(df -h {Path(path).parent}) or set output_dir to one with room, then "
                     f"run again with train.resume=auto: the checkpoints written so far are kept")


def check_room(folder: Path, named: Path | str, size: int = W_AND_B_ROOM) -> None:
    """Write and remove a probe of `size` bytes in `folder`: a full disk or a quota is refused
    here, naming `named` (what was about to be written)."""
    probe = folder / f".hpcforge-room-{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(bytes(size))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full(named, e) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()


@contextlib.contextmanager
def quiet_log_handlers():
    """While W&B runs: a log handler that cannot write (a full disk) does not print a traceback
    per record; the failure still surfaces where W&B closes its files (an OSError we name)."""
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        yield
    finally:
        logging.raiseExceptions = raise_exceptions


def resolve_mode(mode: str) -> str:
    """`auto`: online when a W&B API key is in the environment, else offline (no account needed)."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def own_service() -> None:
    """Have the next wandb.init log through a W&B service of this process: WANDB_SERVICE, the
    address of a service that wandb leaves for child processes to share, is dropped when it came
    from a parent (once this process has started its own, wandb uses that whatever the variable
    says). A job inherits the variable when submitted from a process running W&B (sbatch passes
    the environment on), where the socket is on another node or gone: wandb.init failed with a
    traceback. And a run that shares its parent's service is still being written after its own
    process has exited."""
    os.environ.pop("WANDB_SERVICE", None)


def open_run(cfg: LoggerConfig, mode: str, run_dir: Path, run_id: str | None,
             config: dict[str, Any] | None = None):
    """wandb.init as hpcforge opens every run: resumed by id when it exists, config redacted, no
    console capture, and no W&B metadata (it includes the command line, where a secret may sit;
    what matters is in the redacted config). Through a W&B service of this process's own."""
    import wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    own_service()
    return wandb.init(mode=mode, dir=str(run_dir), project=cfg.project, entity=cfg.entity,
                      group=cfg.group, tags=cfg.tags, job_type=cfg.job_type,
                      config=None if config is None else redact(config), id=run_id,
                      resume="allow", settings=wandb.Settings(console="off", x_disable_meta=True))


def _row_step(line: str) -> float:
    """A metrics.jsonl row's step; a row cut short by a crash counts as past every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _forget_dead_service() -> None:
    """W&B's service process is gone (Slurm's requeue signal reaches it too): tear our side down
    now, quietly, so wandb's own exit hook does not print a ConnectionResetError traceback into
    the job's log after the run has said what happened (issue 25). wandb's teardown unregisters
    that hook before it talks to the service, which is what then fails."""
    import wandb
    with contextlib.suppress(Exception, SystemExit):
        wandb.teardown()


class Tracker:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], active: bool,
                 run_id: str | None = None):
        self.active = active
        self.run = None
        self.run_id: str | None = None
        self.run_path: str | None = None
        self.metrics_path = run_dir / "metrics.jsonl"
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        mode = resolve_mode(cfg.mode)
        if mode != "disabled":
            check_room(run_dir, run_dir / "wandb")
            self.run = open_run(cfg, mode, run_dir, run_id, config)
            self.run_id, self.run_path = self.run.id, str(Path(self.run.dir).parent)

    @property
    def records_images(self) -> bool:
        """Whether images logged now are kept (a W&B run is open): else don't draw them."""
        return self.active and self.run is not None

    def _call_wandb(self, call: Callable[[], Any]) -> None:
        """Run a W&B call; if W&B's service process is gone, keep training without it.

        Slurm sends its preemption signal to every process of the job step, W&B's background
        service included, which exits; the training must still reach its checkpoint. The run is
        reopened under the same id when the job resumes, and metrics.jsonl stays complete.
        """
        if self.run is None:
            return
        try:
            with self._named_if_full(self.run_path or self.metrics_path.parent), \
                    quiet_log_handlers():
                call()
        except UserError:
            raise
        except Exception as e:  # ConnectionResetError, BrokenPipeError, wandb.Error, ...
            print(f"[hpcforge] W&B stopped answering ({type(e).__name__}: {e}); metrics go on in "
                  f"{self.metrics_path}, and a resumed run continues W&B run {self.run_id}",
                  flush=True)
            self.run = None
            _forget_dead_service()

    @contextlib.contextmanager
    def _named_if_full(self, path: Path | str):
        """A full disk while writing `path` ends the W&B run quietly and becomes one line."""
        try:
            yield
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            self._close_quietly()
            raise disk_full(path, e) from None

    def _close_quietly(self) -> None:
        """End the W&B run on a full disk without its log handlers printing a traceback per
        line they cannot write (and without its exit hook trying again)."""
        run, self.run = self.run, None
        if run is None:
            return
        with quiet_log_handlers(), contextlib.suppress(Exception):  # the caller names the disk
            run.finish(exit_code=1)

    def discard(self) -> None:
        """A run that failed before its first step: its W&B run is closed as failed and its folder
        removed, with the links W&B made to it (latest-run, debug logs), so no empty run is left
        for `wandb sync` or the project page (issue 24). Another run's files in the folder stay."""
        run, self.run = self.run, None
        if run is None:
            return
        folder = Path(self.run_path or run.dir).resolve()
        with quiet_log_handlers(), contextlib.suppress(Exception):  # the failure is the news
            run.finish(exit_code=1)
        shutil.rmtree(folder, ignore_errors=True)
        for link in folder.parent.iterdir():
            if link.is_symlink() and not link.exists():
                link.unlink()
        with contextlib.suppress(OSError):  # only if nothing else is in it
            folder.parent.rmdir()
        self.run_id = self.run_path = None

    def write_json(self, path: Path, obj: Any) -> None:
        """A run file (summary.json); a full disk is one line naming it."""
        with self._named_if_full(path):
            path.write_text(json.dumps(obj, indent=2))

    def drop_after(self, step: int) -> None:
        """A resumed run: metrics.jsonl keeps the rows of steps up to `step`, where the checkpoint
        was; the rows of the steps the resume discards go (issue 25: each step once, the history
        the run goes on from). Rewritten whole and renamed over the file: never half there.
        An offline W&B run gets the same history (`_resume_offline_wandb`)."""
        if not (self.active and self.metrics_path.is_file()):
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _row_step(line) <= step]  # (a half-written row goes too)
        if len(kept) != len(lines):
            tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp")
            with self._named_if_full(self.metrics_path):
                tmp.write_text("".join(kept))
                os.replace(tmp, self.metrics_path)
        self._resume_offline_wandb([json.loads(line) for line in kept])

    def _resume_offline_wandb(self, rows: list[dict[str, Any]]) -> None:
        """Issue 25: after a resume, the W&B files hold each step once, the resumed history.

        W&B cannot resume an offline run: each sitting writes a run file of its own under the
        same id, and `wandb sync` does not merge them (wandb#3841, wandb#5865: a later file's
        history replaces or collides with the earlier one's, whose discarded steps stay). So the
        new sitting's file holds the whole history: the kept metrics.jsonl rows are logged again
        at their steps (scalars; earlier images stay in the earlier folders' media/), and the
        earlier sittings' run files become `run-<id>.wandb.superseded`, kept as they were but
        out of what `wandb sync` uploads (it takes `*.wandb`). Online runs are W&B's to resume."""
        if self.run is None or not self.run.offline:
            return
        here = Path(self.run_path).resolve()
        for old in Path(self.run_path).parent.glob(f"offline-run-*-{self.run_id}/run-*.wandb"):
            if old.parent.resolve() != here:
                old.rename(old.with_name(old.name + ".superseded"))
        for row in rows:
            step = int(row.pop("step"))  # (rows written before 2026-12-06 could hold 16.0)
            self._call_wandb(lambda: self.run.log(row, step=step))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        with self._named_if_full(self.metrics_path), open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._call_wandb(lambda: self.run.log(metrics, step=step))

    def images(self, images: dict[str, torch.Tensor], step: int) -> None:
        if not (self.active and self.run is not None and images):
            return
        import wandb
        pictures = {f"images/{k}": wandb.Image(_picture(v), caption=f"{k} @ step {step}")
                    for k, v in images.items()}
        self._call_wandb(lambda: self.run.log(pictures, step=step))

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        def close() -> None:
            self.run.summary.update(summary)
            self.run.finish(exit_code=exit_code)
        if self.run is not None:
            try:  # W&B would drop its last records on a full disk without a word
                check_room(Path(self.run_path), self.run_path)
            except UserError:
                self._close_quietly()
                raise
        self._call_wandb(close)
        self.run = None
