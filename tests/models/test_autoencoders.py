"""Autoencoder families (autoencoder, vae, aae): they learn to reconstruct, and the denoising,
sparse and anomaly-score variants do what their names say."""
from __future__ import annotations

import pytest
import torch

from models.objectives import reconstruction_loss
from models_testkit import ends, make, one_thread, train  # one_thread: autouse

def stripe_images(n: int = 16, size: int = 16) -> torch.Tensor:
    """Binary horizontal or vertical stripes with a random phase, (n, 1, size, size)."""
    g = torch.Generator().manual_seed(0)
    phase = torch.randint(0, 4, (n, 1), generator=g)
    bars = ((torch.arange(size) + phase) % 4 < 2).float()  # (n, size)
    vertical = torch.rand(n, generator=g) < 0.5
    x = torch.where(vertical[:, None, None], bars[:, None, :].expand(n, size, size),
                    bars[:, :, None].expand(n, size, size))
    return x.unsqueeze(1)


AE = {"conv": dict(image_size=16, channels=(8, 16), latent_dim=8),
      "fc": dict(kind="fc", image_size=16, hidden=(64,), latent_dim=8)}


@pytest.mark.parametrize("kind", ["conv", "fc"])
@pytest.mark.parametrize("decoder", ["bernoulli", "gaussian"])
def test_autoencoder_learns_to_reconstruct_loss_falls_5x(kind, decoder):
    torch.manual_seed(0)
    model = make("autoencoder", decoder=decoder, **AE[kind])
    first, last = ends(train(model, {"x": stripe_images()}, 80)["model"])
    assert last < first / 5


def test_denoising_corrupts_the_input_only_and_targets_the_clean_sample():
    model = make("autoencoder", noise_std=0.5, **AE["fc"])
    x = stripe_images(4)
    torch.manual_seed(1)
    terms = model.losses({"x": x}, "model")
    torch.manual_seed(1)
    noisy = x + 0.5 * torch.randn_like(x)
    out, _ = model(noisy)
    assert torch.allclose(terms["recon"], reconstruction_loss(out, x, "bernoulli"))
    noisy_target = reconstruction_loss(out, noisy.clamp(0, 1), "bernoulli")
    assert not torch.allclose(terms["recon"], noisy_target)


def test_denoising_adds_no_noise_outside_training():
    model = make("autoencoder", noise_std=0.5, **AE["conv"]).eval()
    x = stripe_images(4)
    out, _ = model(x)
    clean = reconstruction_loss(out, x, "bernoulli")
    assert torch.equal(model.losses({"x": x}, "model")["recon"], clean)


def test_sparse_loss_adds_the_weighted_l1_of_the_code():
    model = make("autoencoder", l1_weight=0.3, **AE["fc"])
    terms = model.losses({"x": stripe_images(4)}, "model")
    assert torch.allclose(terms["loss"], terms["recon"] + 0.3 * terms["code_l1"])


def test_sparse_training_shrinks_the_code_3x():
    x = stripe_images()
    codes = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = make("autoencoder", l1_weight=weight, **AE["fc"])
        train(model, {"x": x}, 60, lr=3e-3)
        codes[weight] = model(x)[1].abs().mean().item()
    assert codes[1.0] < codes[0.0] / 3


def test_anomaly_score_ranks_unseen_noise_above_the_training_data():
    torch.manual_seed(0)
    model = make("autoencoder", decoder="gaussian", **AE["conv"])
    x = stripe_images()
    train(model, {"x": x}, 80, lr=3e-3)
    model.eval()
    normal, odd = model.anomaly_score(x), model.anomaly_score(torch.rand(16, 1, 16, 16))
    assert normal.shape == odd.shape == (16,)
    assert odd.min() > normal.max()


def test_vae_learns_negative_elbo_falls_3x():
    torch.manual_seed(0)
    model = make("vae", image_size=16, channels=(8, 16), latent_dim=4)
    first, last = ends(train(model, {"x": stripe_images()}, 80)["model"])
    assert last < first / 3


def test_aae_phases_discriminator_then_autoencoder_with_disjoint_parameters():
    model = make("aae", adversarial_weight=0.5)
    specs = model.optimizers()
    assert [s.name for s in specs] == ["discriminator", "autoencoder"]
    assert specs[1].module["encoder"] is model.autoencoder["encoder"]
    terms = model.losses({"x": stripe_images(4)}, "autoencoder")
    assert torch.allclose(terms["loss"], terms["recon"] + 0.5 * terms["generator"])


def test_aae_reconstruction_falls_3x_and_samples_lie_in_unit_interval():
    torch.manual_seed(0)
    model = make("aae", data_shape=(1, 16, 16), hidden=(64,), latent_dim=4)
    history = train(model, {"x": stripe_images()}, 80)
    first, last = ends(history["autoencoder"])
    assert last < first / 3
    assert all(len(h) == 80 for h in history.values())
    samples = model.sample(10)
    assert samples.shape == (10, 1, 16, 16)
    assert samples.min() >= 0 and samples.max() <= 1


def test_aae_adversarial_term_pulls_codes_to_the_prior():
    """Codes of correlated, offset data: with adversarial_weight 1 their mean is within 0.3 of 0
    and their std within 0.2 of 1 (N(0, I) moments); with weight 0 (a plain AE) they are not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g) @ torch.randn(6, 6, generator=g) * 0.5 + 2
    off_prior = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = make("aae", data_shape=(6,), hidden=(32,), latent_dim=2, decoder="gaussian",
                     adversarial_weight=weight)
        train(model, {"x": x}, 200, lr=3e-3)
        with torch.no_grad():
            code = model.encode(x)
        off_prior[weight] = max(code.mean(0).abs().max().item() / 0.3,
                                (code.std(0) - 1).abs().max().item() / 0.2)
    assert off_prior[1.0] < 1 < off_prior[0.0]
