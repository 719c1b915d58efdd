"""`hpcforge attack` on a real trained CNN phase classifier: the clean point against an independent
computation, PGD at least as strong as FGSM, the eps-ball of each attack, and the files it writes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.analysis.attack import parse_eps
from pipeline.analysis.probe import open_probed
from pipeline.config import Config, build
from pipeline.core.checkpoint import load
from pipeline.core.errors import UserError
from pipeline.data.store import normalization, open_store
from pipeline.train.adversarial import fgsm, pgd
from pipeline.train.trainer import build_model

pytestmark = pytest.mark.slow  # trains the shared classifier (~20 s) the first time

EPS = [0.0, 0.05, 0.2]   # 0.2 of a spin flip (minmax spins: 0 = down, 1 = up) per site


@pytest.fixture(scope="module")
def attacked(classifier_run, cli):
    # W&B logging is tested by test_explain; here off (a key=value override), which saves ~8 s
    r = cli("attack", str(classifier_run), "--eps", ",".join(map(str, EPS)), "--steps", "5",
            "train.logger.mode=disabled")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r, json.loads(classifier_run.with_name("final.attack.json").read_text())


def clean_accuracy(ckpt: Path, split: str) -> tuple[float, int]:
    """Accuracy on the whole split, straight from the store: read, normalise, argmax."""
    state = load(ckpt)
    cfg = build(Config, state["config"], "")
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    store = open_store(cfg.data.path)
    spins = np.asarray(store.variable(split, "spins")[:], np.float64)
    shift, scale = normalization(store.stats("train", "spins"), cfg.data.normalize)
    x = torch.as_tensor(((spins - shift[0]) / scale[0]).astype(np.float32))
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).numpy()
    return float(np.mean(pred == store.variable(split, "phase")[:])), len(x)


def test_clean_point_equals_accuracy_computed_from_the_store(attacked, classifier_run):
    _, result = attacked
    acc, n = clean_accuracy(classifier_run, result["split"])
    assert result["samples"] == n and result["eps"] == EPS and result["metric"] == "accuracy"
    assert result["curves"]["fgsm"][0] == pytest.approx(acc, abs=1e-6)
    assert result["curves"]["pgd"][0] == pytest.approx(acc, abs=1e-6)
    assert acc > 0.8                                    # the classifier learned the phases


def test_pgd_is_at_least_as_strong_as_fgsm_and_large_eps_breaks_the_model(attacked):
    _, result = attacked
    fgsm_acc, pgd_acc, n = result["curves"]["fgsm"], result["curves"]["pgd"], result["samples"]
    assert len(fgsm_acc) == len(pgd_acc) == len(EPS)
    for e, f, p in zip(EPS[1:], fgsm_acc[1:], pgd_acc[1:]):
        assert p <= f + 1 / n, (e, f, p)                # within one sample
    assert pgd_acc[-1] < fgsm_acc[0] - 0.3              # clearly below clean at eps = 0.2
    for e, f in zip(EPS, fgsm_acc):
        assert result["metrics"][f"fgsm/accuracy@eps={e:g}"] == f


def test_attack_writes_the_curve_and_example_figures(attacked, classifier_run):
    r, result = attacked
    assert "normalised" in result["eps_units"] and result["pgd"]["steps"] == 5
    for name in ("curves", "examples"):
        png = Path(result["figures"][name])
        assert png.parent == classifier_run.with_name("final.attack")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(classifier_run.with_name("final.attack.json")) in r.stdout
    assert result["wandb_run"] is None and "no W&B run to log to" in " ".join(result["notes"])


def test_perturbations_stay_in_the_eps_ball(classifier_run):
    """FGSM moves every site by exactly eps (where the gradient is non-zero); PGD stays within eps
    and, from its random start, differs from FGSM."""
    p = open_probed(classifier_run, [], "attack")
    batch = p.samples(16)
    x, eps = batch["x"], 0.05
    step = fgsm(p.model, batch, eps) - x
    assert torch.allclose(step.abs()[step != 0], torch.tensor(eps)) and (step != 0).float().mean() > 0.5
    adv = pgd(p.model, batch, eps, steps=3, generator=torch.Generator().manual_seed(0))
    assert (adv - x).abs().max() <= eps + 1e-6 and not torch.equal(adv - x, step)


@pytest.mark.parametrize("text", ["", "0,x", "-0.1", "nan"])
def test_bad_eps_is_refused_naming_the_units(text):
    with pytest.raises(UserError, match="normalised input units"):
        parse_eps(text)
