"""The registry and the model config group: every family is registered, every configs/model/*.yaml
names a registered family, holds only fields of its config dataclass, and builds."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from models import MODELS
from models.base import Trainable


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"
FAMILIES = {"mlp", "cnn", "resnet", "dilated_cnn", "cnn1d", "unet", "fno", "rnn", "transformer",
            "autoencoder", "vae", "gan", "dcgan", "wgan_gp", "cgan", "cyclegan", "aae",
            "calo_wgan", "autoregressive", "tower"}
YAMLS = sorted(CONFIG_DIR.glob("*.yaml"))


def test_registry_holds_every_family_as_config_and_build():
    assert set(MODELS) == FAMILIES
    for name, (cls, build) in MODELS.items():
        assert dataclasses.is_dataclass(cls), name
        model = build(cls())  # every default config builds
        assert isinstance(model, Trainable), name
        assert model.optimizers() and set(model.schedule) == {s.name for s in model.optimizers()}


def test_every_family_has_a_yaml_named_after_it():
    assert {p.stem for p in YAMLS} == FAMILIES


@pytest.mark.parametrize("path", YAMLS, ids=[p.stem for p in YAMLS])
def test_model_yaml_keys_are_config_fields_and_it_builds(path):
    raw = yaml.safe_load(path.read_text())
    name = raw.pop("name")
    assert name == path.stem and name in MODELS
    cls, build = MODELS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(raw) <= fields, f"unknown keys {sorted(set(raw) - fields)}"
    cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    for key, value in raw.items():  # YAML types match the dataclass defaults' types
        default = getattr(cls(), key)
        assert isinstance(getattr(cfg, key), type(default)), f"{key}: {value!r} vs {default!r}"
    model = build(cfg)
    assert isinstance(model, Trainable)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
