"""Latent-space exploration (pipeline/analysis/latent.py, issue #16): the paths' geometry and metrics, the
evaluate JSON, figures and W&B run of a real trained VAE, and GANs (plain and conditional at a
fixed condition) explored on the real small Ising store."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from wandb_records import history

from pipeline.analysis import latent
from pipeline.analysis.evaluate import Evaluation
from pipeline.analysis.shared import checkpoint_config, eval_split, load_checkpoint, normalized
from pipeline.config import load_config
from pipeline.data.store import open_store
from pipeline.train.trainer import build_model

FIGURES = ("latent_interpolation", "latent_path_observables", "latent_traversals")


def test_slerp_keeps_the_norm_of_equal_norm_ends_where_a_line_cuts_inside():
    z0, z1 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    t = torch.linspace(0, 1, 5)
    s, line = latent.slerp(z0, z1, t), latent.linear(z0, z1, t)
    assert torch.allclose(s[0], z0) and torch.allclose(s[-1], z1, atol=1e-6)
    assert torch.allclose(s.norm(dim=1), torch.full((5,), 3.0), atol=1e-5)
    assert line[2].norm() == pytest.approx(3 / math.sqrt(2), rel=1e-6)
    assert torch.allclose(s[2], torch.tensor([3.0, 3.0]) / math.sqrt(2), atol=1e-5)
    assert torch.allclose(latent.slerp(z0, 2 * z0, t), latent.linear(z0, 2 * z0, t))  # parallel


def test_path_metrics_tell_a_monotone_path_from_one_that_jumps_back_and_forth():
    smooth = latent.path_metrics(np.linspace(0.1, 0.9, 9))
    assert smooth["monotonicity"] == 1.0 and smooth["max_jump"] == pytest.approx(0.1)
    assert (smooth["start"], smooth["end"]) == (pytest.approx(0.1), pytest.approx(0.9))
    zigzag = latent.path_metrics(np.array([0.1, 0.9, 0.1, 0.9, 0.2]))
    assert zigzag["monotonicity"] == pytest.approx(1.6 / 3.1) and zigzag["max_jump"] == pytest.approx(0.8)


def test_evaluate_explores_the_vae_latent_space_into_json_figures_and_wandb(vae_run):
    ckpt, _, result = vae_run
    m = result["metrics"]
    for kind in ("slerp", "linear"):
        for obs in ("magnetization", "abs_magnetization", "energy"):
            assert 0 <= m[f"latent/{kind}/{obs}/monotonicity"] <= 1
            assert m[f"latent/{kind}/{obs}/max_jump"] >= 0
        # the ends are the lowest- and highest-|m| of the encoded test samples
        assert m[f"latent/{kind}/abs_magnetization/start"] < m[f"latent/{kind}/abs_magnetization/end"]
    for name in FIGURES:
        assert Path(result["figures"][name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = history(Path(result["wandb_run"]) / f"run-{result['wandb_run_id']}.wandb")
    logged = {k: v for row in rows for k, v in row.items()}
    assert all(logged[f"eval_figures/{name}/_type"] == "image-file" for name in FIGURES)
    assert logged["eval/latent/slerp/abs_magnetization/monotonicity"] == pytest.approx(
        m["latent/slerp/abs_magnetization/monotonicity"])


def test_vae_traverses_its_dimensions_of_largest_kl(vae_run):
    ckpt, _, result = vae_run
    kl = {int(k.rsplit("dim", 1)[1]): v for k, v in result["metrics"].items() if k.startswith("latent/kl/")}
    ckpt_data = load_checkpoint(ckpt)
    cfg = checkpoint_config(ckpt_data, [])
    model = build_model(cfg)
    model.load_state_dict(ckpt_data["model"])
    store = open_store(cfg.data.path)
    x = torch.as_tensor(normalized(store, eval_split(store), "spins", cfg.data.normalize, 64))
    full = model.eval().latent_kl(x, {})
    assert len(kl) == latent.TRAVERSED
    assert sorted(kl) == sorted(torch.argsort(full, descending=True)[:latent.TRAVERSED].tolist())
    assert all(v == pytest.approx(float(full[d]), rel=1e-4) for d, v in kl.items())


def explored(small_store, *model: str) -> Evaluation:
    """An untrained model of the given config explored on the small store (no training: the
    paths' plumbing, not their quality, is under test)."""
    store_path, overrides = small_store
    data = [o for o in overrides if o.startswith("data.")]   # the demo VAE's model keys dropped
    cfg = load_config("demo", [*data, f"data.path={store_path}", *model])
    torch.manual_seed(0)
    store = open_store(store_path)
    ev = Evaluation(cfg, build_model(cfg).eval(), store, eval_split(store))
    arrays = {"x": normalized(store, ev.split, "spins", cfg.data.normalize, 64)}
    if "cond" in cfg.data.inputs:
        arrays["cond"] = np.asarray(store.variable(ev.split, cfg.data.inputs["cond"])[:64])
    latent.explore(ev, arrays)
    return ev


@pytest.mark.parametrize("model", [["model=gan", "model.data_shape=[1,16,16]"],
                                   ["model=dcgan", "model.image_size=16", "model.channels=[16,8]"]])
def test_gans_interpolate_between_prior_draws_of_lowest_and_highest_abs_m(small_store, model):
    ev = explored(small_store, *model)
    assert set(FIGURES) <= set(ev.figures)
    assert ev.metrics["latent/slerp/abs_magnetization/start"] < ev.metrics["latent/slerp/abs_magnetization/end"]
    assert not any(k.startswith("latent/kl/") for k in ev.metrics)     # no encoder, first dims


def test_conditional_gan_is_explored_at_the_median_condition(small_store):
    ev = explored(small_store, "model=dcgan", "model.image_size=16", "model.channels=[16,8]",
                  "model.cond_temperature=true",
                  "data.inputs={x: spins, cond: temperature}")
    assert "latent/linear/energy/max_jump" in ev.metrics
    cond = np.asarray(ev.store.variable(ev.split, "temperature")[:64])
    batch = latent.fixed_condition(ev.model, {"cond": cond})
    assert batch["cond"].tolist() == [float(np.sort(cond)[32])]


def test_report_shows_the_latent_figures_of_the_evaluation(vae_run, tmp_path):
    from pipeline.analysis.report import report
    ckpt, _, _ = vae_run
    page = report([ckpt.parent.parent], tmp_path / "report.html").read_text()
    for name in FIGURES:
        assert f'alt="{name}"' in page


def test_aae_interpolates_between_encoded_test_samples_of_lowest_and_highest_abs_m(small_store):
    ev = explored(small_store, "model=aae", "model.data_shape=[1,16,16]")
    z = latent.Explorer(ev, {}).candidates()
    assert z.shape == (latent.CANDIDATES, ev.model.latent_dim)
    assert ev.metrics["latent/slerp/abs_magnetization/start"] < ev.metrics["latent/slerp/abs_magnetization/end"]
