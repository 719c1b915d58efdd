"""`hpcforge evaluate CHECKPOINT`: score a trained model on the test split.

Every model gets the mean of its own named losses over the split (accuracy for classifiers, ELBO
for the VAE, reconstruction error for autoencoders, ...). Beyond that the evaluator asks what the
model can do, never what it is called:
  predicts fields or sequences shaped like "y"  -> relative L2 error, standardised (relative_l2)
                                                   and in the data's units (relative_l2_raw);
  predicts class logits for integer "y"         -> confusion matrix;
  samples (`sample(n)`) -> 1-Wasserstein distances of physical observables
                                                   and a Fréchet distance on learned features;
  scores anomalies (`anomaly_score(x)`)         -> ROC AUC against out-of-distribution samples.

The Fréchet features come from a small CNN trained on the same store (cached next to it), so the
distance means something for physics fields, not only for photos (cf. FID, Heusel et al. 2017).
Results go to `<checkpoint>.eval.json`, figures to `<checkpoint>.eval/`, and both to the
checkpoint's W&B run (resumed by id).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import build as build_model
from models.base import sampler
from pipeline import physics
from pipeline.analysis import latent
from pipeline.analysis.shared import (as_image, checkpoint_config, eval_split, load_checkpoint,
                                      log_to_wandb, normalized, per_channel)
from pipeline.config import Config
from pipeline.core import figures
from pipeline.core.checkpoint import load, save_atomic
from pipeline.core.errors import UserError
from pipeline.data.loader import ShardedLoader
from pipeline.data.store import Store, normalization, open_store
from pipeline.sources import SOURCES, declared, observables
from pipeline.train.ema import load_weights

MAX_SAMPLES = 2048        # cap on real and generated samples per distance (W1, Fréchet)
# generated and reference samples per temperature (pipeline/analysis/precise.py)
PER_T = 256
OOD_SAMPLES = 256         # out-of-distribution samples for the anomaly ROC AUC


def declaring(name: str) -> str:
    return ", ".join(k for k in SOURCES if declared(k, name) is not None)


# --------------------------------------------------------------------------- feature extractor
class FeatureNet(nn.Module):
    """A small CNN classifier; its penultimate layer gives the Fréchet features."""

    def __init__(self, in_channels: int, n_classes: int, width: int = 16, n_features: int = 32):
        super().__init__()
        # (B, C, H, W) -> (B, w, H/2, W/2) -> (B, 2w, H/4, W/4) -> (B, 2w, 2, 2) -> (B, n_features)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, n_features), nn.ReLU())
        self.head = nn.Linear(n_features, n_classes)  # (B, n_features) -> (B, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features(self, x: np.ndarray, batch: int = 512) -> np.ndarray:
        self.eval()
        t = torch.as_tensor(as_image(x), dtype=torch.float32)
        return torch.cat([self.body(t[i:i + batch]) for i in range(0, len(t), batch)]).numpy()


def class_labels(values: np.ndarray, max_classes: int = 16) -> np.ndarray:
    """Integer classes from a label variable: its distinct values when few (Ising temperatures,
    digits), else `max_classes` quantile bins (a continuous incident energy)."""
    values = np.ravel(values)
    uniq = np.unique(values)
    if len(uniq) <= max_classes:
        return np.searchsorted(uniq, values)
    edges = np.quantile(values, np.linspace(0, 1, max_classes + 1)[1:-1])
    return np.searchsorted(edges, values, side="right")


def feature_extractor(store: Store, variable: str, normalize: str, passes: int = 40_000,
                      max_samples: int = 8192, log: Callable[[str], None] = print) -> FeatureNet:
    """The store's feature CNN, trained on its train split once and cached at `<store>.features.pt`
    (atomically); retrained when the store, the variable or the normalisation differ.

    Trained for about `passes` sample presentations (3 to 20 epochs): ~10 s on one CPU core.
    """
    source, label = store.meta.source, declared(store.meta.source, "FEATURE_LABEL")
    if label is None:
        raise UserError(f"no label variable to train a feature extractor on for source {source!r}; "
                        f"known: {declaring('FEATURE_LABEL')}")
    key = {"variable": variable, "normalize": normalize, "label": label,
           "checksums": store.meta.checksums}
    path = store.path.with_name(store.path.name + ".features.pt")
    if path.exists():
        cached = load(path)
        if cached["key"] == key:
            net = FeatureNet(**cached["shape"])
            net.load_state_dict(cached["model"])
            return net
    t0 = time.perf_counter()
    x = normalized(store, "train", variable, normalize, max_samples)
    y = class_labels(store.variable("train", label)[:len(x)])
    shape = {"in_channels": x.shape[1], "n_classes": int(y.max()) + 1}
    torch.manual_seed(0)  # the same store gives the same extractor
    net = _fit(FeatureNet(**shape), torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y),
               epochs=min(20, max(3, passes // len(x))))
    save_atomic({"model": net.state_dict(), "shape": shape, "key": key}, path)
    log(f"[hpcforge] feature extractor: trained on {len(x)} samples ({shape['n_classes']} classes "
        f"of {label}) in {time.perf_counter() - t0:.1f} s -> {path}")
    return net


@torch.enable_grad()  # callers may be inside no_grad
def _fit(net: FeatureNet, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int = 64) -> FeatureNet:
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


# --------------------------------------------------------------------------- capabilities
@torch.no_grad()
def loss_terms(model: nn.Module, loader: ShardedLoader, phase: str) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Mean of each named loss over every sample of the split (a loader that keeps its partial
    last batch: each batch's mean weighs by its size); also the inputs, targets and plain
    predictions."""
    sums: dict[str, float] = defaultdict(float)
    keep: dict[str, list[np.ndarray]] = defaultdict(list)
    # multi-network models (GANs, AAE) have no single forward(); only predictors have one
    predicts = type(model).forward is not nn.Module.forward
    n = 0
    for batch in loader:
        size = len(next(iter(batch.values())))
        n += size
        for k, v in model.losses(batch, phase).items():
            sums[k] += v.item() * size
        for k, v in batch.items():
            keep[k].append(v.numpy())
        if not predicts:
            continue
        out = model(batch["x"])
        if isinstance(out, torch.Tensor):  # a prediction (not a tuple of reconstruction terms)
            keep["prediction"].append(out.numpy())
    return {k: v / n for k, v in sums.items()}, {k: np.concatenate(v) for k, v in keep.items()}


