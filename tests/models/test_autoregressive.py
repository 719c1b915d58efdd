"""The autoregressive spin model (issue #23): its probabilities are exact and normalised, its
sampler draws from them, maximum likelihood learns a lattice's correlations, and the optional
Metropolis-Hastings correction targets the Boltzmann distribution."""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from models.autoregressive import independence_chains, lattice_energy
from models_testkit import make, one_thread  # one_thread: autouse
from pipeline import physics

TINY = dict(image_size=2, columns=3, hidden=6, embed=2, kernel=1)


def every_lattice(size: int) -> torch.Tensor:
    """All 2^(L*L) lattices of +-1 spins: (2^(L*L), L, L)."""
    return torch.tensor(list(itertools.product([-1.0, 1.0], repeat=size * size))).view(-1, size, size)


def test_probabilities_of_every_lattice_sum_to_one():
    """An exact model: q(s | T) over all 16 lattices of a 2 x 2 lattice sums to 1 at any T, and
    the symmetrised q the corrected sampler uses does too."""
    torch.manual_seed(0)
    model = make("autoregressive", **TINY)
    every = every_lattice(2)
    for t in (1.7, 2.9):
        temps = torch.full((len(every),), t)
        assert math.isclose(model.log_prob(every, temps).exp().sum().item(), 1.0, rel_tol=1e-5)
        assert math.isclose(model.symmetric_log_prob(every, temps).exp().sum().item(), 1.0,
                            rel_tol=1e-5)


def test_draws_follow_the_models_own_probabilities():
    """The sampler's log q equals the teacher-forced log q of the lattice it drew, and the
    frequencies of 20000 draws of a 2 x 2 lattice match q within 4 standard errors."""
    torch.manual_seed(0)
    model = make("autoregressive", **TINY)
    temps = torch.full((20000,), 2.2)
    s, logq = model.draw(temps)
    assert torch.allclose(model.log_prob(s, temps), logq, atol=1e-4)
    every = every_lattice(2)
    q = model.log_prob(every, temps[:len(every)]).exp()
    index = ((s.view(len(s), -1) > 0).long() * (2 ** torch.arange(3, -1, -1))).sum(1)
    freq = torch.bincount(index, minlength=16).float() / len(s)
    err = (q * (1 - q) / len(s)).sqrt()
    assert ((freq - q).abs() < 4 * err + 1e-4).all(), (freq, q)


def test_maximum_likelihood_learns_that_neighbours_align():
    """Trained 150 steps on ordered 6 x 6 lattices of random global sign, the model's samples
    are ordered (|m| > 0.9) with both signs (the flip), where the untrained model's are not."""
    torch.manual_seed(0)
    model = make("autoregressive", image_size=6, columns=4, hidden=16, embed=4, kernel=3)
    untrained = model.sample(256, {"cond": torch.full((256,), 1.6)})
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        sign = torch.where(torch.rand(32, 1, 1, 1) < 0.5, 0.0, 1.0)
        batch = {"x": sign.expand(32, 1, 6, 6), "cond": torch.full((32,), 1.6)}
        opt.zero_grad()
        model.losses(batch, "model")["loss"].backward()
        opt.step()
    out = model.sample(256, {"cond": torch.full((256,), 1.6)})
    m = physics.ising_magnetization(2 * out.numpy() - 1)
    m0 = physics.ising_magnetization(2 * untrained.numpy() - 1)
    assert np.abs(m).mean() > 0.9 and np.abs(m0).mean() < 0.5
    assert (m > 0).mean() > 0.3 and (m < 0).mean() > 0.3


