"""`hpcforge explain CHECKPOINT`: attribution maps of a supervised model on test samples, by Captum.

Methods (Captum, the maintained PyTorch library for them):
  saliency              |d score / d x| (Simonyan et al. 2014, arXiv:1312.6034);
  guided_backprop       gradients with negative signals stopped at every nn.ReLU
                        (Springenberg et al. 2015, arXiv:1412.6806);
  integrated_gradients  path integral of gradients from a zero baseline, 32 steps
                        (Sundararajan et al. 2017, arXiv:1703.01365);
  gradient_shap         expected gradients with training samples as the baseline distribution
                        (Lundberg & Lee 2017, arXiv:1705.07874).
The score is the predicted class's logit for a classifier (its mean over positions for a dense
output; the one logit of a bce model) and the mean output for a regressor (a field's spatial mean).
Baselines: integrated gradients starts from zeros in the model's input space (for minmax-normalised
Ising spins: the all-down lattice); gradient SHAP draws from GRADIENT_SHAP_BASELINES training
samples.

Per method the JSON holds the mean |attribution| per input channel and, for Ising spins, the share
of the attribution mass on domain-wall sites (a site with a neighbour of the other sign, periodic
lattice) next to the share of sites that are walls: a ratio above 1 says the classifier looks at
the walls more than at the bulk. Each method's figure draws |attribution| over the input.

A model with attention (models/transformer.py: `attention_maps`) also gets its attention weights
(issue #16): per layer one figure, one panel per chosen head (`heads`, default all), the
softmax(QK^T) averaged over the n windows (query step against key step: which past frames of a
Lorenz-96 window a forecast reads), and per head the mean lag |query - key| the weights put on.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.analysis.probe import Probed, Results, as_2d, open_probed, scored, write_results
from pipeline.core import figures
from pipeline.core.errors import UserError
from pipeline.sources import observables

METHODS = ("saliency", "guided_backprop", "integrated_gradients", "gradient_shap")
IG_STEPS = 32                  # integrated-gradients path steps (Captum's default is 50)
GRADIENT_SHAP_BASELINES = 16   # training samples drawn as the gradient-SHAP background
GRADIENT_SHAP_SAMPLES = 16     # (baseline, path point) draws per input


def attributions(p: Probed, x: torch.Tensor, methods: list[str]) -> dict[str, torch.Tensor]:
    """method -> attribution (same shape as x) of each sample's score (module docstring)."""
    from captum.attr import GradientShap, GuidedBackprop, IntegratedGradients, Saliency
    net = scored(p.model, p.classifier).eval()
    target = None
    if p.classifier:
        with torch.no_grad():
            logits = net(x)
        target = logits.argmax(1) if logits.shape[1] > 1 else torch.zeros(len(x), dtype=torch.long)
    make = {
        "saliency": lambda: Saliency(net).attribute(x, target=target, abs=False),
        "guided_backprop": lambda: GuidedBackprop(net).attribute(x, target=target),
        "integrated_gradients": lambda: IntegratedGradients(net).attribute(
            x, baselines=torch.zeros_like(x), target=target, n_steps=IG_STEPS),
        "gradient_shap": lambda: GradientShap(net).attribute(
            x, baselines=p.samples(GRADIENT_SHAP_BASELINES, "train")["x"],
            n_samples=GRADIENT_SHAP_SAMPLES, target=target),
    }
    out = {}
    x.requires_grad_()
    numpy_state = np.random.get_state()
    for name in tqdm(methods, desc="explain", dynamic_ncols=True, mininterval=1.0):
        # gradient SHAP draws baselines with torch and path points with NumPy's global generator:
        # both seeded, so the same checkpoint gives the same maps
        torch.manual_seed(p.cfg.train.seed)
        np.random.seed(p.cfg.train.seed)
        with warnings.catch_warnings():  # Captum says it hooks ReLUs (guided backprop): expected
            warnings.filterwarnings("ignore", "Setting backward hooks on ReLU", UserWarning)
            out[name] = make[name]().detach()
    np.random.set_state(numpy_state)
    x.requires_grad_(False)
    return out


