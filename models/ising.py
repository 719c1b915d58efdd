"""Ising-spin tools of the temperature-conditional generators: the temperature condition, checkerboard
Metropolis sweeps and the sampler's refinement."""
from __future__ import annotations

import torch

from models.base import Batch, check_shape


class TemperatureCondition:
    """The temperature T that Ising generators are conditioned on (issue #15): batch["cond"]
    when the batch carries it (the store's `cond: temperature`), else drawn uniformly from the
    training grid of `levels` temperatures over `t_range` (configs/data/ising2d.yaml spreads its
    chains evenly over that grid, so a uniform draw is the training mix). Networks see T mapped
    onto [0, 1] over t_range."""

    def __init__(self, t_range: tuple[float, float], levels: int):
        lo, hi = t_range
        if not 0 < lo < hi or levels < 1:
            raise ValueError(f"t_range {t_range} with {levels} levels: expected 0 < lo < hi and "
                             f"at least one level")
        self.lo, self.hi, self.levels = float(lo), float(hi), int(levels)

    def of(self, batch: Batch, n: int, device: torch.device) -> torch.Tensor:
        """(n,) temperatures: the batch's, or draws from the training grid."""
        if "cond" in batch:
            check_shape("temperature cond", batch["cond"], (n,))
            return batch["cond"].to(device=device, dtype=torch.float32)
        grid = torch.linspace(self.lo, self.hi, self.levels, device=device)
        return grid[torch.randint(self.levels, (n,), device=device)]

    def unit(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.lo) / (self.hi - self.lo)

    def sweep(self, n: int, device: torch.device) -> torch.Tensor:
        """n temperatures evenly over t_range, for figures from fixed noise."""
        return torch.linspace(self.lo, self.hi, n, device=device)


def metropolis_sweeps(spins: torch.Tensor, temperature: torch.Tensor, sweeps: int) -> torch.Tensor:
    """`sweeps` checkerboard Metropolis sweeps (Metropolis et al. 1953) of +-1 spins (B, 1, L, L),
    periodic, J = k_B = 1, each sample at its own temperature (B,): the dynamics that made the
    training data (pipeline/sources/ising2d.py). A few sweeps equilibrate a generated
    lattice's nearest-neighbour correlations, which a network that outputs independent spins
    cannot make, and leave its large-scale order (|m|, domains), which relaxes over many more
    sweeps near T_c, to the network. L must be even (two sublattices)."""
    s = spins.clone()
    size = s.shape[-1]
    ij = torch.arange(size, device=s.device)
    parity = (ij[:, None] + ij[None, :]) % 2
    t = temperature.to(s.dtype).view(-1, 1, 1, 1)
    for _ in range(sweeps):
        for sublattice in (0, 1):
            nb = s.roll(1, -1) + s.roll(-1, -1) + s.roll(1, -2) + s.roll(-1, -2)
            accept = torch.rand_like(s) < torch.exp(-2 * s * nb / t)  # min(1, e^-dE/T)
            s = torch.where((parity == sublattice) & accept, -s, s)
    return s


def refine_spins(p_up: torch.Tensor, temperature: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Spins drawn from a generator's P(s = +1) in [0, 1], then `sweeps` Metropolis sweeps at
    each sample's temperature, then each lattice flipped whole (s -> -s) with probability 1/2;
    returned as 0/1 (the minmax-scaled spins of the store).

    The flip imposes a symmetry the target has exactly: the zero-field Ising Hamiltonian, and so
    the Boltzmann distribution the data samples, is invariant under s -> -s. A GAN that learnt
    ordered lattices of mostly one sign (measured on the demo: W1 of signed m 12x the floor
    while |m| was 1.5x) then matches the signed magnetisation, and |m|, E, C and chi, which the
    flip leaves unchanged, keep their values."""
    spins = torch.where(torch.rand_like(p_up) < p_up, 1.0, -1.0)
    spins = metropolis_sweeps(spins, temperature, sweeps)
    flip = torch.where(torch.rand(len(spins), 1, 1, 1, device=spins.device) < 0.5, -1.0, 1.0)
    return (spins * flip + 1) / 2
