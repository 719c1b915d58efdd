"""Figures: the physics figures the trainer logs, and the plain plots, as real PNGs/arrays."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from pipeline import physics
from pipeline.core import figures
from pipeline.data.store import normalization
from pipeline.sources import calo, ising2d, observables


def _drawn(img: np.ndarray) -> bool:
    return img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and len(np.unique(img)) > 20


def test_physics_figures_of_ising_in_normalised_space_give_w1_of_the_observables():
    spins = ising2d.generate(ising2d.Params(lattice=8, burn_in=10, chains=8), 0, 0, 0, 32)["spins"]
    real = (spins + 1) / 2                                  # the loader's minmax space
    generated = np.random.default_rng(1).random(real.shape)  # a useless generator
    affine = normalization({"min": [-1.0], "max": [1.0]}, "minmax")
    images, dists = figures.physics_figures(observables("ising2d"), {"x": real}, generated, affine)
    assert set(images) == {"observables", "profiles"} and all(map(_drawn, images.values()))
    # the one spin rule (physics.physical): drawn with P(+1) = its output, never thresholded
    gen_spins = physics.to_spins(2 * generated - 1, np.random.default_rng(0))
    assert dists["w1/energy"] == pytest.approx(physics.wasserstein1(
        physics.ising_energy(spins), physics.ising_energy(gen_spins)))
    assert dists["w1/energy"] > 0.5        # ordered/critical lattices vs independent coin flips
    same, dists_same = figures.physics_figures(observables("ising2d"), {"x": real}, real, affine)
    assert all(v == 0 for v in dists_same.values())


def test_physics_figures_of_showers_in_physical_units():
    d = calo.generate(calo.Params(layers=4, eta=8, phi=8), 0, 0, 0, 24)["energy_deposits"]
    images, dists = figures.physics_figures(observables("calo"), {"x": d}, d * 1.5)
    assert set(dists) == {"w1/total_energy", "w1/shower_depth", "w1/shower_width"}
    assert dists["w1/total_energy"] == pytest.approx(0.5 * np.abs(d.sum((1, 2, 3))).mean(), rel=1e-6)
    assert dists["w1/shower_depth"] == pytest.approx(0, abs=1e-6)   # scaling keeps the shape (float32)
    assert _drawn(images["profiles"])


def test_confusion_matrix_is_ticked_with_the_class_names():
    y, p = np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1])
    ax = figures.confusion_matrix(y, p, 3, ["eplus", "gamma", "piplus"]).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["eplus", "gamma", "piplus"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["eplus", "gamma", "piplus"]
    ax = figures.confusion_matrix(y, p, 3).axes[0]                    # no table: the labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]


def test_predicted_vs_true_draws_the_points_and_the_diagonal():
    t = np.linspace(0, 10, 50)
    ax = figures.predicted_vs_true(t + 1, t, "energy", 0.9).axes[0]
    assert ax.get_xlabel() == "true energy" and ax.get_ylabel() == "predicted energy"
    assert len(ax.collections[0].get_offsets()) == 50 and "R\u00b2 0.900" in ax.get_title()


def test_confusion_counts_equal_sklearn_and_plots_render():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    np.testing.assert_array_equal(figures.confusion_counts(y, p, 4), confusion_matrix(y, p))
    assert figures.to_png(figures.confusion_matrix(y, p, 4))[:4] == b"\x89PNG"
    rows = [{"_step": i, "train/model/loss": 1 / (i + 1), "val/loss": 2 / (i + 1)} for i in range(5)]
    assert _drawn(figures.to_array(figures.loss_curves({"a": rows, "b": rows})))
    assert _drawn(figures.to_array(figures.field_panels(rng.random((2, 1, 8, 8)), rng.random((2, 1, 8, 8)))))
    assert _drawn(figures.to_array(figures.forecast_figure(rng.random((10, 4)), rng.random((10, 4)))))
