"""Observables and distances against direct computations, SciPy and scikit-learn."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from pipeline import physics
from pipeline.data.store import normalization
from pipeline.sources import calo, ising2d, observables

RNG = np.random.default_rng(0)


def test_wasserstein_of_a_sample_with_itself_is_zero_and_grows_linearly_with_a_shift():
    u = RNG.normal(size=500)
    assert physics.wasserstein1(u, u) == 0.0
    for shift in (0.1, 0.5, 2.0, 7.0):
        assert physics.wasserstein1(u, u + shift) == pytest.approx(shift, rel=1e-12)


@pytest.mark.parametrize("n, m", [(300, 300), (200, 517), (1, 40)])
def test_wasserstein_equals_scipy(n, m):
    u, v = RNG.gamma(2.0, size=n), RNG.normal(1.0, 3.0, size=m)
    assert physics.wasserstein1(u, v) == pytest.approx(scipy.stats.wasserstein_distance(u, v), rel=1e-12)
    ties = RNG.integers(0, 5, size=n).astype(float), RNG.integers(0, 7, size=m).astype(float)
    assert physics.wasserstein1(*ties) == pytest.approx(scipy.stats.wasserstein_distance(*ties), rel=1e-12)


def test_frechet_distance_of_identical_sets_is_zero_and_of_gaussians_matches_the_closed_form():
    a = RNG.normal(size=(400, 6))
    assert physics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, -2.0, 0, 0, 0.5, 0])
    assert physics.frechet_distance(a, a + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-6)
    # scaled copy: Tr(S + 4S - 2 * 2S) = Tr(S)
    s = np.cov(a, rowvar=False)
    assert physics.frechet_distance(a, 2 * a) == pytest.approx(
        np.sum(a.mean(0) ** 2) + np.trace(s), rel=1e-5)


def test_frechet_distance_survives_dead_features():
    a, b = RNG.normal(size=(100, 4)), RNG.normal(size=(100, 4))
    a[:, 2] = b[:, 2] = 0.0  # a ReLU feature that never fires
    assert np.isfinite(physics.frechet_distance(a, b)) and physics.frechet_distance(a, b) > 0


def test_roc_auc_equals_sklearn_with_and_without_ties():
    labels = RNG.integers(0, 2, size=300)
    scores = RNG.normal(size=300) + labels
    assert physics.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    coarse = np.round(scores)  # many ties
    assert physics.roc_auc(coarse, labels) == pytest.approx(roc_auc_score(labels, coarse), abs=1e-12)
    assert physics.roc_auc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        physics.roc_auc([1.0, 2.0], [1, 1])


def test_ising_observables_equal_the_generator_and_a_loop_over_bonds():
    p = ising2d.Params(lattice=8, burn_in=10, decorrelation=2, chains=8)
    out = ising2d.generate(p, seed=3, chunk_index=0, start=0, n=16)
    np.testing.assert_allclose(physics.ising_magnetization(out["spins"]), out["magnetization"], atol=1e-6)
    np.testing.assert_allclose(physics.ising_energy(out["spins"]), out["energy"], atol=1e-6)
    s = out["spins"][5, 0].astype(int)
    L = s.shape[0]
    e = -sum(s[i, j] * (s[(i + 1) % L, j] + s[i, (j + 1) % L]) for i in range(L) for j in range(L))
    assert physics.ising_energy(out["spins"][5:6])[0] == pytest.approx(e / L ** 2)
    assert physics.ising_energy(np.ones((1, 4, 4))).item() == -2.0   # ground state: 2 bonds per spin


def test_to_spins_samples_probabilities_and_thresholds_without_rng():
    x = np.array([-1.0, -0.2, 0.0, 0.3, 1.0])
    np.testing.assert_array_equal(physics.to_spins(x), [-1, -1, 1, 1, 1])
    draws = physics.to_spins(np.full(20000, 0.5), np.random.default_rng(0))  # P(+1) = 0.75
    assert abs((draws == 1).mean() - 0.75) < 0.01


def test_shower_observables_equal_direct_sums():
    p = calo.Params(layers=4, eta=8, phi=8)
    d = calo.generate(p, seed=0, chunk_index=0, start=0, n=6)["energy_deposits"].astype(np.float64)
    np.testing.assert_allclose(physics.shower_total_energy(d), [x.sum() for x in d])
    prof = physics.longitudinal_profile(d)
    np.testing.assert_allclose(prof, [[x[k].sum() / x.sum() for k in range(4)] for x in d])
    np.testing.assert_allclose(prof.sum(1), 1.0)
    np.testing.assert_allclose(physics.shower_depth(d), prof @ np.arange(4))
    radial = physics.radial_profile(d)
    flat = d.sum(1)
    # the centre ring: the 4 cells whose centres are 0.707 cells from the face centre
    np.testing.assert_allclose(radial[:, 0], flat[:, 3:5, 3:5].sum((1, 2)) / flat.sum((1, 2)))
    np.testing.assert_allclose(radial.sum(1), 1.0)


def test_power_spectrum_of_a_plane_wave_peaks_at_its_wavenumber():
    n = 32
    yy, xx = np.mgrid[:n, :n]
    wave = np.cos(2 * np.pi * 5 * xx / n)[None]
    spec = physics.power_spectrum(wave)[0]
    assert spec.argmax() == 5 and spec.shape == (n // 2 + 1,)
    # Parseval: all power of the mean-free field sits in the shell k = 5 (4 of its modes... two here)
    assert spec[5] * np.sum(np.rint(np.hypot(*np.meshgrid(np.fft.fftfreq(n) * n,
                                                          np.fft.fftfreq(n) * n))) == 5) == \
        pytest.approx((wave ** 2).sum())


def test_denormalize_inverts_the_loaders_normalisation():
    import torch

    from pipeline.data.loader import _normalizer
    stats = {"min": [-1.0, 2.0], "max": [1.0, 5.0], "mean": [0.1, 3.0], "std": [0.5, 2.0]}
    x = RNG.normal(size=(4, 2, 3, 3))
    for how in ("minmax", "standard", "none"):
        norm = _normalizer(stats, how)(torch.as_tensor(x)).numpy()
        np.testing.assert_allclose(physics.denormalize(norm, normalization(stats, how)),
                                   x, atol=1e-5)


def test_every_simulated_source_declares_consistent_observables_label_and_outliers():
    """What a source module declares (pipeline/sources/__init__.py) fits what it generates:
    observables give one value per sample (profiles one curve per sample), FEATURE_LABEL names a
    scalar variable, out_of_distribution returns the source's own Params."""
    from pipeline.sources import SOURCES
    simulated = {name: mod for name, mod in SOURCES.items() if not hasattr(mod, "n_available")}
    assert set(simulated) == {"ising2d", "darcy2d", "calo", "lorenz96", "digits"}
    for name, mod in simulated.items():
        obs, p = observables(name), mod.Params()
        assert obs is mod.OBSERVABLES and isinstance(obs, physics.Observables), name
        variables = mod.variables(p)
        main = next(k for k, v in variables.items() if len(v.shape) > 1)   # the sample, not a label
        x = np.abs(RNG.normal(size=(5, *variables[main].shape)))
        x = physics.physical(obs, x * RNG.choice([-1, 1], size=x.shape))
        for k, v in obs.scalars(x).items():
            assert v.shape == (5,) and np.isfinite(v).all(), (name, k)
        for k, v in obs.profiles(x).items():
            assert v.ndim == 2 and len(v) == 5, (name, k)
        if (label := getattr(mod, "FEATURE_LABEL", None)) is not None:
            assert variables[label].shape == (), (name, label)
        if (outliers := getattr(mod, "out_of_distribution", None)) is not None:
            assert isinstance(outliers(p), mod.Params) and outliers(p) != p
    assert observables("netcdf") is None          # an importer declares nothing
    with pytest.raises(ValueError, match="known: calo"):
        observables("nope")


