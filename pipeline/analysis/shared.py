"""What the analysis commands share: a checkpoint opened with its config, the split they score,
the store's samples in the model's space, and the results written to the checkpoint's W&B run.

`hpcforge evaluate`, `probe`-based `explain` and `attack`, and the latent-space walk all start from
a checkpoint and end in its W&B run; this module is below all of them, so none imports another to
get these (issue #27: evaluate <-> latent and probe -> evaluate were import circles).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, config_from_dict
from pipeline.core import figures
from pipeline.core.checkpoint import load
from pipeline.core.errors import UserError
from pipeline.data.store import Store, normalization


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; pass the .pt file `hpcforge train` wrote "
                        f"(e.g. outputs/<experiment>/train/checkpoints/final.pt)")
    try:
        ckpt = load(path)
    except UserError:  # damaged (a CRC32 fails): its own line names the record and the fix
        raise
    except Exception as e:  # truncated, not a torch file, or pickled code the safe loader refuses
        raise UserError(f"{path} is not a readable hpcforge checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200]}); train again or point at another "
                        f"checkpoint") from None
    missing = {"model", "config", "step"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise UserError(f"{path} is not an hpcforge checkpoint (missing {', '.join(sorted(missing))}); "
                        f"pass a checkpoint written by `hpcforge train`")
    return ckpt


def checkpoint_config(ckpt: dict[str, Any], overrides: list[str]) -> Config:
    """The checkpoint's resolved config with `key=value` overrides (e.g. data.path=...)."""
    return config_from_dict(ckpt["config"], overrides)


def normalized(store: Store, split: str, variable: str, how: str, n: int) -> np.ndarray:
    """The first n samples of a split (the store is globally shuffled), in the loader's space."""
    raw = np.asarray(store.variable(split, variable)[:n], np.float64)
    shift, scale = normalization(store.stats("train", variable), how)
    return as_image((raw - per_channel(shift, raw)) / per_channel(scale, raw)).astype(np.float32)


def per_channel(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A per-channel statistic `a` shaped to broadcast over samples x (N, C, ...)."""
    return np.atleast_1d(a).reshape((1, -1) + (1,) * (x.ndim - 2))


def eval_split(store: Store) -> str:
    """The test split; a store prepared without one is scored on its val split, said in one line
    (the val split may have picked best.pt, so its numbers flatter the model)."""
    if store.meta.splits.get("test", 0):
        return "test"
    print(f"[hpcforge] note: {store.path} has no test split (prepared with data.test_fraction=0): "
          f"evaluating on the val split instead ({store.meta.splits.get('val', 0)} samples, which "
          f"may have picked best.pt); prepare with data.test_fraction=0.1 for held-out numbers")
    return "val"


def as_image(x: np.ndarray) -> np.ndarray:
    """(N, H, W) sequences or single-channel fields -> (N, 1, H, W); (N, C, H, W) unchanged."""
    return x[:, None] if x.ndim == 3 else x


def log_to_wandb(cfg: Config, path: Path, ckpt: dict[str, Any], ev: Any,
                 prefix: str = "eval") -> str | None:
    """Append the metrics and figures to the checkpoint's W&B run (same id, resume="allow"),
    under `<prefix>/` and `<prefix>_figures/`. `ev` is an Evaluation or any object with the same
    metrics, figures and notes (pipeline.analysis.probe.Results, for explain and attack)."""
    from pipeline.runtime.tracking import open_run, resolve_mode
    run_id, mode = ckpt.get("wandb_run_id"), resolve_mode(cfg.train.logger.mode)
    if not run_id or mode == "disabled":
        ev.notes.append("no W&B run to log to (the checkpoint holds no run id, or logger.mode=disabled)")
        return None
    import wandb
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    run = open_run(cfg.train.logger, mode, run_dir, run_id)
    metrics = {f"{prefix}/{k}": v for k, v in ev.metrics.items()}
    run.log({**metrics, **{f"{prefix}_figures/{k}": wandb.Image(figures.to_array(f))
                           for k, f in ev.figures.items()}})
    run.summary.update(metrics)
    run_path = str(Path(run.dir).parent)
    run.finish()
    return run_path
