"""Ising options of the DCGAN, WGAN-GP and VAE families (issue #15): Metropolis sweeps against
the data's own sampler, circular padding, temperature conditioning that a short run learns, and
the sampler's exact spins."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from models_testkit import ends, make, one_thread, train  # one_thread: autouse
from torch import nn

from models.ising import TemperatureCondition, metropolis_sweeps, refine_spins
from pipeline import physics
from pipeline.sources import ising2d

ISING = dict(image_size=16, channels=(16, 8), latent_dim=8, circular=True, cond_temperature=True)


def energy(spins: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(physics.ising_energy(spins[:, 0].numpy().astype(np.int8)))


# --------------------------------------------------------------------------- Metropolis
@pytest.mark.parametrize("t", [1.8, 2.6, 3.2])
def test_sweeps_reach_the_energy_of_the_data_sampler(t):
    """Random spins swept 300 times at T have the mean energy of the store's own Monte Carlo
    (pipeline/sources/ising2d.py) within 0.03 per spin, 3 standard errors of the difference
    of two 256-sample means: same dynamics, same equilibrium."""
    torch.manual_seed(0)
    start = torch.where(torch.rand(256, 1, 16, 16) < 0.5, 1.0, -1.0)
    if t < ising2d.T_CRITICAL:   # the source starts cold chains ordered, so must we
        start = torch.ones_like(start)
    ours = energy(metropolis_sweeps(start, torch.full((256,), t), 300)).mean().item()
    p = ising2d.Params(lattice=16, t_min=t, t_max=t, n_temperatures=1, chains=256, burn_in=300)
    theirs = ising2d.generate(p, seed=0, chunk_index=0, start=0, n=256)["energy"].mean()
    assert abs(ours - theirs) < 0.03, (ours, theirs)


def test_sweeps_keep_spins_and_each_sample_uses_its_own_temperature():
    torch.manual_seed(0)
    board = torch.where((torch.arange(16)[:, None] + torch.arange(16)) % 2 == 0, 1.0, -1.0)
    start = board.expand(2, 1, 16, 16).clone()       # E = +2 per spin: every bond frustrated
    out = metropolis_sweeps(start, torch.tensor([0.5, 100.0]), 20)
    assert set(out.unique().tolist()) <= {-1.0, 1.0}
    cold, hot = energy(out).tolist()
    assert cold < -1.0                                # T = 0.5 orders it (domains may remain)
    assert abs(hot) < 0.25                            # T = 100 leaves it random
    assert torch.equal(metropolis_sweeps(start, torch.tensor([1.0, 1.0]), 0), start)


def test_refine_spins_returns_exact_zero_one_spins():
    torch.manual_seed(0)
    out = refine_spins(torch.rand(8, 1, 16, 16), torch.full((8,), 2.0), 3)
    assert set(out.unique().tolist()) == {0.0, 1.0}


def test_refined_samples_are_symmetric_under_a_global_spin_flip():
    """A generator that only makes up-magnetised lattices (P(up) = 0.97) is refined into both
    signs about equally often, each with |m| near 1: the s -> -s symmetry of the zero-field model,
    while the cold sweeps keep the order."""
    torch.manual_seed(0)
    out = refine_spins(torch.full((400, 1, 16, 16), 0.97), torch.full((400,), 1.6), 2)
    m = (2 * out - 1).mean((1, 2, 3))
    assert m.abs().min() > 0.8
    assert 0.4 < (m > 0).float().mean() < 0.6        # 400 fair flips: 3.4 sigma either side


# --------------------------------------------------------------------------- conditioning
def test_temperature_comes_from_the_batch_or_the_training_grid():
    cond = TemperatureCondition((1.6, 3.2), 16)
    t = torch.tensor([1.6, 2.4, 3.2])
    assert torch.equal(cond.of({"cond": t}, 3, torch.device("cpu")), t)
    drawn = cond.of({}, 2000, torch.device("cpu"))
    grid = torch.linspace(1.6, 3.2, 16)
    assert torch.isclose(drawn[:, None], grid).any(1).all()          # only grid temperatures
    assert len(drawn.unique()) == 16                                 # ... and all of them
    np.testing.assert_allclose(cond.unit(t).numpy(), [0.0, 0.5, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="t_range"):
        TemperatureCondition((3.2, 1.6), 16)


@pytest.mark.parametrize("family", ["dcgan", "wgan_gp"])
def test_circular_networks_pad_by_wrapping_around(family):
    model = make(family, **ISING)
    padded = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.padding != (0, 0)]
    assert len(padded) == 4 and all(c.padding_mode == "circular" for c in padded)  # 2 in G, 2 in D
    assert not any(isinstance(m, nn.ConvTranspose2d) and m.padding != (0, 0)
                   for m in model.generator.modules())  # no zero-padded upsampling left


def test_circular_generator_output_couples_opposite_edges():
    """A pixel on the left edge depends on the features at the right edge (wrap-around)."""
    torch.manual_seed(0)
    model = make("dcgan", **ISING).eval()
    decoder = model.generator.net[4]                    # after the 4 x 4 projection
    h = torch.randn(1, 16, 4, 4, requires_grad=True)
    decoder(h)[0, 0, 8, 0].backward()
    assert h.grad[0, :, :, -1].abs().sum() > 0


@pytest.mark.parametrize("family", ["dcgan", "wgan_gp", "vae"])
def test_refine_needs_the_temperature(family):
    params = dict(image_size=16, channels=(16, 8), refine_sweeps=5)
    with pytest.raises(ValueError, match="refine_sweeps 5"):
        make(family, **params)


def tempered(step: int) -> dict[str, torch.Tensor]:
    """Cold samples (T = 1.6) mostly +1 (0.9 ones), hot ones (T = 3.2) mostly 0 (0.1 ones)."""
    g = torch.Generator().manual_seed(step)
    t = torch.where(torch.rand(32, generator=g) < 0.5, 1.6, 3.2)
    p = torch.where(t < 2.4, 0.9, 0.1).view(-1, 1, 1, 1).expand(32, 1, 16, 16)
    return {"x": (torch.rand(32, 1, 16, 16, generator=g) < p).float(), "cond": t}


def mean_at(model, t: float) -> float:
    model.eval()
    with torch.no_grad():
        return model.sample(64, {"cond": torch.full((64,), t)}).mean().item()


@pytest.mark.parametrize("family,steps,lr,gap", [("dcgan", 75, 1e-3, 0.3),
                                                 ("vae", 80, 1e-2, 0.15)])
def test_a_short_run_learns_what_the_temperature_means(family, steps, lr, gap):
    """The data's density of ones depends on T only; after a short run the model's samples at
    T = 1.6 hold `gap` more ones than at T = 3.2 (0 before training; the VAE, whose code can also
    carry the density, moves slower: 0.25 was measured)."""
    torch.manual_seed(0)
    params = ISING if family == "dcgan" else dict(image_size=16, channels=(8, 16), latent_dim=4,
                                                  cond_temperature=True)
    model = make(family, **params)
    history = train(model, tempered, steps, lr=lr)
    assert mean_at(model, 1.6) - mean_at(model, 3.2) > gap
    if family == "vae":
        first, last = ends(history["model"])
        assert last < first / 2


def test_sampler_draws_temperatures_and_returns_exact_spins():
    torch.manual_seed(0)
    for family in ("dcgan", "wgan_gp"):
        model = make(family, **ISING, refine_sweeps=2).eval()
        out = model.sample(16)                             # no batch: T from the training mix
        assert out.shape == (16, 1, 16, 16) and set(out.unique().tolist()) <= {0.0, 1.0}
    vae = make("vae", image_size=16, channels=(8, 16), latent_dim=4, cond_temperature=True,
               refine_sweeps=2).eval()
    assert set(vae.sample(16).unique().tolist()) <= {0.0, 1.0}
    assert vae.sample(4, {"cond": torch.full((4,), 2.0)}).shape == (4, 1, 16, 16)


def test_conditional_vae_forward_without_temperatures_draws_them():
    """`hpcforge evaluate` calls forward(x) alone on every predictor; a conditional VAE then
    reconstructs at temperatures from the training mix rather than failing."""
    torch.manual_seed(0)
    vae = make("vae", image_size=16, channels=(8, 16), latent_dim=4, cond_temperature=True)
    out, mu, logvar = vae(torch.rand(4, 1, 16, 16).round())
    assert out.shape == (4, 1, 16, 16) and mu.shape == logvar.shape == (4, 4)