def _toy_source():
    """A source written as a user would add one: its module, nothing else touched."""
    import types
    from dataclasses import dataclass

    from pipeline.sources.base import Variable

    @dataclass
    class Params:
        size: int = 8
        scale: float = 1.0

    mod = types.ModuleType("toy")
    mod.Params = Params
    mod.variables = lambda p: {"field": Variable((1, p.size, p.size), "float32"),
                               "kind": Variable((), "int64")}
    mod.generate = lambda p, seed, chunk_index, start, n: {
        "field": (p.scale * np.random.default_rng([seed, chunk_index]).normal(
            size=(n, 1, p.size, p.size))).astype(np.float32), "kind": np.zeros(n, np.int64)}
    mod.OBSERVABLES = physics.Observables(lambda f: {"peak": f.reshape(len(f), -1).max(1)},
                                          physics.field_profiles)
    mod.FEATURE_LABEL = "kind"
    mod.out_of_distribution = lambda p: Params(p.size, p.scale * 3)
    return mod


def test_a_new_source_declaring_observables_is_picked_up_by_figures_and_evaluate(monkeypatch):
    from pipeline.analysis import evaluate
    from pipeline.core import figures
    from pipeline.sources import SOURCES
    toy = _toy_source()
    monkeypatch.setitem(SOURCES, "toy", toy)
    assert observables("toy") is toy.OBSERVABLES
    assert evaluate.declared("toy", "FEATURE_LABEL") == "kind"
    assert "toy" in evaluate.declaring("FEATURE_LABEL").split(", ")
    assert evaluate.declared("toy", "out_of_distribution")(toy.Params()).scale == 3.0
    real = toy.generate(toy.Params(), 0, 0, 0, 64)["field"]
    wide = toy.generate(toy.out_of_distribution(toy.Params()), 1, 0, 0, 64)["field"]
    affine = (np.array([0.5]), np.array([2.0]))                  # normalised = (x - 0.5) / 2
    images, dists = figures.physics_figures(observables("toy"), {"x": (real - 0.5) / 2}, (wide - 0.5) / 2, affine)
    peak = lambda f: f.reshape(len(f), -1).max(1)
    assert dists == {"w1/peak": pytest.approx(scipy.stats.wasserstein_distance(peak(real), peak(wide)),
                                              rel=1e-6)}
    assert set(images) == {"observables", "profiles"} and images["profiles"].dtype == np.uint8
    assert figures.physics_figures(observables("netcdf"), {"x": real}, wide) == ({}, {})


