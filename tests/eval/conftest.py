"""Real runs to evaluate and report on: the small Ising store, trained through the real CLI.

(`from conftest import ...` would find this file itself, so the root conftest's pieces come in as
fixtures: `small_store` gives the store and the overrides that made it.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ONE_PROCESS = ["train.dist.backend=none", "train.dist.nproc=1", "train.batch_size=32",
               "train.logger.log_every=4", "train.logger.images_every=8", "train.lr=0.003"]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `hpcforge` command in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "hpcforge", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "WANDB_SILENT": "true"})


@pytest.fixture(scope="session")
def cli():
    return run_cli


def train(small_store, out: Path, *extra: str) -> Path:
    """Train on the small store into `out`; return the checkpoint."""
    store, overrides = small_store
    same_data = [o for o in overrides if not o.startswith("output_dir=")]
    r = run_cli("train", f"output_dir={out}", *same_data, f"data.path={store}", *ONE_PROCESS, *extra)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out / "train" / "checkpoints" / "final.pt"


def evaluate(ckpt: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    r = run_cli("evaluate", str(ckpt), *extra)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r, json.loads(ckpt.with_name(ckpt.stem + ".eval.json").read_text())


@pytest.fixture(scope="session")
def vae_run(small_store, tmp_path_factory):
    """A VAE with an offline W&B run, then `hpcforge evaluate` on it: (checkpoint, CLI result, JSON)."""
    ckpt = train(small_store, tmp_path_factory.mktemp("vae"), "train.epochs=2")
    return (ckpt, *evaluate(ckpt))


@pytest.fixture(scope="session")
def ae_run(small_store, tmp_path_factory):
    """A conv autoencoder logged only to metrics.jsonl (W&B disabled), evaluated."""
    ckpt = train(small_store, tmp_path_factory.mktemp("ae"), "model=autoencoder",
                 "model.image_size=16", "train.epochs=3", "train.logger.mode=disabled")
    return (ckpt, *evaluate(ckpt))


@pytest.fixture(scope="session")
def classifier_run(small_store, tmp_path_factory) -> Path:
    """A small CNN phase classifier (ordered / disordered Ising lattices) with an offline W&B
    run, trained ~15 s on the small store; its final checkpoint. For explain and attack."""
    store, overrides = small_store
    data = [o for o in overrides if o.startswith("data.")]   # the cnn has no model.image_size
    out = tmp_path_factory.mktemp("cnn")
    r = run_cli("train", f"output_dir={out}", *data, f"data.path={store}", *ONE_PROCESS,
                "model=cnn", "model.channels=[8,16]", "model.n_outputs=2", "train.epochs=3",
                "train.lr=0.01")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out / "train" / "checkpoints" / "final.pt"


@pytest.fixture(scope="session")
def generative_checkpoint(small_store, tmp_path_factory) -> Path:
    """A VAE checkpoint in the trainer's format (weights of the untrained net: explain and attack
    refuse it before reading any weight)."""
    from pipeline.config import load_config
    from pipeline.core.checkpoint import save_atomic
    from pipeline.train.trainer import build_model
    store, overrides = small_store
    cfg = load_config("demo", [*overrides, f"data.path={store}"])
    path = tmp_path_factory.mktemp("vae") / "final.pt"
    return save_atomic({"model": build_model(cfg).state_dict(), "config": cfg.to_dict(), "step": 0}, path)
