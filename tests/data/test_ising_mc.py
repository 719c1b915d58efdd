"""The Ising Monte Carlo behind the source and the evaluation's reference (issue #23): the two
algorithms sample one distribution, tau_int is estimated right, and a store's samples share no
chain."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import physics
from pipeline.data.sources import ising2d, ising_mc


def test_swendsen_wang_and_metropolis_reach_the_same_equilibrium():
    """100 independent 16 x 16 lattices at each of T = 2.0, T_c and 2.8: Swendsen-Wang after 60
    sweeps and Metropolis after 800 (> 50 tau) have the same mean energy and mean |m| at each T
    within 4 standard errors of the difference."""
    rng = np.random.default_rng(1)
    temps = np.repeat([2.0, 2.27, 2.8], 100)
    sw = ising_mc.equilibrium(temps, 16, rng, "swendsen_wang", 60)
    mh = ising_mc.equilibrium(temps, 16, rng, "metropolis", 800)
    for f in (physics.ising_energy, lambda s: np.abs(physics.ising_magnetization(s))):
        for at in np.split(np.arange(len(temps)), 3):
            a, b = f(sw[at]), f(mh[at])
            se = np.hypot(a.std(), b.std()) / np.sqrt(len(a))
            assert abs(a.mean() - b.mean()) < 4 * se, (temps[at[0]], a.mean(), b.mean(), se)


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
