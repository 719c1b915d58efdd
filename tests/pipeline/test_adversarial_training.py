"""Adversarial training (issue #16, train.adversarial): the batch a step trains on, the examples'
eps-ball, what making them leaves alone, the refusal for generative models, and 2 DDP ranks."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import hpcforge

from pipeline.config import load_config
from pipeline.core.errors import UserError
from pipeline.runtime.dist import init_distributed
from pipeline.train.adversarial import adversarial_batch
from pipeline.train.assembly import build
from pipeline.train.loop import batch_groups, train_step
from pipeline.train.run import Run

TINY = ["model.channels=[4,8]", "train.batch_size=32", "train.logger.mode=disabled",
        "train.epochs=1"]
EPS = 0.1


def _build(store, out, *extra: str, experiment: str = "cnn_ising2d") -> Run:
    cfg = load_config(experiment, [f"output_dir={out}", f"data.path={store[0]}",
                                   "train.dist.backend=none", *TINY, *extra])
    return build(cfg, init_distributed(cfg.train.dist))


@pytest.fixture(scope="module")
def batch(small_store, tmp_path_factory):
    run = _build(small_store, tmp_path_factory.mktemp("adv"))
    return run, next(batch_groups(run))[0]


def test_fgsm_step_trains_on_a_batch_whose_first_half_moved_by_eps(small_store, tmp_path):
    run = _build(small_store, tmp_path, f"train.adversarial.eps={EPS}", "train.max_steps=1")
    group = next(batch_groups(run))
    clean = group[0]["x"].clone()
    seen = []
    model_losses = run.model.losses
    run.model.losses = lambda b, ph: seen.append(b["x"].detach().clone()) or model_losses(b, ph)
    train_step(run, group)
    trained_on = seen[-1]  # the examples' own forwards come first, the step's last
    k = len(clean) // 2    # train.adversarial.fraction 0.5
    delta = trained_on - clean
    assert torch.equal(trained_on[k:], clean[k:])
    # FGSM: +-eps where the loss has a gradient (max pooling passes it to one site in four)
    moved = delta[:k].abs().reshape(k, -1)
    assert torch.allclose(moved[moved > 0], torch.tensor(EPS)) and (moved > 0).any(1).all()
    assert len(seen) == 2 and len(seen[0]) == k  # one gradient pass for FGSM, on the k only


def test_pgd_examples_stay_in_the_ball_raise_the_loss_and_touch_no_grad_or_statistics(batch):
    run, b = batch
    model = run.model
    stats = [t.clone() for t in model.buffers()]
    torch.manual_seed(0)
    adv = adversarial_batch(model, b, EPS, "pgd", steps=3, fraction=1.0)
    delta = adv["x"] - b["x"]
    assert delta.abs().max() <= EPS + 1e-6 and delta.abs().max() > EPS / 2
    assert torch.equal(adv["y"], b["y"])
    assert all(p.grad is None for p in model.parameters())       # x's gradient only
    assert all(torch.equal(a, s) for a, s in zip(model.buffers(), stats))  # eval mode
    assert model.training                                         # back in training mode
    with torch.no_grad():
        model.eval()
        clean_loss = model.losses(b, "model")["loss"]
        adv_loss = model.losses(adv, "model")["loss"]
        model.train()
    assert adv_loss > clean_loss


def test_a_generative_model_is_refused_in_one_line(small_store, tmp_path):
    with pytest.raises(UserError, match=r"^train.adversarial.eps=0.1: adversarial training needs a "
                                        r"supervised model .* but vae is generative; set "
                                        r"train.adversarial.eps=0$"):
        _build(small_store, tmp_path, "train.adversarial.eps=0.1", "model.image_size=16",
               experiment="vae_ising2d")


@pytest.mark.mpi
@pytest.mark.slow
def test_two_ddp_ranks_train_adversarially_to_identical_weights(small_store, tmp_path):
    r = hpcforge("train", "-e", "cnn_ising2d", "--nproc", "2", f"output_dir={tmp_path}",
                 f"data.path={small_store[0]}", *TINY, "train.dist.backend=ddp",
                 f"train.adversarial.eps={EPS}", "train.adversarial.method=pgd",
                 "train.adversarial.steps=2", "train.max_steps=4", timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 4
    digests = summary["weights_sha256_per_rank"]
    assert digests[0] == digests[1]
