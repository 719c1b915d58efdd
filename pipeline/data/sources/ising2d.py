"""2-D Ising model on an L x L periodic lattice, sampled by checkerboard Metropolis.

H = -J sum_<ij> s_i s_j with J = 1, k_B = 1; the critical temperature is
T_c = 2 / ln(1 + sqrt 2) ~= 2.269 (Onsager 1944). Each chunk runs `chains` independent chains, at one
temperature each (chain c of chunk k at temperature index (k * chains + c) % n_temperatures, so every
chunk spans the temperature range), vectorised over chains with NumPy; a chain is burned in, then sampled every
`decorrelation` sweeps. Below T_c chains start ordered (random global sign) so that a short burn-in
does not freeze domain walls; above, from random spins.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from pipeline import physics
from pipeline.data.sources.base import Variable, chunk_rng

T_CRITICAL = 2.0 / math.log(1.0 + math.sqrt(2.0))

# What pipeline.evaluate and the training figures read from a source (pipeline/data/sources/__init__.py)
OBSERVABLES = physics.Observables(physics.ising_scalars, physics.field_profiles, binary=True)
FEATURE_LABEL = "temperature"   # the variable the Fréchet feature CNN learns to predict
# the observable whose extremes end a latent interpolation (pipeline/latent.py): an ordered and a
# disordered lattice, so the path crosses the transition
LATENT_ENDPOINTS = "abs_magnetization"


@dataclass
class Params:
    lattice: int = 32           # L; spins per sample L * L
    t_min: float = 1.6          # temperatures span T_c ~= 2.269 evenly
    t_max: float = 3.2
    n_temperatures: int = 16    # evenly spaced in [t_min, t_max]
    chains: int = 32            # independent chains per chunk (vectorised)
    burn_in: int = 300          # sweeps before the first sample
    decorrelation: int = 20     # sweeps between consecutive samples of one chain


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
    """<|m|>, <E>, C and chi per temperature (pipeline.thermo): what `hpcforge evaluate` compares
    for a temperature-conditional generator (its batch["cond"] is the temperature)."""
    from pipeline import thermo  # (matplotlib: only when evaluating, not when preparing)
    return thermo.curves(spins, temperatures)


def _sweep(s: np.ndarray, table: np.ndarray, masks: tuple[np.ndarray, np.ndarray],
           rng: np.random.Generator) -> None:
    """One Metropolis sweep in place: update the two checkerboard sublattices in turn.

    `table[c, k]` is chain c's acceptance probability min(1, exp(-dE / T_c)) for dE = 4k - 8.
    """
    chain = np.arange(s.shape[0])[:, None, None]
    for mask in masks:
        nb = np.roll(s, 1, 1) + np.roll(s, -1, 1) + np.roll(s, 1, 2) + np.roll(s, -1, 2)
        d_e = 2 * s * nb                      # energy change of flipping each spin, in {-8..8}
        p_acc = table[chain, (d_e + 8) // 4]
        flip = mask & (rng.random(s.shape) < p_acc)
        s[flip] *= -1


def generate(p: Params, seed: int, chunk_index: int, start: int, n: int
             ) -> dict[str, np.ndarray]:
    """`n` configurations from `chains` chains spread over the temperature grid."""
    rng = chunk_rng(seed, chunk_index)
    chains = min(p.chains, n)
    per_chain = -(-n // chains)  # ceil
    L = p.lattice
    t = temperatures(p)[(chunk_index * p.chains + np.arange(chains)) % p.n_temperatures]
    hot = rng.choice(np.array([-1, 1], np.int32), size=(chains, L, L))
    cold = np.ones((chains, L, L), np.int32) * rng.choice([-1, 1], size=(chains, 1, 1))
    s = np.where((t < T_CRITICAL)[:, None, None], cold, hot)
    table = np.minimum(1.0, np.exp(-np.array([-8, -4, 0, 4, 8])[None, :] / t[:, None]))
    ij = np.add.outer(np.arange(L), np.arange(L)) % 2
    masks = ((ij == 0)[None], (ij == 1)[None])
    for _ in range(p.burn_in):
        _sweep(s, table, masks, rng)
    out = []
    for k in range(per_chain):
        if k:
            for _ in range(p.decorrelation):
                _sweep(s, table, masks, rng)
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
