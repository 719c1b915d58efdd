"""Thermodynamic curves against configurations whose values are known: hand-built lattices, and
Monte Carlo samples of the pipeline's own Ising source (|m| -> 1 cold, C peaking at T_c)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.physics import thermo
from pipeline.sources import ising2d


@pytest.fixture(scope="module")
def monte_carlo():
    """16 x 16 lattices at 11 temperatures over [1.5, 3.5], 80 decorrelated samples each."""
    p = ising2d.Params(lattice=16, t_min=1.5, t_max=3.5, n_temperatures=11, chains=44,
                       burn_in=300, decorrelation=10)
    out = ising2d.generate(p, seed=0, chunk_index=0, start=0, n=44 * 20)
    return out["spins"], out["temperature"]


def test_ordered_and_checkerboard_lattices_give_the_exact_values():
    up, down = np.ones((1, 1, 8, 8), np.int8), -np.ones((1, 1, 8, 8), np.int8)
    board = np.where(np.add.outer(np.arange(8), np.arange(8)) % 2 == 0, 1, -1)[None, None]
    c = thermo.curves(np.concatenate([up, down, board, -board]), np.array([1.0, 1.0, 3.0, 3.0]))
    np.testing.assert_allclose(c["T"], [1.0, 3.0])
    np.testing.assert_allclose(c["abs_magnetization"], [1.0, 0.0])
    np.testing.assert_allclose(c["energy"], [-2.0, 2.0])   # every bond satisfied / frustrated
    np.testing.assert_allclose(c["specific_heat"], [0.0, 0.0])
    np.testing.assert_allclose(c["count"], [2, 2])


def test_fluctuations_follow_the_per_spin_formulas():
    """C = N Var(e) / T^2 and chi = N Var(|m|) / T, computed here by hand for two lattices."""
    a = np.ones((1, 1, 4, 4), np.int8)
    b = a.copy()
    b[0, 0, 0, 0] = -1            # one flipped spin: e = (-32 + 8) / 16, |m| = 14 / 16
    c = thermo.curves(np.concatenate([a, b]), np.array([2.0, 2.0]))
    e, m = np.array([-2.0, -1.5]), np.array([1.0, 0.875])
    assert c["specific_heat"][0] == pytest.approx(16 * e.var() / 4.0)
    assert c["susceptibility"][0] == pytest.approx(16 * m.var() / 2.0)


def test_monte_carlo_curves_order_cold_and_peak_at_the_critical_temperature(monte_carlo):
    spins, t = monte_carlo
    c = thermo.curves(spins, t)
    assert len(c["T"]) == 11 and (c["count"] == 80).all()
    assert c["abs_magnetization"][0] > 0.97          # Onsager: m(1.5) = 0.986
    assert c["abs_magnetization"][-1] < 0.2          # disordered, |m| ~ 1/L
    assert c["energy"][0] < -1.9 and c["energy"][-1] > -0.8
    assert np.all(np.diff(c["energy"]) > 0)          # <E> rises with T
    t_peak = c["T"][np.argmax(c["specific_heat"])]
    assert abs(t_peak - thermo.T_CRITICAL) < 0.25, t_peak
    t_chi = c["T"][np.argmax(c["susceptibility"])]
    assert thermo.T_CRITICAL - 0.1 < t_chi < thermo.T_CRITICAL + 0.45, t_chi


def test_curve_errors_vanish_for_the_same_samples_and_grow_for_wrong_ones(monte_carlo):
    spins, t = monte_carlo
    real = thermo.curves(spins, t)
    assert all(v == 0.0 for v in thermo.curve_errors(real, real).values())
    flipped = thermo.curves(np.where(np.random.default_rng(0).random(spins.shape) < 0.1,
                                     -spins, spins), t)  # 10 % noise: less order, more energy
    errors = thermo.curve_errors(real, flipped)
    assert errors["thermo/energy"] > 0.1 and errors["thermo/abs_magnetization"] > 0.05
    with pytest.raises(ValueError, match="different temperature grids"):
        thermo.curve_errors(real, thermo.curves(spins[:80], t[:80] + 0.05))


def test_spin_rule_draws_from_probabilities_and_keeps_exact_spins():
    rng = np.random.default_rng(0)
    exact = np.array([-1.0, 1.0, 1.0, -1.0])
    np.testing.assert_array_equal(thermo.spins_from_output(exact, rng), exact)
    half = thermo.spins_from_output(np.zeros(20_000), rng)   # P(+1) = 1/2, not all +1
    assert abs(half.mean()) < 0.03


def test_figure_has_one_panel_per_quantity(monte_carlo):
    spins, t = monte_carlo
    c = thermo.curves(spins, t)
    fig = thermo.curve_figure(c, c, held_out=[2.3])
    assert [ax.get_title() for ax in fig.axes] == list(thermo.QUANTITIES.values())
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    assert list(lines["held-out T"].get_xdata()) == pytest.approx([2.3])   # drawn hollow
    assert len(lines["generated"].get_xdata()) == 10


def test_held_out_temperatures_are_the_midpoints_of_the_training_grid():
    from benchmarks.quality import held_out_temperatures
    grid = np.linspace(1.6, 3.2, 16)                  # configs/data/ising2d.yaml
    held = held_out_temperatures()
    np.testing.assert_allclose(held, (grid[:-1] + grid[1:]) / 2)
    assert np.abs(held[:, None] - grid).min() > 0.05  # none is a training temperature


def test_rewriting_the_quality_table_keeps_the_study_section(tmp_path, monkeypatch):
    from benchmarks import quality
    monkeypatch.setattr(quality, "OUT", tmp_path)
    study = f"{quality.STUDIES_MARK}\n## a study\n| measured | rows |\n"
    (tmp_path / "quality.md").write_text("# old table\n\n" + study)
    meta = {"date": "d", "machine": "m", "versions": "v", "cpu_budget_s": 60.0}
    quality.write([], meta)
    text = (tmp_path / "quality.md").read_text()
    assert "# old table" not in text and text.startswith("# Quality after a fixed CPU budget")
    assert text.endswith(study)
