"""The CaloChallenge classifier test (pipeline/analysis/two_sample_classifier.py, issue 15) on real Monte Carlo
lattices, and its place in `hpcforge evaluate`."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis.two_sample_classifier import classifier_auc
from pipeline.sources import ising2d

# 512 + 512 independent lattices: 256 of each class score the classifier, where the AUC of two
# samples of one distribution has a standard deviation of about 0.026; 0.1 is four of them.
REAL_VS_REAL_BAND = 0.1


P = ising2d.Params(lattice=16, burn_in=60, decorrelation=10, chains=256)


@pytest.fixture(scope="module")
def samples() -> tuple[dict, dict]:
    """Two independent Metropolis samples of the same temperature mix (different seeds); two
    samples per chain, so that held-out lattices are not near-copies of fitted ones."""
    return tuple(ising2d.generate(P, seed, 0, 0, 512) for seed in (1, 2))


@pytest.fixture(scope="module")
def lattices(samples) -> tuple[np.ndarray, np.ndarray]:
    return tuple(s["spins"].astype(np.float64) for s in samples)


def test_real_against_real_is_near_one_half_and_the_same_for_the_same_seed(lattices):
    a, b = lattices
    auc = classifier_auc(a, b, ising2d.OBSERVABLES, seed=0)
    assert abs(auc - 0.5) < REAL_VS_REAL_BAND, auc
    assert classifier_auc(a, b, ising2d.OBSERVABLES, seed=0) == auc


def test_a_second_real_sample_at_its_own_temperatures_is_the_reference(samples, lattices):
    """The real-vs-real reference of a conditional model: each side carries its own temperatures.
    Right, it is near 0.5; the same lattices paired with shuffled temperatures (a generator that
    ignores its condition) are found out, so the second side's conditions are really used."""
    (a, b), (ta, tb) = lattices, (s["temperature"] for s in samples)
    auc = classifier_auc(a, b, ising2d.OBSERVABLES, ta, seed=0, generated_cond=tb)
    assert abs(auc - 0.5) < REAL_VS_REAL_BAND, auc
    shuffled = np.random.default_rng(0).permutation(tb)
    assert classifier_auc(a, b, ising2d.OBSERVABLES, ta, seed=0, generated_cond=shuffled) > 0.8


def test_an_obviously_wrong_generator_is_told_apart(lattices):
    """Independent random spins (an untrained sampler's coin flips: infinite temperature) and
    perfectly ordered lattices at every temperature are both found out."""
    a, b = lattices
    rng = np.random.default_rng(0)
    coin_flips = np.where(rng.random(b.shape) < 0.5, 1.0, -1.0)
    ordered = np.where(rng.random((len(b), 1, 1, 1)) < 0.5, 1.0, -1.0) * np.ones_like(b)
    assert classifier_auc(a, coin_flips, ising2d.OBSERVABLES, seed=0) > 0.95
    assert classifier_auc(a, ordered, ising2d.OBSERVABLES, seed=0) > 0.95


def test_without_observables_it_compares_the_raw_values(lattices):
    a, b = (x[..., :4, :] for x in lattices)  # 64 values a sample: the raw path is per value
    shifted = b + 0.5  # every value off by the same amount: single values give it away
    assert classifier_auc(a, shifted, None, seed=0) > 0.95


@pytest.mark.slow  # vae_run trains and evaluates a VAE through the CLI (shared with test_evaluate)
def test_evaluate_reports_the_classifier_auc_of_a_generative_checkpoint(vae_run):
    _, _, result = vae_run
    m = result["metrics"]
    assert 0.0 <= m["classifier/auc"] <= 1.0
    assert m["classifier/samples"] == 2 * m["samples"]  # the whole split against as many generated
    assert 0.0 <= m["classifier/auc_reference"] <= 1.0
    assert (f"classifier AUC (0.5 is perfect): {m['classifier/auc']:.3f}, "
            f"real vs real {m['classifier/auc_reference']:.3f}") in result["notes"]
