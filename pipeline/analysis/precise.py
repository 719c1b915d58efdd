"""A generator's physics, measured precisely enough to tell, beside its controls (issue #23).

The pooled evaluation (pipeline/analysis/evaluate.py: a few hundred test samples over all
temperatures, against a floor from the same Markov chains as the training data) could not tell a
trained generator from a sampler with no network: six evaluations of one checkpoint gave W1(|m|)
from 1.09x to 2.53x the floor. This protocol fixes each part of that:

  * per temperature: `per_t` generated lattices at every temperature of the training grid and at
    the midpoints between them (held out of training), so no temperature hides behind another;
  * an independent reference: two sets A and B of equilibrium lattices, each lattice the end of
    its own chain (the source's `reference`, seeded apart from the store), share nothing with the
    training data or with each other. W1(B, A) is the floor of independent samples;
  * the verdict metric is pooled over temperatures: R = sum_T W1_T(gen, A) / sum_T W1_T(B, A) per
    observable (1 is perfect; issue #15's goal is 2), with a 95 % bootstrap interval (samples
    resampled within each temperature, A, B and the generated set independently);
  * the classifier test (pipeline/analysis/two_sample_classifier.py) on gen against A and B against
    A at the same temperatures, its AUC with a bootstrap interval over the held-out scores; the
    thermodynamic curves' errors (pipeline/physics/thermo.py) against the floor's;
  * controls: every sampler is measured the same way. A model with Metropolis sweeps in its
    sampler is shown beside the network alone (no sweeps) and the same sweeps from the source's
    own start with no network. A model with a Metropolis-Hastings correction (neural MCMC) is
    shown beside the network alone (no correction) and the source's start plus as many
    Metropolis sweeps as the model's CPU time buys, and reports its acceptance rate and effective
    sample size per temperature (`mh_per_temperature`). A result counts where it beats its
    control clearly (the upper end of its interval below the lower end of the control's).

Nothing here knows a model: samplers are functions temperatures -> +-1 lattices.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import physics
from pipeline.physics import thermo

OBSERVABLES = ("energy", "abs_magnetization", "magnetization")
VERDICT = ("energy", "abs_magnetization")   # the observables a generator is judged by
GOAL = 2.0                                 # W1 within 2x the floor (issue #15, #23)
AUC_GOAL = 0.6
Z95 = 1.959964                             # the normal quantile of a 95 % interval
FLOOR_SPLITS = 32                          # random halvings of A and B averaged into the floor
Sampler = Callable[[np.ndarray], np.ndarray]   # temperatures (N,) -> +-1 lattices (N, 1, L, L)


@dataclass(frozen=True)
class Protocol:
    grid: np.ndarray            # the training temperatures
    per_t: int = 256            # samples per temperature, of each set
    held_out: bool = True       # also the midpoints between grid temperatures
    boot: int = 200             # bootstrap replicates
    seed: int = 0

    @property
    def temperatures(self) -> np.ndarray:
        g = np.asarray(self.grid, np.float64)
        return np.sort(np.r_[g, (g[1:] + g[:-1]) / 2]) if self.held_out and len(g) > 1 else g

    def is_held_out(self, t: np.ndarray) -> np.ndarray:
        return ~np.isclose(np.asarray(t)[:, None], np.asarray(self.grid)[None]).any(1)

    def conditions(self) -> np.ndarray:
        """(n_T * per_t,) temperatures, grouped by temperature."""
        return np.repeat(self.temperatures, self.per_t)


@dataclass
class Scores:
    """One sampler's numbers: pooled ratios with intervals, per-temperature ratios, AUC, curves."""
    name: str
    ratio: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # (value, lo, hi)
    per_t: dict[str, np.ndarray] = field(default_factory=dict)
    auc: tuple[float, float, float] = (np.nan, np.nan, np.nan)
    curves: dict[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    samples: int = 0            # how many lattices cpu_s made

    def metrics(self, prefix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, (v, lo, hi) in self.ratio.items():
            out.update({f"{prefix}/w1_ratio/{k}": v, f"{prefix}/w1_ratio/{k}_lo": lo,
                        f"{prefix}/w1_ratio/{k}_hi": hi})
        out.update({f"{prefix}/auc": self.auc[0], f"{prefix}/auc_lo": self.auc[1],
                    f"{prefix}/auc_hi": self.auc[2], f"{prefix}/cpu_s": self.cpu_s})
        if self.samples:
            out[f"{prefix}/cpu_s_per_sample"] = self.cpu_s / self.samples
        out.update({f"{prefix}/{k}": v for k, v in self.curves.items()})
        out.update({f"{prefix}/{k}": v for k, v in self.extra.items()})
        return out

    def line(self) -> str:
        parts = [f"{k} {v:.2f}x [{lo:.2f}, {hi:.2f}]" for k, (v, lo, hi) in self.ratio.items()
                 if k in VERDICT]
        acc = (f", Metropolis-Hastings acceptance {self.extra['mh_acceptance']:.2f}"
               if "mh_acceptance" in self.extra else "")
        if "mh_ess_per_n_min" in self.extra:
            acc += (f", ESS/N {self.extra['mh_ess_per_n_min']:.3f}-{self.extra['mh_ess_per_n_max']:.3f}"
                    f" over T")
        if self.cpu_s and self.samples:
            acc += f", {1e3 * self.cpu_s / self.samples:.2f} CPU ms per sample"
        return (f"{self.name}: " + ", ".join(parts)
                + f", AUC {self.auc[0]:.3f} [{self.auc[1]:.3f}, {self.auc[2]:.3f}]{acc}")


# --------------------------------------------------------------------------- reference
def reference(make: Callable[[np.ndarray, int], np.ndarray], protocol: Protocol, cache: Path | None,
              key: dict, log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
    """The independent sets A and B (each (n_T * per_t, 1, L, L) int8, grouped by temperature),
    from `make(temperatures, seed)`, cached at `cache` (a .npz) under `key`."""
    key = {**key, "temperatures": protocol.temperatures.round(6).tolist(), "per_t": protocol.per_t,
           "seed": protocol.seed}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = None if cache is None else cache.with_name(f"{cache.name}.reference-{digest}.npz")
    if path is not None and path.exists():
        with np.load(path) as z:
            return z["a"], z["b"]
    t0 = time.process_time()
    cond = protocol.conditions()
    a, b = make(cond, 2 * protocol.seed + 1), make(cond, 2 * protocol.seed + 2)
    log(f"[hpcforge] reference: 2 x {len(cond)} independent lattices ({protocol.per_t} at each of "
        f"{len(protocol.temperatures)} temperatures) in {time.process_time() - t0:.0f} CPU s"
        + (f" -> {path}" if path else ""))
    if path is not None:
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, a=a, b=b)
        tmp.replace(path)
    return a, b


# --------------------------------------------------------------------------- scoring
def w1_equal(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """W1 between samples of equal size along the last axis, batched over the leading ones: mean
    |sort(x) - sort(y)|, exact for two empirical distributions of n points each (the optimal
    coupling pairs order statistics). It equals `physics.wasserstein1` (scipy) and runs vectorised
    over temperatures and bootstrap replicates, which a loop over scipy calls does not."""
    return np.abs(np.sort(x, axis=-1) - np.sort(y, axis=-1)).mean(axis=-1)


def _by_t(values: np.ndarray, protocol: Protocol) -> np.ndarray:
    """(n_T * per_t,) grouped by temperature -> (n_T, per_t)."""
    return np.asarray(values, np.float64).reshape(len(protocol.temperatures), protocol.per_t)


def floor_w1(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, splits: int) -> np.ndarray:
    """The floor per temperature: W1 between two halves of A and B pooled, averaged over
    `splits` random halvings. Any halving of 2n exchangeable samples is distributed as two
    independent n-samples, so each term has the floor's distribution; the average has less of
    the noise one fixed pair (B, A) carries (+-30 % measured on 7 x 96 lattices). a, b: (..., n)."""
    pooled = np.concatenate([a, b], axis=-1)
    n = a.shape[-1]
    total = 0.0
    for _ in range(splits):
        order = np.argsort(rng.random(pooled.shape), axis=-1)
        half = np.take_along_axis(pooled, order, axis=-1)
        total = total + w1_equal(half[..., :n], half[..., n:])
    return total / splits


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return num.sum(axis=-1) / np.maximum(den.sum(axis=-1), 1e-300)


def log_interval(value: float, logs) -> tuple[float, float, float]:
    """(value, lo, hi): a 95 % normal interval of the log ratio around `value`, its width the
    spread of the bootstrap's log ratios `logs` (their centre is biased low: see `score`)."""
    half = Z95 * float(np.std(logs))
    return value, value * float(np.exp(-half)), value * float(np.exp(half))


def score(name: str, generated: np.ndarray, a: np.ndarray, b: np.ndarray, protocol: Protocol,
          cpu_s: float = 0.0) -> Scores:
    """Every number of one sampler against the reference: W1 to A and to B averaged, over the
    floor of A and B (floor_w1)."""
    rng = np.random.default_rng(protocol.seed)
    obs = {k: {o: _by_t(v, protocol) for o, v in physics.ising_scalars(x).items()}
           for k, x in (("g", generated), ("a", a), ("b", b))}
    n, n_t = protocol.per_t, len(protocol.temperatures)
    out = Scores(name, cpu_s=cpu_s, samples=len(generated))
    for k in OBSERVABLES:
        g, ra, rb = obs["g"][k], obs["a"][k], obs["b"][k]
        num = (w1_equal(g, ra) + w1_equal(g, rb)) / 2
        den = floor_w1(ra, rb, rng, FLOOR_SPLITS)
        # bootstrap: A, B and the generated set resampled within each temperature
        pick = lambda x: np.take_along_axis(x[None], rng.integers(0, n, (protocol.boot, n_t, n)), -1)
        g_, a_, b_ = pick(g), pick(ra), pick(rb)
        logs = np.log(_ratio((w1_equal(g_, a_) + w1_equal(g_, b_)) / 2, floor_w1(a_, b_, rng, 4)))
        # A resample's duplicates inflate every W1, the floor's (near 0 in truth) most, so the
        # bootstrap's ratios sit below the estimate: only their spread is used, as a normal
        # interval for the log ratio around the estimate (Efron & Tibshirani 1993, sec. 13.3)
        out.ratio[k] = log_interval(float(_ratio(num, den)), logs)
        out.per_t[k] = num / np.maximum(den, 1e-300)
        out.per_t[f"w1/{k}"], out.per_t[f"floor/{k}"] = num, den
    _, gen_c = _auc_and_curves(out, a, generated, protocol)
    out.per_t.update({f"curve/{k}": gen_c[k] for k in thermo.QUANTITIES})
    return out


def _auc_and_curves(out: Scores, real: np.ndarray, other: np.ndarray, protocol: Protocol
                    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The classifier AUC and the thermodynamic curve errors of `other` against `real` into
    `out`; returns both sets of curves."""
    out.auc = auc_interval(real, other, protocol)
    cond = protocol.conditions()
    real_c, other_c = thermo.curves(real, cond), thermo.curves(other, cond)
    out.curves = thermo.curve_errors(real_c, other_c)
    return real_c, other_c


def auc_interval(real: np.ndarray, generated: np.ndarray, protocol: Protocol
                 ) -> tuple[float, float, float]:
    """The classifier test's ROC AUC with its 95 % bootstrap interval over the held-out scores."""
    from pipeline.analysis.two_sample_classifier import classifier_scores
    cond = protocol.conditions()
    y, s = classifier_scores(real, generated, physics.Observables(physics.ising_scalars,
                                                                  physics.field_profiles, True),
                             cond, seed=protocol.seed)
    return auc_with_interval(y, s, protocol.boot, protocol.seed)


def auc_with_interval(y: np.ndarray, s: np.ndarray, boot: int = 200, seed: int = 0
                      ) -> tuple[float, float, float]:
    """ROC AUC of held-out labels `y` and scores `s`, and the 2.5 and 97.5 percentiles of its
    bootstrap over the held-out samples (the classifier itself is not refitted)."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(boot):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() != y[i].max():
            values.append(roc_auc_score(y[i], s[i]))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(roc_auc_score(y, s)), float(lo), float(hi)


def timed(sampler: Sampler, cond: np.ndarray) -> tuple[np.ndarray, float]:
    """A sampler's lattices at `cond` (+-1 int8) and the CPU seconds they took (all threads)."""
    t0 = time.process_time()
    x = np.asarray(sampler(cond))
    return np.where(x > 0, 1, -1).astype(np.int8).reshape(len(cond), 1, *x.shape[-2:]), \
        time.process_time() - t0


def floor_scores(a: np.ndarray, b: np.ndarray, protocol: Protocol) -> Scores:
    """B against A: what a perfect generator scores. Its W1 ratio (W1(B, A) over the floor)
    is near 1; its AUC and curve errors are the floor of those metrics."""
    rng = np.random.default_rng(protocol.seed)
    out = Scores("real vs real (independent chains)")
    scalars_b = physics.ising_scalars(b)
    for k, va in physics.ising_scalars(a).items():
        ra, rb = _by_t(va, protocol), _by_t(scalars_b[k], protocol)
        value = float(_ratio(w1_equal(rb, ra), floor_w1(ra, rb, rng, FLOOR_SPLITS)))
        out.ratio[k] = (value, value, value)
    real_c, _ = _auc_and_curves(out, a, b, protocol)
    out.per_t.update({f"curve/{k}": real_c[k] for k in thermo.QUANTITIES})
    return out


def mh_per_temperature(t: np.ndarray, accepted: np.ndarray, log_weight: np.ndarray, steps: int,
                       temperatures: np.ndarray) -> dict[str, np.ndarray]:
    """Per temperature of `temperatures`, the numbers of independence Metropolis-Hastings chains
    (neural MCMC, Nicoli et al. 2020) that a sampler reports: "acceptance", the accepted fraction
    of its proposals, and "ess_per_n", the effective sample size of the importance weights
    w = p / q of all its draws over their number, (sum w)^2 / (n sum w^2), 1 when q is p.
    t, accepted: (N,) per chain; log_weight: (1 + steps, N), log w of each chain's draws."""
    t, accepted, log_weight = np.asarray(t), np.asarray(accepted), np.asarray(log_weight, np.float64)
    out = {"acceptance": np.full(len(temperatures), np.nan), "ess_per_n": np.full(len(temperatures), np.nan)}
    for i, temp in enumerate(temperatures):
        at = np.isclose(t, temp, rtol=0, atol=1e-5)
        if not at.any():
            continue
        lw = log_weight[:, at].ravel()
        w = np.exp(lw - lw.max())
        out["acceptance"][i] = accepted[at].sum() / (steps * at.sum())
        out["ess_per_n"][i] = w.sum() ** 2 / (len(w) * (w ** 2).sum())
    return out


# --------------------------------------------------------------------------- verdict
def beats(model: Scores, control: Scores, key: str) -> bool:
    """Clearly better: the model's interval lies wholly below the control's."""
    return model.ratio[key][2] < control.ratio[key][1]


def verdict(model: Scores, controls: list[Scores]) -> str:
    """One line: met / not met of the 2x goal on each verdict observable and the AUC goal, and
    whether the model beats each control clearly."""
    goal = all(model.ratio[k][0] <= GOAL for k in VERDICT) and model.auc[0] <= AUC_GOAL
    parts = [f"{'met' if goal else 'not met'} (W1 within {GOAL:g}x the floor on "
             f"{' and '.join(VERDICT)}, AUC <= {AUC_GOAL})"]
    for c in controls:
        won = [k for k in VERDICT if beats(model, c, k)]
        parts.append(f"beats '{c.name}' clearly on {', '.join(won) if won else 'nothing'}")
    return "; ".join(parts)


def figure(protocol: Protocol, scores: list[Scores]):
    """W1 / floor against T for each observable, one line per sampler, held-out temperatures
    hollow, the 2x goal and T_c dashed."""
    from matplotlib.figure import Figure
    t = protocol.temperatures
    held = protocol.is_held_out(t)
    fig = Figure(figsize=(4.2 * len(VERDICT), 3.2), dpi=100, layout="constrained")
    for ax, k in zip(fig.subplots(1, len(VERDICT)), VERDICT):
        for s in scores:
            line, = ax.plot(t, s.per_t[k], "-", lw=1, label=s.name)
            ax.plot(t[~held], s.per_t[k][~held], "o", color=line.get_color(), ms=4)
            ax.plot(t[held], s.per_t[k][held], "o", mfc="none", color=line.get_color(), ms=4)
        ax.axhline(GOAL, ls="--", color="gray", lw=0.8)
        ax.axhline(1.0, ls=":", color="gray", lw=0.8)
        ax.axvline(thermo.T_CRITICAL, ls="--", color="k", lw=0.6)
        ax.set_yscale("log")
        ax.set(xlabel="T", ylabel=f"W1({k}) / floor", title=f"{k} per temperature (hollow: held out)")
    fig.axes[0].legend(fontsize=7)
    return fig
