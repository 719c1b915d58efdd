"""A trained supervised checkpoint opened for probing: what `hpcforge explain` and `hpcforge attack`
share. Loading is `hpcforge evaluate`'s (pipeline/analysis/evaluate.py), so a checkpoint that
evaluates also probes, with the same `key=value` overrides (e.g. data.path=... for a moved store).

Only supervised models (models.objectives.Supervised: one network, x -> prediction) have an output to
attribute or to attack; generative models are refused with the list of families that are supervised.
"""
from __future__ import annotations

import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn

from models import MODELS
from models import build as build_model
from models.objectives import Supervised
from pipeline.analysis.shared import checkpoint_config, eval_split, load_checkpoint, log_to_wandb
from pipeline.config import Config
from pipeline.core import figures
from pipeline.core.errors import UserError
from pipeline.data.loader import ShardedLoader
from pipeline.data.store import Store, open_store
from pipeline.train.ema import load_weights


def supervised_families() -> list[str]:
    """Model names whose build() returns a Supervised network (read from the registry's types)."""
    def returns_supervised(build: Any) -> bool:
        kind = typing.get_type_hints(build).get("return")
        return isinstance(kind, type) and issubclass(kind, Supervised)
    return [name for name, (_, build) in MODELS.items() if returns_supervised(build)]


@dataclass
class Probed:
    """A checkpoint's model (eval mode), config, store and evaluation split."""
    path: Path
    ckpt: dict[str, Any]
    cfg: Config
    model: Supervised
    store: Store
    split: str

    @property
    def classifier(self) -> bool:
        """Class logits (ce, hinge) or one binary logit (bce); else a regressor (mse)."""
        return self.model.cfg.loss in ("ce", "hinge", "bce")

    def samples(self, n: int, split: str | None = None) -> dict[str, torch.Tensor]:
        """n samples of a split (default: the evaluation split; all of it when n >= its size) as
        the loader gives them to the model: normalised like in training, labels as int64. The
        loader's first batch of size n (its blocks in the seeded order of epoch 0), so none is
        dropped and the same checkpoint always gets the same samples."""
        split = split or self.split
        n = min(n, self.store.meta.splits[split])
        loader = ShardedLoader(self.store, split, self.cfg.data.inputs, n,
                               normalize=self.cfg.data.normalize, seed=self.cfg.train.seed,
                               read_ahead=False)
        batches = iter(loader)
        batch = {k: v.clone() for k, v in next(batches).items()}  # views of the loader's buffer
        batches.close()
        return batch


def open_probed(checkpoint: str | Path, overrides: list[str], command: str) -> Probed:
    """Load a checkpoint the way `hpcforge evaluate` does; refuse a model that is not supervised."""
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, overrides)
    model = build_model(cfg.model.name, cfg.model.params)
    if not isinstance(model, Supervised):
        raise UserError(f"{path}: model {cfg.model.name!r} ({type(model).__name__}) is not a "
                        f"supervised x -> prediction network; `hpcforge {command}` works on "
                        f"{', '.join(supervised_families())}; use `hpcforge evaluate` for it")
    load_weights(model, ckpt, cfg.train.ema.weights)  # the weight average, if saved (issue #15)
    store = open_store(cfg.data.path)
    return Probed(path, ckpt, cfg, model.eval(), store, eval_split(store))


@dataclass
class Results:
    """What a probe hands to the JSON, the figure folder and W&B (as log_to_wandb expects)."""
    metrics: dict[str, float] = field(default_factory=dict)      # flat, numeric: table and W&B
    figures: dict[str, Figure] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def write_results(p: Probed, kind: str, res: Results, extra: dict[str, Any]) -> dict[str, Any]:
    """`<stem>.<kind>.json` (atomically) and `<stem>.<kind>/<figure>.png`, both next to the
    checkpoint, where `hpcforge report` finds them; the metrics and figures go to the checkpoint's
    W&B run under `<kind>/` and `<kind>_figures/`."""
    out_dir = p.path.with_name(f"{p.path.stem}.{kind}")
    out_dir.mkdir(exist_ok=True)
    pngs = {}
    for name, fig in res.figures.items():
        pngs[name] = out_dir / f"{name}.png"
        pngs[name].write_bytes(figures.to_png(fig))
    result = {"kind": kind, "checkpoint": str(p.path), "step": p.ckpt["step"],
              "model": p.cfg.model.name, "source": p.store.meta.source, "split": p.split,
              **extra, "metrics": res.metrics, "figures": {k: str(v) for k, v in pngs.items()},
              "wandb_run_id": p.ckpt.get("wandb_run_id")}
    result["wandb_run"] = log_to_wandb(p.cfg, p.path, p.ckpt, res, prefix=kind)
    result["notes"] = res.notes
    json_path = p.path.with_name(f"{p.path.stem}.{kind}.json")
    tmp = json_path.with_name(f".{json_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, json_path)
    result["json"] = str(json_path)
    return result


def scored(model: nn.Module, classifier: bool) -> nn.Module:
    """The model with one score per sample to attribute: class logits (B, K) for a classifier,
    averaged over any spatial/time axes of a dense output; the mean of all outputs (B,) for a
    regressor (for a field, its spatial mean)."""
    return _Scored(model, classifier)


class _Scored(nn.Module):
    def __init__(self, model: nn.Module, classifier: bool):
        super().__init__()
        self.model, self.classifier = model, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if self.classifier:
            return out.flatten(2).mean(2) if out.dim() > 2 else out   # (B, K)
        return out.flatten(1).mean(1)                                   # (B,)


def as_2d(sample: torch.Tensor | Any) -> Any:
    """One sample as a 2-D array to draw: channel 0 of a (C, H, W) field, a (T, D) sequence as
    is, a vector as one row."""
    a = sample.detach().cpu().numpy() if isinstance(sample, torch.Tensor) else sample
    return a[0] if a.ndim == 3 else (a if a.ndim == 2 else a.reshape(1, -1))
