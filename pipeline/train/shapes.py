"""A model's shape keys taken from the store when the config leaves them unset (issue 24).

A user's data fixes the sizes a network is built for: the values per sample of data.inputs.x, its
channels, the shape of each variable of a joined input, the classes of the store's label table or
the size of a regression target. Writing them again in the config is a chance to get them wrong (a
store of 3 classes trained with out_features=10), so a key the config does not set
(pipeline.config.ModelSection.given) is read from the store before any rank starts. A key the config
sets is kept as set; pipeline.train.assembly.check_class_count still refuses one that disagrees with
the class table.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from pipeline.config import Config
from pipeline.data.store import Store


class Shapes:
    """What the store says about the configured inputs: the per-sample shape of each variable of
    data.inputs.x (train split) and the count of outputs the target asks for."""

    def __init__(self, cfg: Config, store: Store):
        x = cfg.data.inputs.get("x")
        names = [x] if isinstance(x, str) else list(x or [])
        self.x = [tuple(store.variable("train", n).shape[1:]) for n in names]
        self.outputs = _outputs(cfg, store)

    def features(self) -> int:
        """Values per sample of the input, flattened and joined (pipeline.data.loader)."""
        return sum(math.prod(s) for s in self.x)

    def channels(self) -> int | None:
        """C of one (C, H, W) input, 1 of one (H, W) field (models.base.with_channel_axis)."""
        if len(self.x) != 1 or len(self.x[0]) not in (2, 3):
            return None
        return self.x[0][0] if len(self.x[0]) == 3 else 1

    def layers(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self.x)


def _outputs(cfg: Config, store: Store) -> int | None:
    """Classes for ce/hinge (the store's class table, else the largest stored label + 1), one logit
    for bce, the target's values per sample for mse."""
    loss, y = getattr(cfg.model.params, "loss", None), cfg.data.inputs.get("y")
    if not isinstance(y, str):
        return None
    if loss == "bce":
        return 1
    if loss in ("ce", "hinge"):
        if store.meta.classes and y == "label":
            return len(store.meta.classes)
        top = store.meta.stats.get("train", {}).get(y, {}).get("max")
        return int(top) + 1 if isinstance(top, (int, float)) else None
    return math.prod(store.variable("train", y).shape[1:]) or 1


# family -> {shape key: how the store gives it}
RULES: dict[str, dict[str, Callable[[Shapes], Any]]] = {
    "mlp": {"in_features": Shapes.features, "out_features": lambda s: s.outputs},
    "cnn": {"in_channels": Shapes.channels, "n_outputs": lambda s: s.outputs},
    "resnet": {"in_channels": Shapes.channels, "n_outputs": lambda s: s.outputs},
    "tower": {"layer_shapes": Shapes.layers, "n_outputs": lambda s: s.outputs},
}


def fill_from_store(cfg: Config, store: Store) -> dict[str, Any]:
    """Set the family's shape keys the config leaves unset from `store`, in place; returns what it
    set ({key: value}), for the run to say."""
    rules = {k: rule for k, rule in RULES.get(cfg.model.name, {}).items()
             if k not in cfg.model.given}
    if not rules or not cfg.data.inputs.get("x"):
        return {}
    shapes = Shapes(cfg, store)
    filled = {}
    for key, rule in rules.items():
        value = rule(shapes)
        if value is not None:
            setattr(cfg.model.params, key, value)
            filled[key] = value
    return filled
