"""The Ising Monte Carlo behind the source and the evaluation's reference (issue #23): the two
algorithms sample one distribution, tau_int is estimated right, and a store's samples share no
chain."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import physics
from pipeline.sources import ising2d, ising_mc


def assert_same_means(x: np.ndarray, y: np.ndarray, temps: np.ndarray, groups: int = 3) -> None:
    """Two samplers' lattices (one per entry of `temps`, in `groups` equal runs of one T each)
    have the same mean energy and mean |m| at each T, within 4 standard errors of the difference."""
    for f in (physics.ising_energy, lambda lat: np.abs(physics.ising_magnetization(lat))):
        for at in np.split(np.arange(len(temps)), groups):
            a, b = f(x[at]), f(y[at])
            se = np.hypot(a.std(), b.std()) / np.sqrt(len(a))
            assert abs(a.mean() - b.mean()) < 4 * se, (temps[at[0]], a.mean(), b.mean(), se)

def test_swendsen_wang_and_metropolis_reach_the_same_equilibrium():
    """100 independent 16 x 16 lattices at each of T = 2.0, T_c and 2.8: Swendsen-Wang after 60
    sweeps and Metropolis after 800 (> 50 tau) have the same mean energy and mean |m| at each T
    within 4 standard errors of the difference."""
    rng = np.random.default_rng(1)
    temps = np.repeat([2.0, 2.27, 2.8], 100)
    sw = ising_mc.equilibrium(temps, 16, rng, "swendsen_wang", 60)
    mh = ising_mc.equilibrium(temps, 16, rng, "metropolis", 800)
    assert_same_means(sw, mh, temps)


def test_integrated_time_of_an_ar1_process():
    """x_t = rho x_t-1 + noise has tau_int = (1 + rho) / (1 - rho) = 9 for rho = 0.8."""
    rng = np.random.default_rng(0)
    x = np.zeros((16, 5000))
    for k in range(1, x.shape[1]):
        x[:, k] = 0.8 * x[:, k - 1] + rng.normal(size=16)
    assert abs(ising_mc.integrated_time(x) - 9.0) < 1.0
    assert abs(ising_mc.integrated_time(rng.normal(size=(4, 5000))) - 1.0) < 0.2


def test_metropolis_slows_down_at_the_critical_point_and_swendsen_wang_does_not():
    """tau_int of |m| at T_c on 16 x 16: Metropolis's is several times Swendsen-Wang's."""
    rng = np.random.default_rng(0)
    tau = {a: ising_mc.integrated_time(ising_mc.series(a, ising_mc.T_CRITICAL, 16, 16, 400, rng,
                                                       burn_in=100)["abs_magnetization"])
           for a in ising_mc.ALGORITHMS}
    assert tau["metropolis"] > 3 * tau["swendsen_wang"], tau


def lag_one(spins: np.ndarray) -> float:
    """Correlation of the magnetisation of consecutive lattices."""
    m = spins[:, 0].astype(np.float64).mean(axis=(1, 2))
    return float(np.corrcoef(m[1:], m[:-1])[0, 1])


def test_every_sample_ends_its_own_chain_when_chains_cover_the_chunk():
    """With chains >= the chunk's samples no two lattices share a chain, so a split of them
    shares none either: at T_c consecutive lattices' m are uncorrelated (|r| < 0.3 with 128, 0.09
    one standard error), where samples of one Metropolis chain 2 sweeps apart correlate at > 0.5."""
    p = ising2d.Params(lattice=16, t_min=2.27, t_max=2.27, n_temperatures=1, burn_in=200)
    one_chain = ising2d.Params(**{**p.__dict__, "chains": 1, "decorrelation": 2})
    own_chains = ising2d.Params(**{**p.__dict__, "chains": 128})
    assert lag_one(ising2d.generate(one_chain, 0, 0, 0, 128)["spins"]) > 0.5
    assert abs(lag_one(ising2d.generate(own_chains, 0, 0, 0, 128)["spins"])) < 0.3


def test_an_unknown_algorithm_is_named():
    with pytest.raises(ValueError, match="algorithm 'heatbath': expected one of metropolis, swendsen_wang"):
        ising_mc.chain("heatbath", np.array([2.0]), 8)


def exact_4x4(temperature: float) -> dict[float, float]:
    """The Boltzmann probability of each energy per spin of the 4 x 4 periodic lattice, by
    enumerating its 2^16 configurations."""
    states = ((np.arange(2**16)[:, None] >> np.arange(16)) & 1).astype(np.int8) * 2 - 1
    e = np.round(physics.ising_energy(states.reshape(-1, 4, 4)), 6)
    w = np.exp(-16 * e / temperature)
    levels = np.unique(e)
    return {float(k): float(w[e == k].sum() / w.sum()) for k in levels}


@pytest.mark.parametrize("temperature", [1.8, ising_mc.T_CRITICAL, 3.0])
def test_wolff_samples_the_exact_boltzmann_distribution_of_a_4x4_lattice(temperature):
    """4000 Wolff chains of 40 cluster flips from the source's start: the histogram of their
    final energies matches the exact distribution (chi-square p > 0.001 with this seed; a bond
    probability of 1 - exp(-1 / T) in place of 1 - exp(-2 / T) gives p < 1e-10)."""
    from scipy.stats import chisquare
    rng = np.random.default_rng(2)
    t = np.full(4000, temperature)
    s = ising_mc.start(t, 4, rng)
    mc = ising_mc.Wolff(t, 4)
    for _ in range(40):
        mc.sweep(s, rng)
    exact = exact_4x4(temperature)
    e = np.round(physics.ising_energy(s), 6)
    levels = [k for k, p in exact.items() if p * len(t) >= 5]   # chi-square needs >= 5 expected
    seen = np.array([np.sum(e == k) for k in levels] + [np.sum(~np.isin(e, levels))], float)
    want = np.array([exact[k] for k in levels] + [1 - sum(exact[k] for k in levels)]) * len(t)
    keep = want > 0
    assert chisquare(seen[keep], want[keep]).pvalue > 1e-3, (temperature, seen, want)


def test_wolff_flips_whole_clusters_of_one_sign_and_reaches_swendsen_wangs_equilibrium():
    """Each step flips one connected cluster of equal spins per lattice (its sizes are the sites
    that changed); 100 16 x 16 lattices at T = 2.0, T_c and 2.8 after 200 flips have Swendsen-Wang's
    mean energy and |m| within 4 standard errors."""
    rng = np.random.default_rng(4)
    temps = np.repeat([2.0, ising_mc.T_CRITICAL, 2.8], 100)
    s = ising_mc.start(temps, 16, rng)
    mc = ising_mc.Wolff(temps, 16)
    for _ in range(200):
        before = s.copy()
        mc.sweep(s, rng)
        changed = before != s
        assert np.array_equal(changed.sum(axis=(1, 2)), mc.sizes) and mc.sizes.min() >= 1
        assert np.all(np.abs(np.where(changed, before, 0).sum(axis=(1, 2))) == mc.sizes)
    sw = ising_mc.equilibrium(temps, 16, rng, "swendsen_wang", 60)
    assert_same_means(s, sw, temps)


def test_wolff_decorrelates_in_a_few_sweeps_equivalent_at_the_critical_point():
    """tau_int of |m| at T_c on 16 x 16, in sweeps (cluster flips x mean cluster size / L^2):
    Wolff's is several times below Metropolis's."""
    rng = np.random.default_rng(0)
    init = ising_mc.equilibrium(np.full(16, ising_mc.T_CRITICAL), 16, rng, "swendsen_wang", 40)
    w = ising_mc.series("wolff", ising_mc.T_CRITICAL, 16, 16, 400, rng, initial=init)
    sweeps_per_flip = w["cluster_size"].mean() / 16**2
    tau_wolff = ising_mc.integrated_time(w["abs_magnetization"]) * sweeps_per_flip
    tau_metropolis = ising_mc.integrated_time(ising_mc.series(
        "metropolis", ising_mc.T_CRITICAL, 16, 16, 400, rng, burn_in=100)["abs_magnetization"])
    assert 0.2 < sweeps_per_flip < 1 and tau_metropolis > 3 * tau_wolff, (tau_wolff, tau_metropolis)
