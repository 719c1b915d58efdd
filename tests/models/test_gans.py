"""Adversarial families (gan, dcgan, wgan_gp, cgan, cyclegan): objectives as in the papers, the
gradient penalty, architecture rules, and short runs in which G moves toward the data."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.wgan_gp import gradient_penalty
from models_testkit import make, one_thread, train  # one_thread: autouse


def near(value: float, shape: tuple[int, ...]):
    """Batches of samples around `value` (std 0.05), a fresh seeded draw each step."""
    return lambda step: {"x": value + 0.05 * torch.randn(*shape, generator=torch.Generator()
                                                         .manual_seed(step))}


def sample_mean(model, n: int = 32) -> float:
    z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(99))
    model.eval()
    with torch.no_grad():
        out = model.generate(z, {}).mean().item()
    model.train()
    return out


# --------------------------------------------------------------------------- learning
LEARN = {  # family: (config, data shape per batch, steps, required shrink of |mean(G) - 0.85|)
    "gan": (dict(data_shape=(4,), latent_dim=4, g_hidden=(32,), d_hidden=(32,)), (32, 4), 100, 3),
    "dcgan": (dict(image_size=16, channels=(16, 8), latent_dim=8), (16, 1, 16, 16), 60, 3),
    "wgan_gp": (dict(image_size=16, channels=(16, 8), latent_dim=8, n_critic=3), (16, 1, 16, 16),
                40, 2),
}


@pytest.mark.parametrize("family", LEARN)
def test_generator_moves_toward_the_data_by_stated_factor(family):
    """Data ~ 0.85 + 0.05 N(0, 1); G starts near 0.5 (sigmoid output). After a short run the gap
    between G's sample mean and 0.85 shrinks by LEARN[family][3] (3x; 2x for WGAN-GP)."""
    params, shape, steps, factor = LEARN[family]
    torch.manual_seed(0)
    model = make(family, **params)
    before = abs(sample_mean(model) - 0.85)
    train(model, near(0.85, shape), steps, lr=2e-3)
    assert abs(sample_mean(model) - 0.85) < before / factor


@pytest.mark.parametrize("family,params", [
    ("gan", dict(data_shape=(1, 8, 8), output="tanh")), ("dcgan", dict(image_size=16,
                                                                      channels=(16, 8))),
    ("wgan_gp", dict(image_size=8, channels=(8,), output="tanh")),
    ("cgan", dict(data_shape=(3,), n_classes=4))])
def test_samples_have_the_data_shape_and_the_output_range(family, params):
    torch.manual_seed(0)
    model = make(family, **params)
    batch = {"cond": torch.arange(64) % 4} if family == "cgan" else None
    samples = model.sample(64, batch)
    assert samples.shape == (64, *model.data_shape)
    low = -1.0 if params.get("output") == "tanh" else 0.0
    assert samples.min() >= low and samples.max() <= 1.0
    assert samples.std() > 0  # not a constant image


def test_figures_come_from_a_fixed_noise_batch():
    torch.manual_seed(0)
    model = make("dcgan", image_size=16, channels=(16, 8), latent_dim=8).eval()
    first = model.figures({"x": torch.rand(4, 1, 16, 16)})["samples"]
    second = model.figures({"x": torch.rand(4, 1, 16, 16)})["samples"]
    assert first.shape == (16, 1, 16, 16)
    assert torch.equal(first, second)


# --------------------------------------------------------------------------- objectives
def test_gan_losses_are_minimax_for_d_and_non_saturating_for_g():
    model = make("gan", data_shape=(3,), latent_dim=2, g_hidden=(8,), d_hidden=(8,))
    real = torch.rand(5, 3)
    torch.manual_seed(1)
    d_terms = model.losses({"x": real}, "discriminator")
    g_terms = model.losses({"x": real}, "generator")
    torch.manual_seed(1)
    fake_d = model.generator(torch.randn(5, 2))
    fake_g = model.generator(torch.randn(5, 2))
    d = model.discriminator
    # D: -log D(x) - log(1 - D(G(z)));  G: -log D(G(z))  (softplus(-l) = -log sigmoid(l))
    expected_d = F.softplus(-d(real)).mean() + F.softplus(d(fake_d)).mean()
    assert torch.allclose(d_terms["loss"], expected_d, atol=1e-6)
    assert torch.allclose(g_terms["loss"], F.softplus(-d(fake_g)).mean(), atol=1e-6)


