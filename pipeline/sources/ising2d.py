"""2-D Ising model on an L x L periodic lattice, sampled by checkerboard Metropolis or
Swendsen-Wang cluster sweeps (pipeline/sources/ising_mc.py).

H = -J sum_<ij> s_i s_j with J = 1, k_B = 1; the critical temperature is
T_c = 2 / ln(1 + sqrt 2) ~= 2.269 (Onsager 1944). Each chunk runs `chains` independent chains, at
one temperature each (chain c of chunk k at temperature index (k * chains + c) % n_temperatures, so
every chunk spans the temperature range), vectorised over chains with NumPy; a chain is burned in,
then sampled every `decorrelation` sweeps. Below T_c chains start ordered (random global sign) so
that a short burn-in does not freeze domain walls; above, from random spins.

With `chains` >= `chunk_size` every sample is the end of its own chain (configs/data/ising2d.yaml):
no two samples share a chain, so the train, val and test splits are independent (issue #23; samples
of one Metropolis chain 20 sweeps apart correlate at 0.6 at L = 32), and `burn_in` is then the
whole cost of a sample. `reference` draws the independent samples `hpcforge evaluate` compares
against, from chains seeded apart from the store's.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from pipeline import physics
from pipeline.sources import ising_mc
from pipeline.sources.base import Variable, chunk_rng

T_CRITICAL = 2.0 / math.log(1.0 + math.sqrt(2.0))

# What pipeline.analysis.evaluate and the training figures read from a source
# (pipeline/sources/__init__.py)
OBSERVABLES = physics.Observables(physics.ising_scalars, physics.field_profiles, binary=True)
FEATURE_LABEL = "temperature"   # the variable the Fréchet feature CNN learns to predict
# the observable whose extremes end a latent interpolation (pipeline/analysis/latent.py): an
# ordered and a disordered lattice, so the path crosses the transition
LATENT_ENDPOINTS = "abs_magnetization"
# Swendsen-Wang sweeps per reference lattice from the source's start: tau_int of |m| and E is a
# few SW sweeps at every T of the grid up to L = 64 (benchmarks/ising_speed.py measures it), so
# 60 sweeps is more than 10 tau
REFERENCE_BURN_IN = 60


@dataclass
class Params:
    lattice: int = 32           # L; spins per sample L * L
    t_min: float = 1.6          # temperatures span T_c ~= 2.269 evenly
    t_max: float = 3.2
    n_temperatures: int = 16    # evenly spaced in [t_min, t_max]
    chains: int = 32            # independent chains per chunk (vectorised)
    burn_in: int = 300          # sweeps before the first sample
    decorrelation: int = 20     # sweeps between consecutive samples of one chain
    algorithm: str = "metropolis"  # or "swendsen_wang" (cluster sweeps: ising_mc.py)


def variables(p: Params) -> dict[str, Variable]:
    return {
        "spins": Variable((1, p.lattice, p.lattice), "int8", "spin configuration, +1/-1"),
        "temperature": Variable((), "float32", "temperature T (J/k_B)"),
        "phase": Variable((), "int8", "1 if T < T_c (ordered), else 0"),
        "magnetization": Variable((), "float32", "magnetisation per spin, sum(s) / L^2"),
        "energy": Variable((), "float32", "energy per spin, H / L^2"),
    }


def temperatures(p: Params) -> np.ndarray:
    return np.linspace(p.t_min, p.t_max, p.n_temperatures)


def out_of_distribution(p: Params) -> Params:
    """Lattices hotter than any training temperature, T in [t_max + 1, t_max + 3]: the labelled
    outliers of `hpcforge evaluate`'s anomaly ROC AUC."""
    return dataclasses.replace(p, t_min=p.t_max + 1.0, t_max=p.t_max + 3.0)


def conditional_curves(spins: np.ndarray, temperatures: np.ndarray) -> dict[str, np.ndarray]:
    """<|m|>, <E>, C and chi per temperature (pipeline.physics.thermo): what `hpcforge evaluate`
    compares for a temperature-conditional generator (its batch["cond"] is the temperature)."""
    from pipeline.physics import thermo  # (matplotlib: only when evaluating, not when preparing)
    return thermo.curves(spins, temperatures)


def reference(p: Params, temps: np.ndarray, seed: int) -> np.ndarray:
    """Independent equilibrium lattices (N, 1, L, L) int8, one per temperature in `temps`, each
    from its own Swendsen-Wang chain `REFERENCE_BURN_IN` sweeps long: the reference and the
    real-vs-real floor of a temperature-conditional generator (pipeline/analysis/precise.py). The
    seed's stream is disjoint from every chunk's (chunk_rng(seed, k) uses two words, this three)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x2EF, 23]))
    return ising_mc.equilibrium(np.asarray(temps, np.float64), p.lattice, rng,
                                "swendsen_wang", REFERENCE_BURN_IN)[:, None]


def initial_state(p: Params, temps: np.ndarray, seed: int) -> np.ndarray:
    """The source's start (ordered below T_c, random above) (N, 1, L, L) int8: the no-network
    control's starting point."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x57A, 23]))
    return ising_mc.start(np.asarray(temps, np.float64), p.lattice, rng)[:, None]


def generate(p: Params, seed: int, chunk_index: int, start: int, n: int
             ) -> dict[str, np.ndarray]:
    """`n` configurations from `chains` chains spread over the temperature grid."""
    rng = chunk_rng(seed, chunk_index)
    chains = min(p.chains, n)
    per_chain = -(-n // chains)  # ceil
    t = temperatures(p)[(chunk_index * p.chains + np.arange(chains)) % p.n_temperatures]
    s = ising_mc.start(t, p.lattice, rng)
    mc = ising_mc.chain(p.algorithm, t, p.lattice)
    for _ in range(p.burn_in):
        mc.sweep(s, rng)
    out = []
    for k in range(per_chain):
        if k:
            for _ in range(p.decorrelation):
                mc.sweep(s, rng)
        out.append(s.copy())
    spins = np.concatenate(out)[:n]  # (n, L, L), chains interleaved by sample time
    t_sample = np.tile(t, per_chain)[:n]
    return {
        "spins": spins[:, None].astype(np.int8),
        "temperature": t_sample.astype(np.float32),
        "phase": (t_sample < T_CRITICAL).astype(np.int8),
        "magnetization": spins.mean(axis=(1, 2)).astype(np.float32),
        "energy": physics.ising_energy(spins).astype(np.float32),
    }