def test_compare_is_the_chain_evaluate_and_training_figures_share():
    """Denormalise -> observables -> W1 by hand equals physics.compare on physical samples."""
    p = ising2d.Params(lattice=8, burn_in=10, decorrelation=2, chains=8)
    spins = ising2d.generate(p, seed=0, chunk_index=0, start=0, n=64)["spins"].astype(np.float64)
    probs = np.clip(spins * 0.6 + RNG.normal(0, 0.3, spins.shape), -1, 1)   # a model's means in [-1, 1]
    affine = (np.array([-1.0]), np.array([2.0]))                           # minmax of -1/+1 spins
    gen = physics.physical(ising2d.OBSERVABLES, (probs + 1) / 2, affine, np.random.default_rng(0))
    assert set(np.unique(gen)) <= {-1, 1}
    cmp = physics.compare(ising2d.OBSERVABLES, spins, gen)
    for k in ("magnetization", "abs_magnetization", "energy"):
        assert cmp.distances[f"w1/{k}"] == pytest.approx(scipy.stats.wasserstein_distance(
            physics.ising_scalars(spins)[k], physics.ising_scalars(gen)[k]), rel=1e-12)
    real_prof, gen_prof = cmp.profiles()
    np.testing.assert_allclose(real_prof["power_spectrum"], physics.power_spectrum(spins))
    np.testing.assert_allclose(gen_prof["power_spectrum"], physics.power_spectrum(gen))


def _w1_by_cdfs(u, v):
    """The hand-written W1 this module had before SciPy: the integral of |F_u - F_v|."""
    u, v = np.sort(u), np.sort(v)
    pooled = np.sort(np.concatenate([u, v]))
    cdf_u = np.searchsorted(u, pooled[:-1], side="right") / len(u)
    cdf_v = np.searchsorted(v, pooled[:-1], side="right") / len(v)
    return float(np.sum(np.abs(cdf_u - cdf_v) * np.diff(pooled)))


def _auc_by_mid_ranks(scores, labels):
    """The hand-written ROC AUC this module had before scikit-learn: Mann-Whitney U, mid-ranks."""
    labels = labels.astype(bool)
    ranks = scipy.stats.rankdata(scores)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_library_w1_and_auc_keep_the_values_of_the_hand_written_ones():
    for n, m in ((300, 300), (200, 517), (1, 40)):
        u, v = RNG.gamma(2.0, size=n), np.round(RNG.normal(1.0, 3.0, size=m))   # ties in v
        assert physics.wasserstein1(u, v) == pytest.approx(_w1_by_cdfs(u, v), rel=1e-12, abs=1e-15)
        labels = RNG.integers(0, 2, size=n + m)
        scores = np.round(RNG.normal(size=n + m) + labels, 1)                   # ties
        assert physics.roc_auc(scores, labels) == pytest.approx(_auc_by_mid_ranks(scores, labels),
                                                                abs=1e-12)
    assert physics.wasserstein1([0.0, 1.0], [0.5]) == 0.5                  # exact: |0.5| twice, halved
    with pytest.raises(ValueError, match="empty sample"):
        physics.wasserstein1([], [1.0])
