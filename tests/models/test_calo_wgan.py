"""The calorimeter WGAN-GP (models/calo_wgan.py, issue #15): the energy-fraction parametrisation
round-trips, the shower's total is the generated ratio times the incident energy, and a few
training steps on GFlash showers move the ratio toward the data's sampling fraction."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from models_testkit import make, one_thread  # noqa: F401  (one_thread: autouse)

from models.calo_wgan import deposits_from_fractions, draw_spots, energy_fractions, ring_matrix
from pipeline import physics
from pipeline.sources import calo

SMALL = dict(data_shape=(4, 8, 8), latent_dim=8, g_hidden=(32,), d_hidden=(32,), n_critic=2)


def test_energy_fractions_round_trip_and_divide_by_the_incident_energy():
    torch.manual_seed(0)
    x, e = torch.rand(5, 4, 8, 8, dtype=torch.float64), 1 + 99 * torch.rand(5, dtype=torch.float64)
    u = energy_fractions(x, e)
    torch.testing.assert_close(u[2], x[2] / e[2], rtol=0, atol=0)
    torch.testing.assert_close(deposits_from_fractions(u, e), x, rtol=1e-15, atol=0)


def test_rings_are_those_of_the_physics_radial_profile():
    """The critic's ring fractions and evaluate's radial profile bin cells the same way."""
    d = calo.generate(calo.Params(layers=4, eta=8, phi=8), 0, 0, 0, 6)["energy_deposits"]
    rings = torch.as_tensor(d, dtype=torch.float32).sum(1).flatten(1) @ ring_matrix(8, 8)
    np.testing.assert_allclose((rings / rings.sum(1, keepdim=True)).numpy(),
                               physics.radial_profile(d), atol=1e-6)


def test_total_energy_is_the_generated_ratio_times_the_incident_energy():
    model = make("calo_wgan", **SMALL).eval()
    e = torch.tensor([1.0, 5.0, 30.0, 100.0])
    deposits, shape, ratio = model.generate_parts(torch.randn(4, 8), {"cond": e})
    assert deposits.shape == (4, 4, 8, 8) and (deposits >= 0).all()
    torch.testing.assert_close(shape.sum(1), torch.ones(4))
    torch.testing.assert_close(deposits.sum((1, 2, 3)), ratio * e, rtol=1e-5, atol=0)
    # untrained, the ratio starts at ratio_ref whatever E: the total tracks E from the first step
    torch.testing.assert_close(ratio, torch.full((4,), 0.2), rtol=1e-6, atol=0)


def test_a_missing_condition_names_the_key_and_the_unit():
    model = make("calo_wgan", **SMALL)
    with pytest.raises(ValueError, match=r"no 'cond' key; expected the incident energy in GeV"):
        model.sample(2, {})
    with pytest.raises(ValueError, match="cond_range"):
        make("calo_wgan", cond_range=(0.0, 100.0))


@pytest.mark.parametrize("variant", [{}, {"projection": True}, {"cond_features": 8}])
def test_training_steps_move_the_ratio_to_the_data_and_keep_totals_exact(variant):
    """40 steps of both phases on showers whose visible fraction is 0.1 (sampling_fraction):
    the mean generated ratio leaves its start (0.2) toward 0.1; totals stay E x ratio. With the
    plain critic, the projection critic, and an embedded condition in G."""
    torch.manual_seed(0)
    p = calo.Params(layers=4, eta=8, phi=8, sampling_fraction=0.1)
    data = calo.generate(p, 0, 0, 0, 256)
    x, e = (torch.as_tensor(data[k]) for k in ("energy_deposits", "incident_energy"))
    model = make("calo_wgan", **SMALL, **variant)
    opts = {s.name: torch.optim.Adam(s.module.parameters(), lr=2e-3, betas=s.betas)
            for s in model.optimizers()}
    for step in range(40):
        for name, opt in opts.items():
            idx = torch.randint(0, len(x), (32,))
            opt.zero_grad()
            model.losses({"x": x[idx], "cond": e[idx]}, name)["loss"].backward()
            opt.step()
    with torch.no_grad():
        deposits, _, ratio = model.generate_parts(torch.randn(256, 8), {"cond": e})
    assert abs(ratio.mean().item() - 0.1) < 0.06, ratio.mean().item()  # from 0.2, 0.1 away
    torch.testing.assert_close(deposits.sum((1, 2, 3)), ratio * e, rtol=1e-5, atol=0)


def test_the_projection_critic_scores_the_condition_through_the_shower_s_features():
    """D(f, c) = w.h(f) + embed(c).h(f): the condition's part vanishes for a shower whose features
    h are zero, and a shower's score moves with the condition only through that product."""
    from models.calo_wgan import ProjectionCritic
    torch.manual_seed(0)
    critic = ProjectionCritic(6, (16,))
    f = torch.randn(3, 6)
    h = critic.body(f[:, :-1])
    moved = f.clone()
    moved[:, -1] += 0.5                                   # the same showers at another energy
    expected = ((critic.embed(moved[:, -1:]) - critic.embed(f[:, -1:])) * h).sum(1, keepdim=True)
    torch.testing.assert_close(critic(moved) - critic(f), expected)
    assert (critic(moved) - critic(f)).abs().min() > 0


def test_spot_draws_are_whole_spots_that_sum_to_the_total_with_the_mean_s_gradient():
    torch.manual_seed(0)
    shape = torch.softmax(torch.randn(3, 64), 1).requires_grad_(True)
    total = torch.tensor([0.2, 2.0, 20.0], requires_grad=True)
    x = draw_spots(shape, total, 0.002)                       # 100, 1000, 10000 spots
    torch.testing.assert_close(x.sum(1), total.detach(), rtol=1e-5, atol=0)
    for row, n in zip(x.detach()[:2], (100, 1000)):   # rows sparse enough to hold a lone spot
        e = row[row > 0].min()                         # one spot's energy
        torch.testing.assert_close(row / e, (row / e).round(), rtol=0, atol=1e-3)
        assert abs((row / e).sum().item() - n) < 5 * n ** 0.5  # Poisson(n) spots in all
    assert (x[0] == 0).sum() > 10                             # 100 spots over 64 cells leave holes
    (x * torch.arange(64.0)).sum().backward()                 # gradient of the mean shape * total
    torch.testing.assert_close(total.grad, (shape.detach() * torch.arange(64.0)).sum(1))


def test_a_spot_drawing_model_keeps_totals_at_ratio_times_energy():
    model = make("calo_wgan", **SMALL, quantum=0.002).eval()
    e = torch.tensor([1.0, 10.0, 100.0])
    deposits, _, ratio = model.generate_parts(torch.randn(3, 8), {"cond": e})
    torch.testing.assert_close(deposits.sum((1, 2, 3)), ratio * e, rtol=1e-5, atol=0)
    assert (deposits[0] == 0).float().mean() > 0.5            # 1 GeV: 100 spots over 256 cells
