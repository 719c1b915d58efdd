"""The precise evaluation of a temperature-conditional generator (issue #23): per-temperature W1
against independent reference chains, intervals that hold across re-evaluations, controls and the
verdict."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis import precise
from pipeline.sources import ising2d, ising_mc

P = ising2d.Params(lattice=16, t_min=1.8, t_max=2.8, n_temperatures=4)
PROTOCOL = precise.Protocol(ising2d.temperatures(P), per_t=96, boot=100)


def equilibrium(cond: np.ndarray, seed: int) -> np.ndarray:
    return ising2d.reference(P, cond, seed)


def few_sweeps(cond: np.ndarray, seed: int, sweeps: int = 3) -> np.ndarray:
    """A poor sampler: the source's start and a few Metropolis sweeps."""
    rng = np.random.default_rng(seed)
    s = ising_mc.start(cond, 16, rng)
    mc = ising_mc.Metropolis(cond, 16)
    for _ in range(sweeps):
        mc.sweep(s, rng)
    return s[:, None]


@pytest.fixture(scope="module")
def reference():
    return precise.reference(equilibrium, PROTOCOL, None, {})


def test_protocol_adds_held_out_midpoints_between_training_temperatures():
    t = PROTOCOL.temperatures
    assert len(t) == 7 and np.allclose(t[1::2], (t[:-2:2] + t[2::2]) / 2)
    assert PROTOCOL.is_held_out(t).tolist() == [False, True] * 3 + [False]


def test_the_floor_scores_one_and_an_independent_sampler_stays_near_it(reference):
    """B against A is near 1 (its floor averages random halvings of A and B); a third
    independent set C is a perfect generator: its interval covers 1, its AUC's covers 0.5, and
    the verdict says met."""
    a, b = reference
    assert all(0.7 < v[0] < 1.4 for v in precise.floor_scores(a, b, PROTOCOL).ratio.values())
    c = precise.score("C", equilibrium(PROTOCOL.conditions(), 99), a, b, PROTOCOL)
    for k in precise.VERDICT:
        value, lo, hi = c.ratio[k]
        assert lo <= 1.0 <= hi and value < 1.6, (k, c.ratio[k])
    assert c.auc[1] <= 0.5 <= c.auc[2]
    assert precise.verdict(c, []).startswith("met")


def test_a_poor_sampler_is_told_apart_and_its_re_evaluations_agree(reference):
    """Three sweeps from the source's start: W1 several times the floor, not met, beaten clearly
    by an equilibrium sampler; two evaluations with different sampling seeds fall inside each
    other's intervals (the spread the issue found was 1.09x to 2.53x for one checkpoint)."""
    a, b = reference
    cond = PROTOCOL.conditions()
    poor = [precise.score("poor", few_sweeps(cond, seed), a, b, PROTOCOL) for seed in (1, 2)]
    good = precise.score("good", equilibrium(cond, 98), a, b, PROTOCOL)
    for k in precise.VERDICT:
        (v1, lo1, hi1), (v2, lo2, hi2) = poor[0].ratio[k], poor[1].ratio[k]
        assert v1 > 2.5 and lo1 <= v2 <= hi1 and lo2 <= v1 <= hi2, (k, poor[0].ratio, poor[1].ratio)
        assert precise.beats(good, poor[0], k) and not precise.beats(poor[0], good, k)
    line = precise.verdict(poor[0], [good])
    assert line.startswith("not met") and "beats 'good' clearly on nothing" in line


def test_reference_is_cached_by_its_key(tmp_path, reference):
    calls = []

    def counted(cond, seed):
        calls.append(seed)
        return equilibrium(cond, seed)
    store = tmp_path / "x.zarr"
    first = precise.reference(counted, PROTOCOL, store, {"params": 1})
    again = precise.reference(counted, PROTOCOL, store, {"params": 1})
    assert len(calls) == 2 and all(np.array_equal(x, y) for x, y in zip(first, again))
    precise.reference(counted, PROTOCOL, store, {"params": 2})      # other data: made anew
    assert len(calls) == 4 and len(list(tmp_path.glob("x.zarr.reference-*.npz"))) == 2


def test_acceptance_and_effective_sample_size_per_temperature_by_hand():
    """Three chains, two proposals each (three draws), two at T = 2 and one at T = 3, and a T
    with no chain. At T = 2: 3 of 4 proposals accepted; weights 1, 1, 1, 1, 3, 1 give
    ESS / N = 8^2 / (6 * 14) = 0.762. At T = 3: equal weights, ESS / N = 1, none accepted."""
    t = np.array([2.0, 3.0, 2.0])
    accepted = np.array([1, 0, 2])
    log_w = np.log(np.array([[1.0, 5.0, 1.0], [1.0, 5.0, 3.0], [1.0, 5.0, 1.0]]))
    out = precise.mh_per_temperature(t, accepted, log_w, 2, np.array([2.0, 2.5, 3.0]))
    assert np.allclose(out["acceptance"], [0.75, np.nan, 0.0], equal_nan=True)
    assert np.allclose(out["ess_per_n"], [64 / 84, np.nan, 1.0], equal_nan=True)
