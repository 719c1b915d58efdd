"""Transfer learning (issue #16): start from another run's weights, freeze parts, scale lr by part.

`train.init_from=<checkpoint>` loads the model weights of another run (not its optimizer, step or
schedule: a fine-tune starts at step 0 with a fresh optimizer). Tensors are matched by name and
shape: a tensor whose shape changed (a new head: `model.n_outputs` differs) keeps this run's fresh
initialisation, as do tensors the checkpoint lacks; the checkpoint's tensors this model lacks are
ignored. A checkpoint of another model family is refused, as resume refuses one.

Parameters are named as in `model.named_parameters()` (`features.0.0.weight`, `head.3.bias`); a
prefix matches whole dotted components, so `stages.1` names `stages.1.conv.weight` but not
`stages.10.conv.weight`. `train.freeze` takes parameters out of training (requires_grad=False, left
out of the optimizer) and keeps the batch norms under a frozen prefix in eval mode, so their running
statistics stay those of the pretraining data as well (Yosinski et al. 2014, arXiv:1411.1792, and
the usual fine-tuning recipe). `train.optim.groups` gives prefixes their own lr scale.
"""
from __future__ import annotations

import types
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.core.checkpoint import first_difference, load
from pipeline.core.errors import UserError

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


def matches(name: str, prefix: str) -> bool:
    """`prefix` names `name` by whole dotted components (the name itself, or a parent of it)."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def check_prefixes(model: nn.Module, prefixes: list[str], key: str) -> None:
    """Refuse a prefix that names no parameter, listing the model's top-level modules."""
    names = [n for n, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(matches(n, prefix) for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise UserError(f"{key}: prefix {prefix!r} names no parameter of model "
                            f"{type(model).__name__}; expected a parameter-name prefix such as one "
                            f"of its top-level modules: {', '.join(top)}")


# ---------------------------------------------------------------------------- freezing
def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """`train()` of a frozen batch norm: it stays in eval mode (running statistics unchanged)."""
    return nn.Module.train(module, False)


def freeze(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Freeze the parameters under `prefixes` and pin the batch norms under them in eval mode
    (their own `train` is replaced, so the loop's `model.train()` cannot flip them back).
    Returns the frozen parameters' names."""
    if not prefixes:
        return []
    check_prefixes(model, prefixes, "train.freeze")
    frozen = []
    for name, p in model.named_parameters():
        if any(matches(name, pre) for pre in prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORMS) and any(matches(name, pre) for pre in prefixes):
            module.train = types.MethodType(_stay_in_eval, module)
            module.eval()
    return frozen


# ---------------------------------------------------------------------------- lr groups
def lr_groups(model: nn.Module, params: list[nn.Parameter], scales: dict[str, float]
              ) -> list[tuple[float, list[nn.Parameter]]]:
    """`params` (trainable ones of one optimizer) split by `train.optim.groups`: (lr scale,
    parameters), the unscaled rest first; the longest matching prefix decides."""
    for prefix, scale in scales.items():
        if not scale > 0:
            raise UserError(f"train.optim.groups.{prefix}={scale}: expected an lr scale > 0; "
                            f"to keep {prefix!r} fixed use train.freeze=[{prefix}]")
    check_prefixes(model, list(scales), "train.optim.groups")
    names = {id(p): n for n, p in model.named_parameters()}
    groups: dict[float, list[nn.Parameter]] = {1.0: []}
    for p in params:
        hits = [pre for pre in scales if matches(names[id(p)], pre)]
        scale = scales[max(hits, key=len)] if hits else 1.0
        groups.setdefault(scale, []).append(p)
    return [(s, ps) for s, ps in groups.items() if ps]


# ---------------------------------------------------------------------------- init_from
@dataclass
class Matched:
    """How a checkpoint's tensors met this model's: names, in state_dict order."""
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # shape changed, or not in checkpoint
    ignored: list[str] = field(default_factory=list)        # in the checkpoint only

    def counts(self) -> dict[str, float]:
        return {"transfer/loaded": len(self.loaded),
                "transfer/reinitialised": len(self.reinitialised),
                "transfer/ignored": len(self.ignored)}

    def describe(self, path: str) -> str:
        lines = [f"[hpcforge] init_from {path}: {len(self.loaded)} tensors loaded, "
                 f"{len(self.reinitialised)} re-initialised, {len(self.ignored)} ignored"]
        for label, names in (("re-initialised", self.reinitialised), ("ignored", self.ignored)):
            if names:
                lines.append(f"[hpcforge]   {label}: {', '.join(names)}")
        if self.loaded:  # by top-level module: a backbone's hundreds of names say no more
            tops = Counter(k.split(".")[0] for k in self.loaded)
            lines.append(f"[hpcforge]   loaded: "
                         f"{', '.join(f'{top} ({n})' for top, n in tops.items())}")
        return "\n".join(lines)


def match(saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> Matched:
    m = Matched(ignored=[k for k in saved if k not in own])
    for k, t in own.items():
        fits = k in saved and tuple(saved[k].shape) == tuple(t.shape)
        (m.loaded if fits else m.reinitialised).append(k)
    return m


def read_init(path: str, model_name: str) -> dict[str, Any]:
    """The checkpoint of train.init_from, refused unless it holds weights of this model family."""
    if not Path(path).is_file():
        raise UserError(f"train.init_from={path}: no such checkpoint file; expected the path of a "
                        f".pt file written by `hpcforge train` (e.g. <output_dir>/train/"
                        f"checkpoints/final.pt)")
    ckpt = load(path)
    saved_name = ckpt.get("model_name", ckpt.get("config", {}).get("model", {}).get("name"))
    if saved_name != model_name:
        diff = first_difference("model.name", saved_name, model_name)
        raise UserError(f"train.init_from={path} does not fit this run: {diff}; start from a "
                        f"checkpoint of model {model_name}, or drop train.init_from")
    return ckpt


def init_from(model: nn.Module, path: str, model_name: str) -> Matched:
    """Load what fits of the checkpoint's weights into `model` (in place; the rest keeps its fresh
    initialisation). A checkpoint none of whose tensors fit is refused, naming the first key."""
    saved = read_init(path, model_name)["model"]
    own = model.state_dict()
    m = match(saved, own)
    if not m.loaded:
        first = next(iter(own))
        got = tuple(saved[first].shape) if first in saved else "absent"
        raise UserError(f"train.init_from={path} does not fit this run: no tensor fits, the first "
                        f"key {first} is {got} in the checkpoint but {tuple(own[first].shape)} "
                        f"here; start from a checkpoint of this architecture")
    with torch.no_grad():
        for k in m.loaded:
            own[k].copy_(saved[k])
    return m
