"""Config composition, overrides, and one-line errors for each kind of bad input."""
from __future__ import annotations

import pytest
from helpers import hpcforge

from models.vae import VAEConfig
from pipeline.config import CONFIG_DIR, Config, ConfigError, available, build, load_config
from pipeline.sources.ising2d import Params as IsingParams


def test_demo_composes_groups_and_experiment_overrides():
    cfg = load_config("demo")
    assert isinstance(cfg.data.params, IsingParams) and isinstance(cfg.model.params, VAEConfig)
    assert cfg.train.dist.nproc == 2          # set by experiment/demo.yaml over train/default.yaml
    assert cfg.train.epochs == 10
    assert cfg.train.lr == 0.001              # untouched group value survives
    assert cfg.output_dir == "outputs/demo"
    assert cfg.data.path == "outputs/demo/data/ising2d.zarr"


def test_command_line_overrides_keys_and_types():
    cfg = load_config("demo", ["train.epochs=7", "model.channels=[8,16]", "train.lr=1",
                               "data.params.t_max=3.5", "train.logger.tags=[a,b]"])
    assert cfg.train.epochs == 7
    assert cfg.model.params.channels == (8, 16)          # tuple field gets a tuple
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.params.t_max == 3.5
    assert cfg.train.logger.tags == ["a", "b"]
    assert load_config("demo", ["train.lr=3e-4"]).train.lr == 3e-4   # YAML 1.1 reads 3e-4 as text


def test_resolved_config_round_trips():
    cfg = load_config("demo", ["model.latent_dim=3"])
    again = build(Config, cfg.to_dict(), "")
    assert again == cfg


@pytest.mark.parametrize("override, message", [
    (["train.epoch=3"], "unknown key train.epoch; valid keys under train: accumulate, adversarial, "
                        "batch_size, checkpoint, compile, deterministic, dist, early_stopping, ema, epochs"),
    (["train.epochs=abc"], "train.epochs: expected int, got 'abc' (str)"),
    (["train.epochs=true"], "train.epochs: expected int, got True (bool)"),
    (["model.latnt=3"], "unknown key model.latnt; valid keys under model: beta, channels"),
    (["data.params.lattce=3"], "unknown key data.params.lattce; valid keys under data.params: algorithm, burn_in"),
    (["train.dist.backend=mpi"], "train.dist.backend: expected one of 'horovod', 'ddp', 'none', got 'mpi'"),
    (["model=nope"], "model=nope: no file configs/model/nope.yaml; available: "),
    (["experiment=nope"], "experiment=nope: no file configs/experiment/nope.yaml"),
    (["data.source=nope"], "data.source: unknown source 'nope'; valid: "),
    (["epochs"], "override 'epochs': expected key=value"),
])
def test_bad_input_names_key_expected_and_choices(override, message):
    with pytest.raises(ConfigError) as e:
        load_config("demo", override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_required_value_is_named():
    from dataclasses import dataclass

    @dataclass
    class Needs:
        path: str

    with pytest.raises(ConfigError, match=r"missing required value data\.path \(str\)"):
        build(Needs, {}, "data")


def test_every_yaml_under_configs_composes_and_builds():
    from models import MODELS
    from pipeline.train.trainer import build_model

    for exp in available("experiment"):
        cfg = load_config(exp)
        build_model(cfg)
    for group in ("data", "model", "train", "cluster"):
        for name in available(group):
            cfg = load_config("demo", [f"{group}={name}"])
            if group == "model":
                assert cfg.model.name in MODELS
                build_model(cfg)
    assert (CONFIG_DIR / "experiment" / "demo.yaml").is_file()
    demo = load_config("demo_generator")   # `make demo`: a generator that reaches the floor
    assert (demo.model.name, demo.model.params.cond_temperature, demo.model.params.refine_sweeps,
            demo.train.dist.nproc, demo.output_dir) == ("dcgan", True, 40, 2, "outputs/demo")


def test_cli_reports_bad_config_in_one_line_without_traceback():
    r = hpcforge("train", "train.epoch=3")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("hpcforge: error: unknown key train.epoch; valid keys under train: "
                               "accumulate, adversarial, batch_size, checkpoint,")
    assert "Traceback" not in r.stderr + r.stdout


def test_an_unknown_data_inputs_key_is_refused_naming_the_valid_ones():
    """Issue 24: `x1: layer_1` was loaded and silently ignored."""
    from helpers import hpcforge
    r = hpcforge("config", "data.inputs={x: spins, x1: energy}")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("hpcforge: error: data.inputs.x1=energy: unknown batch key 'x1'; valid "
                        "keys: x (the model's input), y (its target), cond (a conditioning value); "
                        "e.g. data.inputs={x: energy}\n")
