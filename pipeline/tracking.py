"""Rank 0's record of a run: a W&B run (offline by default) and the trainer's own metrics.jsonl.

Other ranks get a Tracker whose methods do nothing, so callers never test the rank themselves.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import LoggerConfig
from pipeline.redaction import redact


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


def resolve_mode(mode: str) -> str:
    """`auto`: online when a W&B API key is in the environment, else offline (no account needed)."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def open_run(cfg: LoggerConfig, mode: str, run_dir: Path, run_id: str | None,
             config: dict[str, Any] | None = None):
    """wandb.init as hpcforge opens every run: resumed by id when it exists, config redacted, no
    console capture, and no W&B metadata (it includes the command line, where a secret may sit;
    what matters is in the redacted config)."""
    import wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(mode=mode, dir=str(run_dir), project=cfg.project, entity=cfg.entity,
                      group=cfg.group, tags=cfg.tags, job_type=cfg.job_type,
                      config=None if config is None else redact(config), id=run_id,
                      resume="allow", settings=wandb.Settings(console="off", x_disable_meta=True))


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
            self.run = open_run(cfg, mode, run_dir, run_id, config)
            self.run_id, self.run_path = self.run.id, str(Path(self.run.dir).parent)

    @property
    def records_images(self) -> bool:
        """Whether images logged now are kept (a W&B run is open): else don't draw them."""
        return self.active and self.run is not None

    def _w(self, call: Callable[[], Any]) -> None:
        """Run a W&B call; if W&B's service process is gone, keep training without it.

        Slurm sends its preemption signal to every process of the job step, W&B's background
        service included, which exits; the training must still reach its checkpoint. The run is
        reopened under the same id when the job resumes, and metrics.jsonl stays complete.
        """
        if self.run is None:
            return
        try:
            call()
        except Exception as e:  # ConnectionResetError, BrokenPipeError, wandb.Error, ...
            print(f"[hpcforge] W&B stopped answering ({type(e).__name__}: {e}); metrics go on in "
                  f"{self.metrics_path}, and a resumed run continues W&B run {self.run_id}",
                  flush=True)
            self.run = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._w(lambda: self.run.log(metrics, step=step))

    def images(self, images: dict[str, torch.Tensor], step: int) -> None:
        if not (self.active and self.run is not None and images):
            return
        import wandb
        pictures = {f"images/{k}": wandb.Image(_picture(v), caption=f"{k} @ step {step}")
                    for k, v in images.items()}
        self._w(lambda: self.run.log(pictures, step=step))

    def finish(self, summary: dict[str, Any], exit_code: int = 0) -> None:
        def close() -> None:
            self.run.summary.update(summary)
            self.run.finish(exit_code=exit_code)
        self._w(close)
        self.run = None