def domain_walls(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) spins in any monotone normalisation -> bool mask of sites with at least one of
    their 4 neighbours (periodic lattice, as the ising2d source simulates) not equal to them."""
    s = x[:, 0]
    diff = [torch.roll(s, shift, dim) != s for shift in (1, -1) for dim in (-1, -2)]
    return torch.stack(diff).any(0)[:, None]


def summary(p: Probed, x: torch.Tensor, attr: torch.Tensor) -> dict[str, Any]:
    """Mean |attribution| per input channel (axis 1 of a (B, C, H, W) field: e.g. a calorimeter's
    layers; the last axis of a (B, T, D) sequence or (B, D) vector); for Ising spins the
    domain-wall shares."""
    mag = attr.abs()
    axis = 1 if mag.dim() == 4 else mag.dim() - 1
    per_channel = mag.mean(dim=[d for d in range(mag.dim()) if d != axis])
    out: dict[str, Any] = {"mean_abs_per_channel": per_channel.tolist()}
    obs = observables(p.store.meta.source)
    if obs is not None and obs.binary and x.dim() == 4 and x.shape[1] == 1:  # spins, as in ising2d
        walls = domain_walls(x)
        mass = (mag * walls).flatten(1).sum(1) / mag.flatten(1).sum(1).clamp_min(1e-30)
        out["wall_mass_fraction"] = float(mass.mean())          # mean over samples
        out["wall_site_fraction"] = float(walls.float().mean())
        out["wall_ratio"] = out["wall_mass_fraction"] / max(out["wall_site_fraction"], 1e-12)
    return out


def overlay(x: torch.Tensor, attr: torch.Tensor, title: str, labels: list[str]) -> Any:
    """One panel per sample: the input in grey, |attribution| over it in a translucent heat map."""
    fig, axes = figures.new_figure(len(x), 2.4, 2.4, ncol=4)
    for ax, xi, ai, label in zip(axes, x, attr.abs(), labels):
        ax.imshow(as_2d(xi), cmap="gray", interpolation="nearest", aspect="auto")
        heat = as_2d(ai)
        ax.imshow(heat, cmap="hot", alpha=0.6, interpolation="nearest", aspect="auto",
                  vmin=0, vmax=max(float(heat.max()), 1e-12))
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return fig


def check_heads(p: Probed, heads: list[int] | None) -> list[int] | None:
    """The chosen heads, or None for a model without attention; a head out of range (or heads asked
    of a model without attention) is the user's error."""
    if not hasattr(p.model, "attention_maps"):
        if heads is not None:
            raise UserError(f"--heads {','.join(map(str, heads))}: model {p.cfg.model.name!r} has "
                            f"no attention; drop --heads (it is for transformer checkpoints)")
        return None
    n_heads = p.model.cfg.n_heads
    bad = [h for h in heads or [] if not 0 <= h < n_heads]
    if bad:
        raise UserError(f"--heads {','.join(map(str, heads))}: head(s) {bad} out of range; the "
                        f"model has heads 0..{n_heads - 1}")
    return list(range(n_heads)) if heads is None else heads


def attention(p: Probed, x: torch.Tensor, heads: list[int], res: Results) -> None:
    """Per layer: a figure of the chosen heads' mean attention over x and each head's mean lag."""
    t = x.shape[1]
    lag = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).abs().float()   # (T, T)
    for layer, w in p.model.attention_maps(x).items():        # (B, heads, T, T)
        mean = w.mean(0)
        fig, axes = figures.new_figure(len(heads), 2.6, 2.4, ncol=4)
        for ax, h in zip(axes, heads):
            res.metrics[f"attention/layer{layer}/head{h}/mean_lag"] = float((mean[h] * lag).sum(-1).mean())
            ax.imshow(mean[h].numpy(), cmap="viridis", interpolation="nearest", vmin=0)
            ax.set_title(f"layer {layer} head {h}", fontsize=8)
            ax.set_xlabel("key step", fontsize=7)
            ax.set_ylabel("query step", fontsize=7)
        fig.suptitle(f"attention weights, mean over {len(x)} windows", fontsize=9)
        res.figures[f"attention_layer{layer}"] = fig


def explain(checkpoint: str | Path, overrides: list[str] | None = None, n: int = 8,
            methods: list[str] | None = None, heads: list[int] | None = None) -> dict[str, Any]:
    """Attribute n evaluation-split samples; write `<checkpoint stem>.explain.json`, one figure
    per method in `<stem>.explain/`, and log both to the checkpoint's W&B run."""
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"--methods {','.join(methods)}: unknown {', '.join(unknown) or '(none given)'}; "
                        f"expected a comma-separated subset of {','.join(METHODS)}")
    if n < 1:
        raise UserError(f"--n {n}: expected at least 1 sample")
    p = open_probed(checkpoint, overrides or [], "explain")
    heads = check_heads(p, heads)
    x = p.samples(n)["x"]
    maps = attributions(p, x, methods)
    with torch.no_grad():
        score = scored(p.model, p.classifier)(x)
    labels = ([f"class {int(c)}" for c in score.argmax(1)] if p.classifier and score.shape[1] > 1
              else [f"score {float(s):.3g}" for s in score.reshape(len(x), -1)[:, 0]])
    res, per_method = Results(), {}
    for name, attr in maps.items():
        per_method[name] = summary(p, x, attr)
        res.metrics.update({f"{name}/{k}": v for k, v in per_method[name].items()
                            if isinstance(v, float)})
        res.figures[name] = overlay(x, attr, f"{name}: |attribution| over the input", labels)
    target = ("the predicted class's logit (mean over positions for a dense output)" if p.classifier
              else "the mean of the model's output (a field's spatial mean)")
    extra = {"samples": len(x), "attributed": target, "methods": per_method,
             "baselines": {"integrated_gradients": "zeros in the model's input space",
                           "gradient_shap": f"{GRADIENT_SHAP_BASELINES} training samples"}}
    if heads is not None:
        attention(p, x, heads, res)
        extra["attention_heads"] = heads
    if "guided_backprop" in maps and p.cfg.model.name == "resnet":
        res.notes.append("guided backprop stops negative gradients only at nn.ReLU modules; the "
                         "residual blocks' functional relu is passed through as plain gradient")
    return write_results(p, "explain", res, extra)