def test_metropolis_hastings_correction_samples_the_boltzmann_distribution():
    """From an untrained q, 30 independence Metropolis-Hastings proposals per chain give the
    exact Boltzmann mean energy of the 2 x 2 periodic lattice at T = 1.5 (enumerated), where q's
    own draws are far off; the acceptance rate is reported."""
    torch.manual_seed(0)
    model = make("autoregressive", **{**TINY, "mh_steps": 30})
    n, t = 4000, 1.5
    every = every_lattice(2)
    e = lattice_energy(every)
    exact = (e * torch.softmax(-e / t, 0)).sum().item()
    raw = lattice_energy(model.draw(torch.full((n,), t))[0]).mean().item()
    out = 2 * model.sample(n, {"cond": torch.full((n,), t)})[:, 0] - 1
    corrected = lattice_energy(out)
    stderr = corrected.std().item() / math.sqrt(n)
    assert abs(corrected.mean().item() - exact) < 4 * stderr + 0.02, (corrected.mean(), exact)
    assert abs(raw - exact) > 1.0
    assert 0.0 < model.last_acceptance < 1.0


def test_the_corrected_chains_histogram_is_the_boltzmann_distribution_the_proposal_is_not():
    """The 16 lattices of the 2 x 2 periodic model enumerated exactly at T = 1.5: the final
    states of 4000 chains of 100 proposals from an untrained q pass a chi-square test against the
    Boltzmann probabilities (p > 0.001: statistic < 37.7 on 15 degrees of freedom), where q's own
    draws fail it by far. The chains' record is consistent: each chain's log weights are
    log p - log q of its draws, and the acceptance is the accepted count over the proposals."""
    torch.manual_seed(0)
    model = make("autoregressive", **{**TINY, "mh_steps": 100})
    n, t = 4000, 1.5
    every = every_lattice(2)
    p = torch.softmax(-lattice_energy(every) / t, 0)

    def chi2(s: torch.Tensor) -> float:
        index = ((s.reshape(len(s), -1) > 0).long() * (2 ** torch.arange(3, -1, -1))).sum(1)
        count = torch.bincount(index, minlength=16).double()
        return float(((count - n * p) ** 2 / (n * p)).sum())

    temps = torch.full((n,), t)
    out = 2 * model.sample(n, {"cond": temps})[:, 0] - 1
    assert chi2(out) < 37.7, chi2(out)
    assert chi2(model.draw(temps)[0]) > 500, chi2(model.draw(temps)[0])
    chains = model.last_chains
    assert chains["log_weight"].shape == (101, n) and torch.equal(chains["t"], temps)
    assert 0 <= chains["accepted"].min() and chains["accepted"].max() <= 100
    assert model.last_acceptance == chains["accepted"].sum().item() / (100 * n)
    # the weights are exact: log w of every possible lattice, recomputed by teacher forcing,
    # holds the values the chains recorded
    exact = (-lattice_energy(every) / t - model.log_prob(every, torch.full((16,), t))).double()
    recorded = chains["log_weight"].double().unique()
    assert torch.isclose(recorded[:, None], exact[None], atol=1e-4).any(1).all()


def test_independence_chains_follow_the_metropolis_hastings_rule_by_hand():
    """Chain 0: log w 0, 1, -5, 0.5 and log u = log 0.5 at every step: accepts (1 - 0 > -0.69),
    rejects (-5 - 1 < -0.69), accepts (0.5 - 1 > -0.69): ends at draw 3 with 2 accepted. Chain 1
    proposes only worse draws with u near 1: stays at draw 0, none accepted."""
    log_w = torch.tensor([[0.0, 0.0], [1.0, -1.0], [-5.0, -2.0], [0.5, -3.0]])
    log_u = torch.log(torch.tensor([[0.5, 0.99], [0.5, 0.99], [0.5, 0.99]]))
    index, accepted = independence_chains(log_w, log_u)
    assert index.tolist() == [3, 0] and accepted.tolist() == [2, 0]


def test_augmentation_keeps_the_energy_and_moves_the_lattice():
    """A symmetry image has the same energy and |m| as its lattice (the Boltzmann weight is
    unchanged), and is a different lattice for most of a batch."""
    from models.autoregressive import symmetric
    torch.manual_seed(0)
    s = torch.where(torch.rand(64, 8, 8) < 0.3, 1.0, -1.0)
    image = symmetric(s)
    assert torch.equal(lattice_energy(image), lattice_energy(s))
    assert torch.equal(image.mean((1, 2)).abs(), s.mean((1, 2)).abs())
    assert (image != s).any(dim=(1, 2)).float().mean() > 0.9