def relative_l2(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Mean over samples of ||prediction - truth|| / ||truth||."""
    p, t = (np.asarray(a, np.float64).reshape(len(a), -1) for a in (prediction, truth))
    return float(np.mean(np.linalg.norm(p - t, axis=1) / np.maximum(np.linalg.norm(t, axis=1), 1e-12)))


def regression_scores(pred: np.ndarray, truth: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """RMSE, MAE and R² (1 - residual / total sum of squares about the split's own mean, every
    output value pooled) of `pred` and of `baseline`, the same arrays in the target's units."""
    truth = np.asarray(truth, np.float64)
    total = float(np.sum((truth - truth.mean(axis=0)) ** 2))
    out: dict[str, float] = {}
    for tag, p in (("", pred), ("_baseline", baseline)):
        err = np.asarray(p, np.float64) - truth
        out[f"rmse{tag}"] = float(np.sqrt(np.mean(err ** 2)))
        out[f"mae{tag}"] = float(np.mean(np.abs(err)))
        out[f"r2{tag}"] = 1.0 - float(np.sum(err ** 2)) / total if total > 0 else float("nan")
    return out


def class_names(table: dict[str, int] | None, n_classes: int) -> list[str]:
    """Each label's name from the store's class table (data.params.label_from), else the label
    itself; a label the table lacks keeps its number."""
    names = {int(v): str(k) for k, v in (table or {}).items()}
    return [names.get(i, str(i)) for i in range(n_classes)]


def per_class_accuracy(y: np.ndarray, predicted: np.ndarray, names: list[str]) -> dict[str, float]:
    """"accuracy/<class>": the share of each class's samples predicted as that class (its
    recall); classes absent from the split are left out."""
    return {f"accuracy/{name}": float(np.mean(predicted[y == i] == i))
            for i, name in enumerate(names) if np.any(y == i)}


# --------------------------------------------------------------------------- evaluation
class Evaluation:
    """The metrics and figures of one checkpoint on one split."""

    def __init__(self, cfg: Config, model: nn.Module, store: Store, split: str, seed: int = 0,
                 per_t: int = PER_T):
        self.cfg, self.model, self.store, self.split = cfg, model, store, split
        self.seed, self.per_t = seed, per_t
        self.per_temperature: dict[str, Any] = {}
        self.var = cfg.data.inputs["x"]
        self.affine = normalization(store.stats("train", self.var), cfg.data.normalize)
        self.rng = np.random.default_rng(seed)
        self.metrics: dict[str, float] = {}
        self.figures: dict[str, Any] = {}
        self.notes: list[str] = []
        self._chains: list[dict[str, torch.Tensor]] = []   # the MH model's chains (precise)

    def run(self) -> None:
        torch.manual_seed(self.cfg.train.seed)
        self.model.eval()
        n = self.store.meta.splits[self.split]
        loader = ShardedLoader(self.store, self.split, self.cfg.data.inputs,
                               min(self.cfg.train.batch_size, n), normalize=self.cfg.data.normalize,
                               seed=self.cfg.train.seed, drop_last=False)  # every sample scored
        phase = self.model.optimizers()[0].name
        terms, arrays = loss_terms(self.model, loader, phase)
        self.metrics.update(terms)
        self.metrics["samples"] = len(arrays["x"])
        self.predictions(arrays)
        if (sample := sampler(self.model)) is not None:
            self.generative(sample, arrays)
        if latent.explorable(self.model):
            latent.explore(self, arrays)
        if hasattr(self.model, "anomaly_score"):
            self.anomaly(arrays["x"])

    def predictions(self, arrays: dict[str, np.ndarray]) -> None:
        pred, y = arrays.get("prediction"), arrays.get("y")
        if pred is None or y is None:
            return
        if y.ndim == 1 and pred.shape == (len(y), 1):
            pred = pred[:, 0]  # one output per sample against a per-sample scalar target
        field = pred.ndim == 4
        if y.ndim == 3 and pred.shape == (len(y), 1, *y.shape[1:]) and np.issubdtype(y.dtype, np.floating):
            pred = pred[:, 0]  # a one-channel field against one stored without its channel axis
        if pred.shape == y.shape and np.issubdtype(y.dtype, np.floating):
            # the loader standardises a target with a channel axis, not a per-sample scalar
            raw = self._physical_y if y.ndim > 1 else (lambda a: np.asarray(a, np.float64))
            self.metrics["relative_l2"] = relative_l2(pred, y)
            self.metrics["relative_l2_raw"] = relative_l2(*map(raw, (pred, y)))
            if pred.ndim >= 2:  # (a scalar per sample has no field or series to draw)
                self.figures["fields" if field else "forecast"] = (
                    figures.field_panels(pred, y) if field else figures.forecast_figure(pred[0], y[0]))
            self.regression(raw(pred), raw(y))
        elif pred.ndim == 2 and y.ndim == 1 and np.issubdtype(y.dtype, np.integer) and pred.shape[1] > 1:
            names = class_names(self.store.meta.classes, pred.shape[1])
            self.figures["confusion_matrix"] = figures.confusion_matrix(y, pred.argmax(1), pred.shape[1],
                                                                        names)
            per_class = per_class_accuracy(y, pred.argmax(1), names)
            self.metrics.update(per_class)
            # what no model beats by guessing: the split's most common class, and 1 / classes
            self.metrics["accuracy_majority"] = float(np.bincount(y).max() / len(y))
            self.metrics["accuracy_chance"] = 1.0 / pred.shape[1]
            self.notes.append("accuracy per class: " + ", ".join(
                f"{k.split('/', 1)[1]} {v:.3f}" for k, v in per_class.items()))

    def regression(self, pred: np.ndarray, y: np.ndarray) -> None:
        """RMSE, MAE and R² in the units of the stored target beside predicting the train
        split's mean for every sample (R² 0 by construction on the train split), one note line
        that says them, and the predicted-vs-true figure."""
        name = self.cfg.data.inputs["y"]
        mean = np.asarray(self.store.stats("train", name)["mean"], np.float64)
        baseline = np.broadcast_to(per_channel(mean, y) if y.ndim > 1 else mean, y.shape)
        scores = regression_scores(pred, y, baseline)
        self.metrics.update(scores)
        self.notes.append(f"regression of {name} (in its stored units): RMSE {scores['rmse']:.4g} "
                          f"(predicting the train mean: {scores['rmse_baseline']:.4g}), MAE "
                          f"{scores['mae']:.4g} ({scores['mae_baseline']:.4g}), R\u00b2 "
                          f"{scores['r2']:.3f} ({scores['r2_baseline']:.3f})")
        self.figures["predicted_vs_true"] = figures.predicted_vs_true(pred, y, name, scores["r2"])

    @torch.no_grad()
    def generative(self, sample: Callable, arrays: dict[str, np.ndarray]) -> None:
        """W1 of the source's observables (physics.compare) and the Fréchet distance, each next
        to the same distance between two real samples of the same size: the floor a perfect
        model reaches."""
        source = self.store.meta.source
        if (obs := observables(source)) is None:
            self.notes.append(f"no physical observables defined for source {source!r}; "
                              f"W1 and Fréchet distances skipped")
            return
        real_norm = arrays["x"][:MAX_SAMPLES]
        n = len(real_norm)
        cond = {k: torch.as_tensor(arrays[k][:n]) for k in ("cond",) if k in arrays}
        # sample the two-level variable from the model's probabilities (rng), not by sign
        gen_phys = physics.physical(obs, sample(n, cond).cpu().numpy(), self.affine, self.rng)
        real_phys, train_phys = (np.asarray(self.store.variable(split, self.var)[:n], np.float64)
                                 for split in (self.split, "train"))
        cmp = physics.compare(obs, real_phys, gen_phys)
        self.metrics.update(cmp.distances)
        self.metrics.update({k.replace("w1/", "w1_reference/", 1): v for k, v in
                             physics.compare(obs, real_phys, train_phys).distances.items()})
        self.floor_ratios(cmp.distances)
        self.figures.update(figures.comparison_figures(cmp))
        curves = declared(source, "conditional_curves")
        conditional = getattr(self.model, "conditional", False)  # generates at its "cond"
        if "cond" in arrays and curves is not None and conditional:
            real_aligned = physics.physical(obs, real_norm, self.affine, self.rng)  # cond's order
            self.conditional(curves, real_aligned, gen_phys, arrays["cond"][:n])
        if "cond" in arrays and conditional and (bins := declared(source, "CONDITION_BINS")):
            self.condition_bins(bins, obs, real_norm, gen_phys, train_phys, arrays["cond"][:n])
            self.bin_controls(bins, obs, sample, real_norm, gen_phys, train_phys, arrays["cond"][:n])
        self.frechet(real_norm, self._renormalize(gen_phys), self._renormalize(train_phys))
        self.classifier(obs, real_norm, gen_phys, train_phys, arrays.get("cond") if conditional else None)
        if conditional and (make := declared(source, "reference")) is not None and self.per_t:
            self.precise(sample, make, obs)

    def precise(self, sample: Callable, make: Callable, obs: physics.Observables) -> None:
        """The per-temperature evaluation against independent reference chains, with controls
        (pipeline/analysis/precise.py, issue #23): the model's sampler as configured; for a sampler
        with Metropolis sweeps, the network alone and the same sweeps from the source's own
        start."""
        from pipeline.analysis import precise
        params = self.cfg.data.params
        protocol = precise.Protocol(SOURCES[self.store.meta.source].temperatures(params), self.per_t,
                                    seed=self.seed)
        a, b = precise.reference(lambda t, seed: make(params, t, seed), protocol, self.store.path,
                                 {"params": dataclasses.asdict(params)})
        cond = protocol.conditions()
        torch.manual_seed(self.seed)
        scores, self._chains = {}, []
        if hasattr(self.model, "last_chains"):
            self.model.last_chains = None   # not the chains of the pooled evaluation's sample()
        for key, name, run in self._precise_samplers(sample, obs, scores):
            x, cpu = precise.timed(run, cond)
            scores[key] = precise.score(getattr(run, "name", name), x, a, b, protocol, cpu_s=cpu)
            if hasattr(run, "sweeps"):
                scores[key].extra["sweeps"] = run.sweeps
            if key == "model" and self._chains:
                self._mh_record(scores[key], protocol)
        self._precise_record(protocol, precise.floor_scores(a, b, protocol), scores)

    def _mh_record(self, sc: Any, protocol: Any) -> None:
        """The model's Metropolis-Hastings chains (collected from every sample() call of its run):
        acceptance and ESS / N per temperature into its per-T table, their range into its extras."""
        from pipeline.analysis import precise
        t, accepted, log_weight = (torch.cat([c[k] for c in self._chains], -1).cpu().numpy()
                                   for k in ("t", "accepted", "log_weight"))
        steps = self.model.cfg.mh_steps
        per_t = precise.mh_per_temperature(t, accepted, log_weight, steps, protocol.temperatures)
        sc.per_t.update({f"mh/{k}": v for k, v in per_t.items()})
        sc.extra.update({"mh_acceptance": float(accepted.sum() / (steps * len(accepted))),
                         "mh_ess_per_n_min": float(np.nanmin(per_t["ess_per_n"])),
                         "mh_ess_per_n_max": float(np.nanmax(per_t["ess_per_n"])),
                         "mh_acceptance_min": float(np.nanmin(per_t["acceptance"])),
                         "mh_acceptance_max": float(np.nanmax(per_t["acceptance"]))})

    def _precise_samplers(self, sample: Callable, obs: physics.Observables, scores: dict[str, Any]
                          ) -> list[tuple[str, str, Callable]]:
        """(key, name, temperatures -> lattices) of the model and its controls. `scores` fills
        as they run: the control of a Metropolis-Hastings model reads the model's CPU time."""
        rng, source, params = np.random.default_rng(self.seed), SOURCES[self.store.meta.source], self.cfg.data.params

        def model_sampler(t: np.ndarray) -> np.ndarray:
            out = []
            for c in np.array_split(t, -(-len(t) // 1024)):
                out.append(sample(len(c), {"cond": torch.as_tensor(c, dtype=torch.float32)}).cpu().numpy())
                if (chains := getattr(self.model, "last_chains", None)) is not None:
                    # the MH chains of this call (the model's run only)
                    self._chains.append(chains)
                    self.model.last_chains = None
            return physics.physical(obs, np.concatenate(out), self.affine, rng)

        model_cfg = getattr(self.model, "cfg", None)
        sweeps = int(getattr(model_cfg, "refine_sweeps", 0) or 0)
        mh = int(getattr(model_cfg, "mh_steps", 0) or 0)
        if mh:
            return [("model", f"model (neural MCMC: {mh} Metropolis-Hastings proposals from the "
                              f"network per chain)", model_sampler),
                    ("network_only", "network alone (no correction)",
                     self._with_model_cfg(model_sampler, mh_steps=0)),
                    ("control", "no network: source's start + Metropolis sweeps at the model's CPU time",
                     self._same_cost_control(source.initial_state, params, scores))]
        runs = [("model", f"model ({sweeps} sweeps)" if sweeps else "model", model_sampler)]
        if sweeps:
            runs.append(("network_only", "network alone (0 sweeps)",
                         self._with_model_cfg(model_sampler, refine_sweeps=0)))
        runs.append(("control", f"no network: source's start + {sweeps} sweeps",
                     lambda t: no_network(source.initial_state, params, t, sweeps, self.seed)))
        return runs

    def _same_cost_control(self, make_start: Callable, params: Any, scores: dict[str, Any]) -> Callable:
        """The no-network control of a sampler that has no sweeps to match (issue #23): the
        source's start plus as many Metropolis sweeps as the model's CPU time buys
        (`no_network_within`); the sampler's `name` says the sweeps it ran."""
        def run(t: np.ndarray) -> np.ndarray:
            x, run.sweeps = no_network_within(make_start, params, t, scores["model"].cpu_s,
                                              self.seed)
            run.name = f"no network: source's start + {run.sweeps} sweeps (the model's CPU time)"
            return x
        return run

    def _precise_record(self, protocol: Any, floor: Any, scores: dict[str, Any]) -> None:
        """Metrics (precise/<sampler>/...), the two note lines, the figure and the table per T."""
        from pipeline.analysis import precise
        self.metrics.update({"precise/floor/auc": floor.auc[0], "precise/floor/auc_hi": floor.auc[2],
                             **{f"precise/floor/{k}": v for k, v in floor.curves.items()}})
        for key, sc in scores.items():
            self.metrics.update(sc.metrics(f"precise/{key}"))
        self.metrics.update({"precise/per_t": protocol.per_t, "precise/samples": protocol.per_t *
                             len(protocol.temperatures), "precise/temperatures": len(protocol.temperatures)})
        controls = [scores[k] for k in ("network_only", "control") if k in scores]
        self.notes.append(f"precise ({protocol.per_t} per T at {len(protocol.temperatures)} T, "
                          f"held-out midpoints included; independent reference chains; 95 % "
                          f"intervals): W1 / floor " + " | ".join(s.line() for s in scores.values())
                          + f" | floor AUC {floor.auc[0]:.3f}")
        said = f" [{scores['model'].name}]" if self._chains else ""   # which sampler, for an MH one
        self.notes.append(f"verdict: {precise.verdict(scores['model'], controls)}{said}")
        self.figures["per_temperature"] = precise.figure(protocol, list(scores.values()))
        self.per_temperature = {"T": protocol.temperatures.tolist(),
                                "held_out": protocol.is_held_out(protocol.temperatures).tolist(),
                                **{f"{key}/{k}": v.tolist() for key, sc in scores.items()
                                   for k, v in sc.per_t.items()},
                                **{f"floor/{k}": v.tolist() for k, v in floor.per_t.items()}}

    def _with_model_cfg(self, model_sampler: Callable, **changes: Any) -> Callable:
        """The model's sampler with `changes` to its config for the call (refine_sweeps=0 or
        mh_steps=0: the network alone)."""
        def run(t: np.ndarray) -> np.ndarray:
            cfg = self.model.cfg
            kept = {k: getattr(cfg, k) for k in changes}
            for k, v in changes.items():
                setattr(cfg, k, v)
            try:
                return model_sampler(t)
            finally:
                for k, v in kept.items():
                    setattr(cfg, k, v)
        return run

    def floor_ratios(self, distances: dict[str, float]) -> None:
        """W1 / the real-vs-real floor per observable ("w1_ratio/<name>"), the number issue #15
        judges a generator by (1 is perfect, 2 its goal), and one note line that says them."""
        floors = {k: self.metrics[k.replace("w1/", "w1_reference/", 1)] for k in distances}
        ratios = {k.replace("w1/", "w1_ratio/", 1): v / floors[k]
                  for k, v in distances.items() if floors[k] > 0}
        self.metrics.update(ratios)
        said = ", ".join(f"{k.split('/', 1)[1]} {v:.2f}x" for k, v in ratios.items())
        self.notes.append(f"W1 / real-vs-real floor (1 is perfect): {said}")

    def conditional(self, curves: Callable, real: np.ndarray, generated: np.ndarray,
                    cond: np.ndarray) -> None:
        """The source's curves over its conditioning value (Ising: <|m|>, <E>, C and chi against T,
        pipeline/physics/thermo.py), real against generated at the same conditions: errors and a
        figure."""
        from pipeline.physics import thermo
        real_curves, gen_curves = curves(real, cond), curves(generated, cond)
        self.metrics.update(thermo.curve_errors(real_curves, gen_curves))
        self.figures["thermo_curves"] = thermo.curve_figure(real_curves, gen_curves)

    def condition_bins(self, spec: Any, obs: physics.Observables, real_norm: np.ndarray,
                       generated: np.ndarray, train: np.ndarray, cond: np.ndarray) -> None:
        """W1 / floor per bin of a continuous condition and the response
        (pipeline/analysis/binned.py, issue #15), for a source that declares CONDITION_BINS; the
        floor's second real sample is the train split with its own conditions."""
        from pipeline.analysis import binned
        real = physics.physical(obs, real_norm, self.affine, self.rng)      # cond's order
        result = binned.evaluate_bins(spec, obs.scalars(real), cond, obs.scalars(generated),
                                      obs.scalars(train), self._train_condition(len(train)))
        self.metrics.update(result.metrics)
        self.notes.append(binned.summary(result))
        if result.response:
            self.figures["response"] = binned.response_figure(spec, result)

    def bin_controls(self, spec: Any, obs: physics.Observables, sample: Callable, real_norm: np.ndarray,
                     generated: np.ndarray, train: np.ndarray, cond: np.ndarray) -> None:
        """Issue #23, point 5: every per-bin W1 / floor with a 95 % interval (the floor averaged
        over re-splits of the test and train samples of the bin) and the classifier AUC with its
        interval, for the model and for two controls with no trained network, measured the same
        way: the same network at initialisation (what training adds), and the bin's mean shower
        scaled to each E (binned.mean_shower: the right mean response and profiles, no
        fluctuations). Metrics "bins/<sampler>/...", a note line, a verdict line and a figure."""
        from pipeline.analysis import binned, precise
        from pipeline.analysis.two_sample_classifier import classifier_scores
        seed = self.cfg.train.seed
        real = physics.physical(obs, real_norm, self.affine, np.random.default_rng(seed))
        train_cond = self._train_condition(len(train))
        bin_edges = binned.edges(cond, spec.n_bins)
        in_real, in_ref = binned.index(cond, bin_edges), binned.index(train_cond, bin_edges)
        runs = {"model": ("model", generated),
                "untrained": ("the same network untrained", self._untrained(obs, cond)),
                "mean_shower": ("no network: the bin's mean shower x E",
                                binned.mean_shower(train, train_cond, cond, bin_edges))}
        real_s, ref_s = obs.scalars(real), obs.scalars(train)
        scores = []
        for key, (name, x) in runs.items():
            ratio = binned.bin_ratios(real_s, obs.scalars(x), ref_s, in_real, in_ref, spec.n_bins,
                                      seed=self.seed)
            y, s = classifier_scores(real, x, obs, cond, seed=seed)
            scores.append(binned.BinScores(name, ratio, precise.auc_with_interval(y, s, binned.BOOT,
                                                                                  self.seed)))
            self.metrics.update(scores[-1].metrics(f"bins/{key}"))
        self.notes.append(f"per condition bin ({spec.n_bins} bins, 95 % intervals, floor averaged "
                          f"over {precise.FLOOR_SPLITS} re-splits of test and train): W1 / floor "
                          + " | ".join(binned.line(s) for s in scores))
        self.notes.append(f"verdict: {binned.verdict(scores[0], scores[1:])}")
        centres = np.array([cond[in_real == k].mean() for k in range(spec.n_bins)])
        self.figures["ratio_per_bin"] = binned.ratio_figure(spec, centres, scores)

    def _untrained(self, obs: physics.Observables, cond: np.ndarray) -> np.ndarray:
        """Samples of the same network at initialisation (seeded by train.seed), one per `cond`,
        in physical units; torch's generator is left as it was, so later metrics do not move."""
        seed, state = self.cfg.train.seed, torch.get_rng_state()
        try:
            torch.manual_seed(seed)
            untrained = sampler(build_model(self.cfg.model.name, self.cfg.model.params).eval())
            raw = untrained(len(cond), {"cond": torch.as_tensor(cond)}).cpu().numpy()
        finally:
            torch.set_rng_state(state)
        return physics.physical(obs, raw, self.affine, np.random.default_rng(seed))

    def classifier(self, obs: physics.Observables, real_norm: np.ndarray, generated: np.ndarray,
                   train: np.ndarray, cond: np.ndarray | None) -> None:
        """The CaloChallenge classifier test (pipeline/analysis/two_sample_classifier.py, issue 15):
        ROC AUC of telling the generated samples from the real ones they were generated beside (a
        conditional model's condition is a feature), 0.5 = indistinguishable; beside it the same
        test of the training split against them ("classifier/auc_reference"), what a perfect
        generator scores with as many samples. Its own rng: the metrics above stay as they were."""
        from pipeline.analysis.two_sample_classifier import classifier_auc
        seed = self.cfg.train.seed
        real = physics.physical(obs, real_norm, self.affine, np.random.default_rng(seed))
        cond = None if cond is None else cond[:len(real)]
        train_cond = None if cond is None else self._train_condition(len(train))
        self.metrics["classifier/auc"] = classifier_auc(real, generated, obs, cond, seed=seed)
        self.metrics["classifier/auc_reference"] = classifier_auc(
            real, train, obs, cond, seed=seed, generated_cond=train_cond)
        self.metrics["classifier/samples"] = 2 * min(len(real), len(generated))
        self.notes.append(f"classifier AUC (0.5 is perfect): {self.metrics['classifier/auc']:.3f}, "
                          f"real vs real {self.metrics['classifier/auc_reference']:.3f}")

    def _train_condition(self, n: int) -> np.ndarray:
        """The conditions of the train split's first n samples: the real-vs-real references'
        second sample is drawn at its own conditions."""
        return np.asarray(self.store.variable("train", self.cfg.data.inputs["cond"])[:n])

    def _physical_y(self, y: np.ndarray) -> np.ndarray:
        """A target-shaped array back in the units of the stored "y" variable: the FNO paper's
        relative L2 (Li et al. 2021, sec. 5) is of the raw field (issue #15), and a standardised
        field's norm (mean removed) is smaller, so its relative error is larger."""
        shift, scale = normalization(self.store.stats("train", self.cfg.data.inputs["y"]),
                                     self.cfg.data.normalize)
        y = np.asarray(y, np.float64)
        return y * per_channel(scale, y) + per_channel(shift, y)

    def _renormalize(self, phys: np.ndarray) -> np.ndarray:
        shift, scale = self.affine
        return as_image((phys - per_channel(shift, phys)) / per_channel(scale, phys)).astype(np.float32)

    def frechet(self, real: np.ndarray, generated: np.ndarray, train: np.ndarray) -> None:
        try:
            net = feature_extractor(self.store, self.var, self.cfg.data.normalize)
        except UserError as e:
            self.notes.append(f"no Fréchet distance: {e}")
            return
        f_real = net.features(real)
        self.metrics["frechet_distance"] = physics.frechet_distance(f_real, net.features(generated))
        self.metrics["frechet_reference"] = physics.frechet_distance(f_real, net.features(train))

    def anomaly(self, x: np.ndarray) -> None:
        inliers = self.model.anomaly_score(torch.as_tensor(x)).numpy()
        self.metrics["reconstruction_error"] = float(inliers.mean())
        source = self.store.meta.source
        if (outliers_of := declared(source, "out_of_distribution")) is None:
            self.notes.append(f"no out-of-distribution set defined for source {source!r}; "
                              f"anomaly ROC AUC skipped")
            return
        ood = SOURCES[source].generate(outliers_of(self.cfg.data.params), seed=self.cfg.data.seed + 1,
                                       chunk_index=0, start=0, n=OOD_SAMPLES)[self.var]
        shift, scale = self.affine
        ood = ((ood - per_channel(shift, ood)) / per_channel(scale, ood)).astype(np.float32)
        outliers = self.model.anomaly_score(torch.as_tensor(ood)).numpy()
        scores = np.concatenate([inliers, outliers])
        labels = np.r_[np.zeros(len(inliers)), np.ones(len(outliers))]
        self.metrics["anomaly_roc_auc"] = physics.roc_auc(scores, labels)
        self.metrics["anomaly_ood_samples"] = len(outliers)
        self.figures["anomaly_scores"] = figures.score_histograms(
            inliers, outliers, self.metrics["anomaly_roc_auc"])


def no_network(make_start: Callable, params: Any, t: np.ndarray, sweeps: int, seed: int) -> np.ndarray:
    """The control with no network (issue #23): the source's own initial lattices at `t` through
    the generators' own refinement (`models.ising.refine_spins`: `sweeps` Metropolis sweeps at
    each lattice's T, then a whole-lattice flip with probability 1/2), as +-1 spins."""
    from models.ising import refine_spins
    start = torch.as_tensor(make_start(params, t, seed), dtype=torch.float32)
    torch.manual_seed(seed)
    return (2 * refine_spins((start + 1) / 2, torch.as_tensor(t, dtype=torch.float32), sweeps) - 1).numpy()


def no_network_within(make_start: Callable, params: Any, t: np.ndarray, cpu_s: float,
                      seed: int) -> tuple[np.ndarray, int]:
    """`no_network`'s control run for `cpu_s` CPU seconds: the source's start, then Metropolis
    sweeps in growing blocks on the same chains until the next block would overrun the budget,
    then the whole-lattice flip. (±1 spins, sweeps run). Its CPU time is the model's within
    about one sweep, however loaded the machine: an earlier version priced a sweep from two
    short calibration runs first, whose noise let the control's time stray past 2x the model's."""
    from models.ising import metropolis_sweeps
    t0 = time.process_time()
    spins = torch.as_tensor(make_start(params, t, seed), dtype=torch.float32)
    temps = torch.as_tensor(t, dtype=torch.float32)
    torch.manual_seed(seed)
    done, block = 0, 1
    while True:
        spins = metropolis_sweeps(spins, temps, block)
        done += block
        spent = time.process_time() - t0
        per_sweep = spent / done
        if cpu_s - spent < per_sweep / 2:
            break
        block = max(1, min(round((cpu_s - spent) / per_sweep), 2 * block))
    flip = torch.where(torch.rand(len(spins), 1, 1, 1) < 0.5, -1.0, 1.0)
    return (spins * flip).numpy(), done


# --------------------------------------------------------------------------- entry point
def evaluate(checkpoint: str | Path, overrides: list[str] | None = None, seed: int | None = None,
             per_t: int = PER_T) -> dict[str, Any]:
    """Score a checkpoint; write `<checkpoint>.eval.json` and figures, log to its W&B run."""
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    cfg = checkpoint_config(ckpt, overrides or [])
    model = build_model(cfg.model.name, cfg.model.params)
    weights = load_weights(model, ckpt, cfg.train.ema.weights)  # the average, if saved (issue #15)
    store = open_store(cfg.data.path)
    split = eval_split(store)
    ev = Evaluation(cfg, model, store, split, seed=cfg.train.seed if seed is None else seed,
                    per_t=per_t)
    ev.run()
    out_dir = path.with_name(path.stem + ".eval")
    out_dir.mkdir(exist_ok=True)
    pngs = {}
    for name, fig in ev.figures.items():
        pngs[name] = out_dir / f"{name}.png"
        pngs[name].write_bytes(figures.to_png(fig))
    result = {"checkpoint": str(path), "step": ckpt["step"], "model": cfg.model.name,
              "source": store.meta.source, "split": split, "weights": weights, "metrics": ev.metrics,
              "figures": {k: str(v) for k, v in pngs.items()}, "notes": ev.notes,
              "per_temperature": ev.per_temperature,
              "wandb_run_id": ckpt.get("wandb_run_id")}
    result["wandb_run"] = log_to_wandb(cfg, path, ckpt, ev)
    json_path = path.with_name(path.stem + ".eval.json")
    tmp = json_path.with_name(f".{json_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, json_path)
    result["json"] = str(json_path)
    return result