def test_dcgan_follows_radford_architecture_rules():
    model = make("dcgan", image_size=32, channels=(32, 16, 8))
    def layers(net):  # the leaf layers in order, skipping the placeholders of absent norms
        return [m for m in net.modules()
                if not list(m.children()) and not isinstance(m, nn.Identity)]
    g, d = layers(model.generator), layers(model.discriminator)
    assert isinstance(g[-2], nn.ConvTranspose2d) and isinstance(g[-1], nn.Sigmoid)  # no BN at G out
    assert isinstance(d[0], nn.Conv2d) and isinstance(d[1], nn.LeakyReLU)            # no BN at D in
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d) == 2
    assert any(isinstance(m, nn.ReLU) for m in g)
    assert not any(isinstance(m, nn.LeakyReLU) for m in g)
    strides = [m.stride for m in d if isinstance(m, nn.Conv2d)]
    assert strides == [(2, 2)] * 3 + [(1, 1)]  # strided convs, no pooling
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in d)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, nn.Conv2d)])
    assert abs(weights.std().item() - 0.02) < 0.002  # N(0, 0.02) initialisation


def test_dcgan_rejects_an_image_size_its_layers_cannot_make():
    with pytest.raises(ValueError, match=r"image_size 32 must equal 4 \* 2\*\*len\(channels\) "
                                         r"= 16"):
        make("dcgan", image_size=32, channels=(16, 8))


# --------------------------------------------------------------------------- wgan-gp
def linear_critic(weight_norm: float, features: int = 12) -> nn.Module:
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(features, 1))
    with torch.no_grad():
        w = critic[1].weight
        w.mul_(weight_norm / w.norm())
    return critic


def test_gradient_penalty_is_zero_for_a_unit_norm_linear_critic():
    real, fake = torch.rand(8, 3, 2, 2), torch.rand(8, 3, 2, 2)
    assert gradient_penalty(linear_critic(1.0), real, fake).item() < 1e-10


def test_gradient_penalty_grows_with_the_lipschitz_constant_and_trains_the_critic():
    real, fake = torch.rand(8, 3, 2, 2), torch.rand(8, 3, 2, 2)
    critic = linear_critic(3.0)
    gp = gradient_penalty(critic, real, fake)
    assert torch.allclose(gp, torch.tensor(4.0))  # (||w|| - 1)^2 with ||w|| = 3
    gp.backward()  # needs create_graph=True: the penalty depends on C's weights through its grad
    grad = critic[1].weight.grad
    assert grad is not None and grad.norm() > 0
    assert torch.allclose(grad, 2 * (3.0 - 1.0) * critic[1].weight / 3.0, atol=1e-5)


