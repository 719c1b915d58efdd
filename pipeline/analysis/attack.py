"""`hpcforge attack CHECKPOINT --eps 0,0.01,...`: adversarial robustness of a supervised model.

FGSM (Goodfellow et al. 2014, arXiv:1412.6572) and PGD (Madry et al. 2018, arXiv:1706.06083: L-inf
ball, uniform random start, `steps` signed-gradient steps of 2.5 eps / steps, projected back onto
the ball) against the model's own training loss (`model.losses`: cross-entropy for a classifier,
MSE for a regressor), on the evaluation split. Scored by accuracy (classifiers) or relative L2
error (regressors) for each eps.

eps is in the model's input units: the store's normalised inputs (data.normalize; for minmax
Ising spins, 1 is the gap between a down and an up spin). No clipping to a data range: physics
fields have no natural box such as an image's [0, 1].

The attacks themselves live in pipeline/train/adversarial.py, below this command: adversarial
training (`train.adversarial`, issue #16) makes its examples with the same two functions, and
training does not import the analysis commands (issue #27).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models.objectives import relative_l2
from pipeline.analysis.probe import Probed, Results, as_2d, open_probed, write_results
from pipeline.core import figures
from pipeline.core.errors import UserError
from pipeline.train.adversarial import ATTACKS, PGD_STEP, Batch


@torch.no_grad()
def score(p: Probed, batch: Batch, x: torch.Tensor) -> float:
    """Accuracy (classifiers) or relative L2 error (regressors) of the model on inputs x."""
    if p.classifier:
        return float(p.model.losses({**batch, "x": x}, "model")["accuracy"])
    return float(relative_l2(p.model(x), batch["y"].to(x.dtype)))


def curves(p: Probed, data: Batch, eps: list[float], steps: int, batch_size: int
           ) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """attack -> score per eps over all samples (batch-size weighted), and the perturbed inputs of
    the first batch at the largest eps, per attack (for the example figure)."""
    n = len(data["x"])
    out = {name: [0.0] * len(eps) for name in ATTACKS}
    examples: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(p.cfg.train.seed)  # PGD's random starts
    bar = tqdm(total=len(ATTACKS) * len(eps) * -(-n // batch_size), desc="attack",
               dynamic_ncols=True, mininterval=1.0)
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size] for k, v in data.items()}
        for name, attack in ATTACKS.items():
            for i, e in enumerate(eps):
                x_adv = attack(p.model, batch, e, steps=steps, generator=gen)
                out[name][i] += score(p, batch, x_adv) * len(batch["x"]) / n
                if start == 0 and i == len(eps) - 1:
                    examples[name] = x_adv
                bar.update()
    bar.close()
    return out, examples


def curve_figure(eps: list[float], scores: dict[str, list[float]], metric: str) -> Any:
    fig, (ax,) = figures.new_figure(1, 4.5, 3.2)
    for (name, ys), color in zip(scores.items(), (figures.REAL, figures.GENERATED)):
        ax.plot(eps, ys, marker="o", color=color, label=name.upper())
    ax.set_xlabel("eps (normalised input units, L-inf)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} under attack", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def example_figure(p: Probed, x: torch.Tensor, adversarial: dict[str, torch.Tensor], eps: float,
                   n: int = 4) -> Any:
    """Rows: the clean input, then each attack's perturbed input and its perturbation, with the
    model's prediction (class, or mean output) in each title."""
    n = min(n, len(x))
    lim = eps or 1.0  # the colour range of a perturbation
    rows = [("clean", x[:n])] + [(f"{k.upper()} eps={eps:g}", v[:n]) for k, v in adversarial.items()]
    fig = figures.Figure(figsize=(2.3 * n, 2.3 * (2 * len(rows) - 1)), dpi=100, layout="constrained")
    axes = fig.subplots(2 * len(rows) - 1, n, squeeze=False)
    lo, hi = float(x.min()) - eps, float(x.max()) + eps  # one grey scale for clean and perturbed
    r = 0
    for label, xs in rows:
        with torch.no_grad():
            out = p.model(xs)
        pred = out.argmax(1) if p.classifier and out.shape[1] > 1 else out.reshape(n, -1).mean(1)
        for j in range(n):
            axes[r][j].imshow(as_2d(xs[j]), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest",
                              aspect="auto")
            axes[r][j].set_title(f"{label}: {float(pred[j]):.3g}", fontsize=7)
            if r:
                delta = as_2d(xs[j] - x[j])
                axes[r + 1][j].imshow(delta, cmap="coolwarm", vmin=-lim, vmax=lim,
                                      interpolation="nearest", aspect="auto")
                axes[r + 1][j].set_title(f"{label}: perturbation", fontsize=7)
        r += 1 if r == 0 else 2
    for ax in axes.ravel():
        ax.set_axis_off()
    return fig


def parse_eps(text: str) -> list[float]:
    try:
        eps = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        eps = []
    if not eps or any(not np.isfinite(e) or e < 0 for e in eps):
        raise UserError(f"--eps {text}: expected comma-separated non-negative numbers in the "
                        f"model's normalised input units, e.g. --eps 0,0.01,0.02,0.05")
    return sorted(set(eps))


def attack(checkpoint: str | Path, eps: list[float], steps: int = 10, n: int = 1024,
           overrides: list[str] | None = None) -> dict[str, Any]:
    """Score FGSM and PGD on up to n evaluation-split samples; write `<stem>.attack.json`,
    `<stem>.attack/{curves,examples}.png` and log both to the checkpoint's W&B run."""
    if steps < 1 or n < 1:
        raise UserError(f"--steps {steps} --n {n}: expected at least 1 of each")
    p = open_probed(checkpoint, overrides or [], "attack")
    data = p.samples(n)
    batch_size = min(p.cfg.train.batch_size, len(data["x"]))
    torch.manual_seed(p.cfg.train.seed)
    scores, examples = curves(p, data, eps, steps, batch_size)
    metric = "accuracy" if p.classifier else "relative_l2"
    res = Results()
    res.metrics = {f"{name}/{metric}@eps={e:g}": s for name, ys in scores.items()
                   for e, s in zip(eps, ys)}
    res.figures = {"curves": curve_figure(eps, scores, metric),
                   "examples": example_figure(p, data["x"][:batch_size], examples, eps[-1])}
    extra = {"samples": len(data["x"]), "metric": metric, "eps": eps,
             "eps_units": f"the model's input units: the store's inputs normalised with "
                          f"data.normalize={p.cfg.data.normalize}; L-inf ball, no clipping",
             "pgd": {"steps": steps, "step_size": f"{PGD_STEP} * eps / steps", "random_start": True},
             "loss": f"the model's training loss ({p.model.cfg.loss})", "curves": scores}
    return write_results(p, "attack", res, extra)
