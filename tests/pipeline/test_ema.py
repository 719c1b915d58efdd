"""The generator weight average (train.ema, pipeline/train/ema.py, issue #15): the closed-form average,
exact resume with it, evaluation sampling with it, and the same average on every rank."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from helpers import hpcforge

from pipeline.analysis.evaluate import evaluate
from pipeline.config import load_config
from pipeline.core.checkpoint import load
from pipeline.runtime.dist import init_distributed
from pipeline.train.assembly import build
from pipeline.train.ema import load_weights
from pipeline.train.loop import batch_groups, fit, train_step
from pipeline.train.run import Run

DCGAN = ("model=dcgan", "model.channels=[16,8]", "model.latent_dim=8")


def _run(store, out, *extra: str) -> Run:
    path, overrides = store
    cfg = load_config("demo", overrides[1:] + [f"output_dir={out}", f"data.path={path}",
                                               "train.dist.backend=none", "train.batch_size=32",
                                               "train.logger.mode=disabled", *DCGAN, *extra])
    return build(cfg, init_distributed(cfg.train.dist))


def _generator(run: Run) -> dict[str, torch.Tensor]:
    return {f"generator.{k}": v.detach().clone() for k, v in run.model.generator.named_parameters()}


def test_average_is_the_closed_form_of_the_generator_steps(small_store, tmp_path):
    """decay 0.5, start 1: after updates w1, w2, w3 the average is w1, then (w1 + w2) / 2, then
    w1 / 4 + w2 / 4 + w3 / 2; only the generator is averaged, the discriminator is not."""
    run = _run(small_store, tmp_path, "train.ema.decay=0.5", "train.ema.start=1")
    seen, groups = [], batch_groups(run)
    for _ in range(3):
        train_step(run, next(groups))
        seen.append(_generator(run))
    w1, w2, w3 = seen
    ema = run.ema.state_dict()["weights"]
    assert set(ema) == set(w3) and run.ema.updates == 3
    for k in ema:
        torch.testing.assert_close(ema[k], w1[k] / 4 + w2[k] / 4 + w3[k] / 2, rtol=1e-6, atol=1e-7)
    assert max((w3[k] - ema[k]).abs().max().item() for k in ema) > 1e-4  # not the raw weights


def test_vae_averages_its_whole_model(small_store, tmp_path):
    """No generator: encoder and decoder (one optimizer) are both averaged."""
    path, overrides = small_store
    cfg = load_config("demo", overrides[1:] + [f"output_dir={tmp_path}", f"data.path={path}",
                                               "train.dist.backend=none", "train.ema.decay=0.9",
                                               "train.logger.mode=disabled"])
    run = build(cfg, init_distributed(cfg.train.dist))
    assert set(run.ema.names) == {k for k, _ in run.model.named_parameters()}
    assert any(n.startswith("encoder.") for n in run.ema.names)


@pytest.fixture(scope="module")
def ema_runs(small_store, tmp_path_factory):
    """4 steps in one go, and 2 steps then resumed to 4, both with the average (decay 0.5)."""
    out = tmp_path_factory.mktemp("ema")
    keys = ("train.ema.decay=0.5", "train.checkpoint.every_steps=2")
    fit(_run(small_store, out / "whole", "train.max_steps=4", *keys))
    fit(_run(small_store, out / "split", "train.max_steps=2", *keys))
    resumed = _run(small_store, out / "split", "train.max_steps=4", "train.resume=auto", *keys)
    assert resumed.progress.step == 2 and resumed.ema.updates == 2
    fit(resumed)
    return out


def test_resume_restores_the_average_exactly(ema_runs):
    whole, split = (load(ema_runs / d / "train/checkpoints/final.pt") for d in ("whole", "split"))
    assert whole["ema"]["updates"] == split["ema"]["updates"] == 4
    for part in ("model", "ema"):
        a, b = (whole[part], split[part]) if part == "model" else (whole[part]["weights"],
                                                                     split[part]["weights"])
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_a_checkpoint_without_average_resumes_into_one_from_its_weights(ema_runs, small_store,
                                                                        tmp_path, capsys):
    """An older checkpoint (or one trained with decay 0) starts the average at its weights."""
    ckpt = load(ema_runs / "whole/train/checkpoints/final.pt")
    ckpt.pop("ema")
    folder = tmp_path / "train" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(ckpt, folder / "step-00000004.pt")
    run = _run(small_store, tmp_path, "train.max_steps=5", "train.resume=auto",
               "train.ema.decay=0.5")
    assert "holds no weight average" in capsys.readouterr().out
    ema = run.ema.state_dict()["weights"]
    assert all(torch.equal(ema[k], ckpt["model"][k]) for k in ema)


@pytest.mark.slow  # three full evaluations (observables, Fréchet, classifier test, latent paths)
def test_evaluate_samples_with_the_average_unless_asked_for_raw(ema_runs, tmp_path):
    """The averaged weights' scores equal those of a checkpoint holding them as its model (a
    manual load), and differ from the raw weights'; old checkpoints load their raw weights."""
    final = load(ema_runs / "whole/train/checkpoints/final.pt")
    manual = {**final, "model": {**final["model"], **final["ema"]["weights"]}, "ema": None}
    paths = {}
    for name, state in (("ema", final), ("manual", manual)):
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(state, paths[name])
    shutil.copy(paths["ema"], tmp_path / "raw.pt")
    got = {name: evaluate(p) for name, p in paths.items()}
    got["raw"] = evaluate(tmp_path / "raw.pt", ["train.ema.weights=raw"])
    assert [got[k]["weights"] for k in ("ema", "manual", "raw")] == ["ema", "raw", "raw"]
    # the test loss (D on real and generated lattices) is a function of G's weights; W1 of
    # energies is not always (after 4 steps G can emit saturated, fully ordered lattices with
    # either weights, whose energies are all -2)
    loss = {k: got[k]["metrics"]["loss"] for k in got}
    assert loss["ema"] == loss["manual"] != loss["raw"]
    assert got["ema"]["metrics"]["w1/energy"] == got["manual"]["metrics"]["w1/energy"]


def test_load_weights_overlays_only_the_averaged_network(ema_runs):
    from pipeline.analysis.shared import checkpoint_config
    from pipeline.train.trainer import build_model
    ckpt = load(ema_runs / "whole/train/checkpoints/final.pt")
    model = build_model(checkpoint_config(ckpt, []))
    assert load_weights(model, ckpt, "ema") == "ema"
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["ema"]["weights"].items())
    assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items()
               if not k.startswith("generator."))
    assert load_weights(model, ckpt, "raw") == "raw"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())


@pytest.mark.mpi
@pytest.mark.slow
def test_two_horovod_ranks_hold_the_same_average(small_store, tmp_path):
    path, overrides = small_store
    r = hpcforge("train", "--nproc", "2", *overrides[1:], f"output_dir={tmp_path}",
                 f"data.path={path}", *DCGAN, "train.batch_size=16", "train.max_steps=4",
                 "train.ema.decay=0.5", "train.logger.mode=disabled", timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    a, b = summary["ema_sha256_per_rank"]
    ckpt = load(tmp_path / "train/checkpoints/final.pt")
    assert a == b and ckpt["ema"]["updates"] == 4
    assert a == _digest(ckpt["ema"]["weights"]) != summary["weights_sha256_per_rank"][0]


def _digest(weights: dict[str, torch.Tensor]) -> str:
    """pipeline.train.ema.digest of a checkpoint's saved average."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().numpy().tobytes())
    return h.hexdigest()