def test_wgan_gp_schedule_betas_and_critic_without_sigmoid_or_batchnorm():
    model = make("wgan_gp", image_size=16, channels=(16, 8), n_critic=5)
    assert model.schedule == {"critic": 5, "generator": 1}
    assert [s.name for s in model.optimizers()] == ["critic", "generator"]
    assert model.optimizers()[0].betas == (0.0, 0.9)
    critic = list(model.discriminator.modules())
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.Sigmoid)) for m in critic)
    last = [m for m in model.discriminator.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(1e3)
        scores = model.discriminator(torch.rand(64, 1, 16, 16))
    assert scores.shape == (64, 1) and scores.abs().max() > 1  # unbounded, not a probability


def test_wgan_gp_critic_loss_is_negative_distance_plus_weighted_penalty():
    model = make("wgan_gp", image_size=8, channels=(8,), gp_weight=7.0)
    terms = model.losses({"x": torch.rand(6, 1, 8, 8)}, "critic")
    assert torch.allclose(terms["loss"], -terms["wasserstein"] + 7.0 * terms["gradient_penalty"])
    assert terms["gradient_penalty"] > 0
    with torch.no_grad():  # validation logs the critic phase without gradients
        assert model.eval().losses({"x": torch.rand(6, 1, 8, 8)}, "critic")["gradient_penalty"] > 0


# --------------------------------------------------------------------------- cgan
@pytest.mark.parametrize("cond", ["class", "continuous"])
def test_cgan_learns_the_condition_separates_means_by_0_4(cond):
    """Condition 0 -> data near 0.2, condition 1 -> near 0.8; after training the sample means for
    the two conditions differ by more than 0.4 (they start equal: ~0.5 both)."""
    torch.manual_seed(0)
    model = make("cgan", data_shape=(4,), latent_dim=4, cond=cond, n_classes=2, g_hidden=(32,),
                  d_hidden=(32,))
    c = torch.arange(32) % 2
    c = c if cond == "class" else c.float()

    def data(step):
        noise = torch.randn(32, 4, generator=torch.Generator().manual_seed(step))
        return {"x": 0.2 + 0.6 * c[:, None] + 0.05 * noise, "cond": c}

    def gap():  # mean of condition-1 samples minus mean of condition-0 samples, fixed noise
        with torch.no_grad():
            s = model.generate(torch.randn(32, 4, generator=torch.Generator().manual_seed(99)),
                               {"cond": c})
        return (s[c == 1].mean() - s[c == 0].mean()).item()
    assert abs(gap()) < 0.1
    train(model, data, 100, lr=2e-3)
    assert gap() > 0.4


def test_cgan_continuous_condition_is_mapped_onto_unit_interval_in_log():
    model = make("cgan", data_shape=(8, 4, 4), cond="continuous", cond_range=(1.0, 100.0),
                 cond_scale="log")
    energies = torch.tensor([1.0, 10.0, 100.0])
    assert torch.allclose(model.unit_condition(energies), torch.tensor([0.0, 0.5, 1.0]))
    sweep = model.figure_batch({})["cond"]
    assert torch.allclose(sweep[[0, -1]], torch.tensor([1.0, 100.0]))
    samples = model.figures({})["samples"]  # 8 calorimeter layers averaged into one image
    assert samples.shape == (16, 1, 4, 4)
    with pytest.raises(ValueError, match="lo > 0"):
        make("cgan", cond="continuous", cond_range=(0.0, 100.0), cond_scale="log")


def test_cgan_condition_errors_name_the_fix():
    model = make("cgan", data_shape=(4,), n_classes=3)
    with pytest.raises(ValueError, match="no 'cond' key"):
        model.losses({"x": torch.rand(2, 4)}, "discriminator")
    with pytest.raises(ValueError, match=r"in \[0, 3\), got values in \[0, 7\]"):
        model.losses({"x": torch.rand(2, 4), "cond": torch.tensor([0, 7])}, "generator")
    with pytest.raises(ValueError, match=r"cond: expected shape \(2\), got \(2, 1\)"):
        model.losses({"x": torch.rand(2, 4), "cond": torch.zeros(2, 1).long()}, "generator")


# --------------------------------------------------------------------------- cyclegan
def test_cyclegan_translates_a_to_b_and_cycles_back():
    """Domain A ~ 0.2, domain B ~ 0.8 (unpaired). After 40 steps G_ab(a) is within 0.1 of 0.8 (it
    starts near 0.5) and G_ba(G_ab(a)) within 0.1 of a; the cycle term falls 2x."""
    torch.manual_seed(0)
    model = make("cyclegan", width=8, n_res_blocks=1, d_width=8)

    def data(step):
        g = torch.Generator().manual_seed(step)
        return {"x": 0.2 + 0.05 * torch.randn(8, 1, 16, 16, generator=g),
                "y": 0.8 + 0.05 * torch.randn(8, 1, 16, 16, generator=g)}
    a = data(999)["x"]
    cycle_before = model.losses(data(999), "generator")["cycle"].item()
    train(model, data, 40, lr=2e-3)
    with torch.no_grad():
        fake_b = model.generators["ab"](a)
        assert abs(fake_b.mean().item() - 0.8) < 0.1
        assert abs(model.generators["ba"](fake_b).mean().item() - 0.2) < 0.1
    assert model.losses(data(999), "generator")["cycle"].item() < cycle_before / 2


def test_cyclegan_generator_loss_combines_adversarial_cycle_and_identity():
    torch.manual_seed(0)
    model = make("cyclegan", width=4, n_res_blocks=1, d_width=4, cycle_weight=10.0,
                  identity_weight=0.5)
    terms = model.losses({"x": torch.rand(2, 1, 8, 8), "y": torch.rand(2, 1, 8, 8)}, "generator")
    assert torch.allclose(terms["loss"], terms["gan"] + 10 * terms["cycle"] + 5 * terms["identity"])
    no_id = make("cyclegan", width=4, n_res_blocks=1, d_width=4, identity_weight=0.0)
    batch = {"x": torch.rand(2, 1, 8, 8), "y": torch.rand(2, 1, 8, 8)}
    assert "identity" not in no_id.losses(batch, "generator")


def test_cyclegan_patch_discriminator_scores_patches_and_config_errors():
    model = make("cyclegan", width=4, d_width=4)
    assert model.discriminators["a"](torch.rand(2, 1, 16, 16)).shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="identity_weight: 0"):
        make("cyclegan", channels_b=3)
    with pytest.raises(ValueError, match=r"divisible by 4, got \(2, 1, 10, 10\)"):
        model.losses({"x": torch.rand(2, 1, 10, 10), "y": torch.rand(2, 1, 8, 8)}, "generator")
