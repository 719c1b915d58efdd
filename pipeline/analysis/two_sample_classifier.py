"""The classifier test of generated samples: can a classifier tell them from real ones?

The CaloChallenge's headline metric (Krause et al., "CaloChallenge 2022: A Community Challenge
for Fast Calorimeter Simulation", arXiv:2410.21611, sec. 4): train a binary classifier on real
against generated samples and report its ROC AUC on samples it has not seen. 0.5: the two are
indistinguishable; 1.0: every generated sample gives itself away. Unlike W1 of a few chosen
observables, it sees the whole joint distribution, so a generator cannot pass it by matching
marginals (issue 15).

The classifier is scikit-learn's HistGradientBoostingClassifier on each sample's high-level
features: its source's scalar observables and profiles (pipeline/physics/__init__.py: energy, m and
|m| and the power spectrum of a lattice; total energy, depth, width and the longitudinal and radial
profiles of a shower) and, for a conditional model, the condition it was generated at; a source that
declares no observables is compared on its flattened values. The CaloChallenge reports a DNN on the
voxels and one on such high-level features; boosted trees on the high-level ones are chosen here
because they need no normalisation of heavy-tailed deposits (splits are invariant to monotone
transforms), no tuning or GPU, are deterministic given `random_state`, and fit in about a second on
a few thousand samples, where the same trees on 1024 raw spins took minutes and learn little from
single spins of a symmetric lattice. What the features leave out (an error that keeps every
observable right) is the W1/Fréchet metrics' and the figures' to show.
"""
from __future__ import annotations

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from pipeline.physics import Observables

# half of each class scores the classifier, half trains it (CaloChallenge: 60/20/20)
HELD_OUT = 0.5


def features(obs: Observables | None, x: np.ndarray, cond: np.ndarray | None = None) -> np.ndarray:
    """(N, F): the sample's scalar observables and profiles (its flattened values when the
    source declares none), and its condition."""
    x = np.asarray(x, np.float64)
    if obs is None:
        parts = [x.reshape(len(x), -1)]
    else:
        parts = [v.reshape(len(x), -1) for v in (*obs.scalars(x).values(), *obs.profiles(x).values())]
    if cond is not None:
        parts.append(np.asarray(cond, np.float64).reshape(len(x), -1))
    return np.concatenate(parts, axis=1)


def classifier_auc(real: np.ndarray, generated: np.ndarray, obs: Observables | None = None,
                   cond: np.ndarray | None = None, seed: int = 0,
                   generated_cond: np.ndarray | None = None) -> float:
    """ROC AUC, on a held-out half, of a classifier trained to tell `generated` from `real`
    (both in physical units, the same number used of each; `cond` their shared conditions, or
    `real`'s when `generated_cond` gives the other side its own: a second real sample drawn at
    its own conditions, the real-vs-real reference)."""
    return float(roc_auc_score(*classifier_scores(real, generated, obs, cond, seed, generated_cond)))


def classifier_scores(real: np.ndarray, generated: np.ndarray, obs: Observables | None = None,
                      cond: np.ndarray | None = None, seed: int = 0,
                      generated_cond: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The held-out half's labels (1: generated) and the classifier's scores: what `classifier_auc`
    scores, and what a bootstrap interval of it resamples (pipeline/analysis/precise.py)."""
    n = min(len(real), len(generated))
    c = None if cond is None else np.asarray(cond)[:n]
    c_gen = c if generated_cond is None else np.asarray(generated_cond)[:n]
    x = np.concatenate([features(obs, real[:n], c), features(obs, generated[:n], c_gen)])
    y = np.r_[np.zeros(n), np.ones(n)]
    x_fit, x_test, y_fit, y_test = train_test_split(x, y, test_size=HELD_OUT, stratify=y,
                                                    random_state=seed)
    # early stopping on a tenth of the fitting half: no more trees than the data supports
    clf = HistGradientBoostingClassifier(max_iter=200, early_stopping=True, validation_fraction=0.1,
                                         n_iter_no_change=10, random_state=seed)
    # one thread: OpenMP's spinning threads on shared or oversubscribed cores cost far more
    # than a few thousand rows of boosting gain from them
    with threadpool_limits(1):
        clf.fit(x_fit, y_fit)
        scores = clf.predict_proba(x_test)[:, 1]
    return y_test, scores
