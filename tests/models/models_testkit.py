"""Helpers for tests/models: `CASES`, two or more small configurations of every family (each with a
batch, the model's main output and its expected shape, a wrongly shaped input and the figure it
must log); `make` to build a family; `train`, the trainer's loop in miniature; data makers;
`one_thread`, an autouse fixture each test module imports.

Not a conftest.py: tests elsewhere import names from the root tests/conftest.py as `conftest`, and
a second conftest module here would shadow it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import pytest
import torch

from models import MODELS
from models.base import Batch, Trainable

B = 4  # batch size of the shape cases


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: threads cost more than they give on a shared 2-core box. An autouse fixture
    for the test modules that import it; the setting is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(family: str, **params) -> Trainable:
    """The family's model built from its config dataclass with `params` set."""
    cls, build = MODELS[family]
    return build(cls(**params))


def img(*shape: int) -> torch.Tensor:
    return torch.rand(B, *shape)


def labels(k: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, k, (B, *shape))


def predict(m: Trainable, b: Batch) -> torch.Tensor:
    return m(b["x"])


def reconstruct(m: Trainable, b: Batch) -> torch.Tensor:
    return m(b["x"])[0]


def reconstruct_at_t(m: Trainable, b: Batch) -> torch.Tensor:
    return m(b["x"], b["cond"])[0]


def generate(m: Trainable, b: Batch) -> torch.Tensor:
    return m.generate(torch.randn(B, m.latent_dim), b)


@dataclass
class Case:
    family: str
    tag: str
    params: dict
    batch: Callable[[], Batch]
    output: Callable[[Trainable, Batch], torch.Tensor]  # the model's main output
    shape: tuple[int, ...]                               # ... and its expected shape
    bad_x: tuple[int, ...]                               # a wrong input shape for batch["x"]
    figure: str | None = None                            # a key figures() must return, if any

    def build(self) -> Trainable:
        return make(self.family, **self.params)

    def make_batch(self, seed: int = 0) -> Batch:
        torch.manual_seed(seed)
        return self.batch()


CASES = [
    Case("mlp", "ce-bn-dropout", dict(in_features=8, hidden=(16, 16), out_features=3,
                                      dropout=0.1, batchnorm=True),
         lambda: {"x": torch.randn(B, 8), "y": labels(3)}, predict, (B, 3), (B, 9)),
    Case("mlp", "bce-tanh", dict(in_features=8, hidden=(16,), out_features=1, loss="bce",
                                 activation="tanh"),
         lambda: {"x": torch.randn(B, 8), "y": labels(2).float()}, predict, (B, 1), (B, 8, 2)),
    Case("cnn", "custom-stride-ce", dict(channels=(4, 8), downsample="stride", n_outputs=3),
         lambda: {"x": img(1, 16, 16), "y": labels(3)}, predict, (B, 3), (B, 2, 16, 16)),
    Case("cnn", "lenet5-mse", dict(preset="lenet5", in_channels=2, n_outputs=2, loss="mse"),
         lambda: {"x": img(2, 16, 16), "y": torch.randn(B, 2)}, predict, (B, 2), (B, 16, 16)),
    Case("cnn", "vgg-hinge", dict(preset="vgg", n_outputs=3, loss="hinge"),
         lambda: {"x": img(1, 16, 16), "y": labels(3)}, predict, (B, 3), (B, 16)),
    Case("resnet", "2stages-ce", dict(stem_channels=8, channels=(8, 16), blocks_per_stage=(1, 1),
                                      n_outputs=3),
         lambda: {"x": img(1, 16, 16), "y": labels(3)}, predict, (B, 3), (B, 3, 16, 16)),
    Case("resnet", "3stages-mse", dict(in_channels=2, stem_channels=4, channels=(4, 8, 8),
                                       blocks_per_stage=(2, 1, 1), n_outputs=2, loss="mse"),
         lambda: {"x": img(2, 16, 16), "y": torch.randn(B, 2)}, predict, (B, 2), (B, 1, 16, 16)),
    Case("tower", "calo-layers-ce", dict(layer_shapes=((3, 96), (12, 12), (12, 6)),
                                         channels=(4,), n_outputs=3),
         lambda: {"x": torch.randn(B, 288 + 144 + 72), "y": labels(3)}, predict, (B, 3), (B, 288)),
    Case("tower", "2-channel-mse", dict(layer_shapes=((2, 8, 8), (4, 4)), channels=(4, 8),
                                        pooled=1, n_outputs=1, loss="mse"),
         lambda: {"x": torch.randn(B, 128 + 16), "y": torch.randn(B, 1)}, predict, (B, 1),
         (B, 2, 8, 8)),
    Case("dilated_cnn", "dense-mse", dict(width=8, dilations=(1, 2, 4), out_channels=2),
         lambda: {"x": img(1, 16, 16), "y": img(2, 16, 16)}, predict, (B, 2, 16, 16), (B, 16, 16),
         figure="prediction"),
    Case("dilated_cnn", "dense-ce", dict(width=8, dilations=(1, 2), out_channels=3, loss="ce"),
         lambda: {"x": img(1, 12, 12), "y": labels(3, 12, 12)}, predict, (B, 3, 12, 12),
         (B, 2, 12, 12), figure="error"),
    Case("dilated_cnn", "pooled-hinge", dict(width=8, dilations=(1, 2, 4), out_channels=3,
                                             head="pooled", loss="hinge"),
         lambda: {"x": img(1, 16, 16), "y": labels(3)}, predict, (B, 3), (B, 1, 1, 16, 16)),
    Case("cnn1d", "ce", dict(seq_len=32, channels=(8, 16), n_classes=3),
         lambda: {"x": torch.randn(B, 1, 32), "y": labels(3)}, predict, (B, 3), (B, 1, 30)),
    Case("cnn1d", "forecast-mse", dict(in_channels=2, seq_len=32, channels=(8,), horizon=4,
                                       loss="mse"),
         lambda: {"x": torch.randn(B, 2, 32), "y": torch.randn(B, 2, 4)}, predict, (B, 2, 4),
         (B, 32, 2), figure="forecast"),
    Case("unet", "mse", dict(out_channels=2, base_width=4, depth=2),
         lambda: {"x": img(1, 16, 16), "y": img(2, 16, 16)}, predict, (B, 2, 16, 16),
         (B, 3, 16, 16),
         figure="prediction"),
    Case("unet", "segment-ce", dict(in_channels=2, out_channels=3, base_width=4, depth=3,
                                    loss="ce"),
         lambda: {"x": img(2, 16, 16), "y": labels(3, 16, 16)}, predict, (B, 3, 16, 16),
         (B, 1, 16, 16), figure="truth"),
    Case("unet", "padded-odd-size", dict(base_width=4, depth=2, pad=True),
         lambda: {"x": img(1, 15, 15), "y": img(1, 15, 15)}, predict, (B, 1, 15, 15),
         (B, 2, 15, 15), figure="error"),
    Case("fno", "mse", dict(modes=4, width=8, n_layers=2),
         lambda: {"x": img(1, 16, 16), "y": img(1, 16, 16)}, predict, (B, 1, 16, 16),
         (B, 2, 16, 16), figure="prediction"),
    Case("fno", "2-to-2-odd-size", dict(in_channels=2, out_channels=2, modes=3, width=4,
                                        n_layers=1),
         lambda: {"x": img(2, 13, 13), "y": img(2, 13, 13)}, predict, (B, 2, 13, 13),
         (B, 13, 13), figure="truth"),
    Case("rnn", "lstm-many2many-mse", dict(input_size=2, hidden_size=8),
         lambda: {"x": torch.randn(B, 10, 2), "y": torch.randn(B, 10, 1)}, predict, (B, 10, 1),
         (B, 10, 3), figure="forecast"),
    Case("rnn", "gru-many2one-ce", dict(input_size=2, hidden_size=8, num_layers=2, cell="gru",
                                        output="many_to_one", out_features=3, loss="ce"),
         lambda: {"x": torch.randn(B, 10, 2), "y": labels(3)}, predict, (B, 3), (B, 2, 10)),
    Case("rnn", "rnn-stateful-perstep-hinge", dict(input_size=1, hidden_size=8, cell="rnn",
                                                   out_features=3, loss="hinge", stateful=True),
         lambda: {"x": torch.randn(B, 6, 1), "y": labels(3, 6)}, predict, (B, 6, 3), (B, 6)),
    Case("transformer", "forecast-mse", dict(in_features=2, d_model=16, n_heads=2, n_layers=1,
                                             d_ff=32, horizon=3),
         lambda: {"x": torch.randn(B, 12, 2), "y": torch.randn(B, 3, 2)}, predict, (B, 3, 2),
         (B, 12, 1), figure="forecast"),
    Case("transformer", "causal-ce", dict(d_model=16, n_heads=4, n_layers=2, d_ff=32, dropout=0.1,
                                          causal=True, loss="ce", n_classes=3),
         lambda: {"x": torch.randn(B, 9, 1), "y": labels(3)}, predict, (B, 3), (B, 9)),
    Case("autoencoder", "conv-bernoulli-denoising", dict(image_size=16, channels=(4, 8),
                                                         latent_dim=4, noise_std=0.1),
         lambda: {"x": img(1, 16, 16)}, reconstruct, (B, 1, 16, 16), (B, 1, 8, 8),
         figure="reconstructions"),
    Case("autoencoder", "fc-gaussian-sparse", dict(kind="fc", in_channels=2, image_size=8,
                                                   hidden=(32,), latent_dim=4, decoder="gaussian",
                                                   l1_weight=0.1),
         lambda: {"x": img(2, 8, 8)}, reconstruct, (B, 2, 8, 8), (B, 128),
         figure="reconstructions"),
    Case("vae", "bernoulli", dict(image_size=16, channels=(8, 16), latent_dim=4),
         lambda: {"x": img(1, 16, 16)}, reconstruct, (B, 1, 16, 16), (B, 1, 32, 32),
         figure="samples"),
    Case("vae", "gaussian", dict(in_channels=2, image_size=8, channels=(8,), latent_dim=4,
                                 decoder="gaussian"),
         lambda: {"x": img(2, 8, 8)}, reconstruct, (B, 2, 8, 8), (B, 1, 8, 8), figure="samples"),
    Case("vae", "ising-cond-refine", dict(image_size=16, channels=(8, 16), latent_dim=4,
                                          cond_temperature=True, refine_sweeps=2),
         lambda: {"x": img(1, 16, 16).round(), "cond": 1.6 + 1.6 * torch.rand(B)}, reconstruct_at_t,
         (B, 1, 16, 16), (B, 1, 32, 32), figure="samples"),
    Case("gan", "image-tanh", dict(data_shape=(1, 8, 8), g_hidden=(32,), d_hidden=(32,),
                                   output="tanh"),
         lambda: {"x": img(1, 8, 8) * 2 - 1}, generate, (B, 1, 8, 8), (B, 64), figure="samples"),
    Case("gan", "vector-dropout", dict(data_shape=(6,), latent_dim=4, g_hidden=(16, 16),
                                       d_hidden=(16,), dropout=0.2),
         lambda: {"x": torch.rand(B, 6)}, generate, (B, 6), (B, 1, 6), figure="samples"),
    Case("dcgan", "16px", dict(image_size=16, channels=(16, 8), latent_dim=8),
         lambda: {"x": img(1, 16, 16)}, generate, (B, 1, 16, 16), (B, 1, 32, 32), figure="samples"),
    Case("dcgan", "8px-rgb-tanh", dict(in_channels=3, image_size=8, channels=(8,), latent_dim=4,
                                       output="tanh"),
         lambda: {"x": img(3, 8, 8) * 2 - 1}, generate, (B, 3, 8, 8), (B, 1, 8, 8),
         figure="samples"),
    Case("wgan_gp", "16px", dict(image_size=16, channels=(16, 8), latent_dim=8, n_critic=2),
         lambda: {"x": img(1, 16, 16)}, generate, (B, 1, 16, 16), (B, 2, 16, 16), figure="samples"),
    Case("wgan_gp", "8px-tanh", dict(in_channels=2, image_size=8, channels=(8,), latent_dim=4,
                                     output="tanh"),
         lambda: {"x": img(2, 8, 8) * 2 - 1}, generate, (B, 2, 8, 8), (B, 2, 16, 16),
         figure="samples"),
    Case("dcgan", "ising-cond-circular-refine", dict(image_size=16, channels=(16, 8), latent_dim=8,
                                                     circular=True, cond_temperature=True,
                                                     refine_sweeps=2),
         lambda: {"x": img(1, 16, 16).round(), "cond": 1.6 + 1.6 * torch.rand(B)}, generate,
         (B, 1, 16, 16), (B, 1, 32, 32), figure="samples"),
    Case("wgan_gp", "ising-cond-circular", dict(image_size=16, channels=(16, 8), latent_dim=8,
                                                n_critic=2, circular=True, cond_temperature=True),
         lambda: {"x": img(1, 16, 16).round(), "cond": 1.6 + 1.6 * torch.rand(B)}, generate,
         (B, 1, 16, 16), (B, 2, 16, 16), figure="samples"),
    Case("cgan", "class", dict(data_shape=(1, 8, 8), n_classes=3, g_hidden=(32,), d_hidden=(32,)),
         lambda: {"x": img(1, 8, 8), "cond": labels(3)}, generate, (B, 1, 8, 8), (B, 1, 8, 9),
         figure="samples"),
    Case("cgan", "continuous", dict(data_shape=(5,), cond="continuous", latent_dim=4, embed_dim=3,
                                    g_hidden=(16,), d_hidden=(16,), output="tanh"),
         lambda: {"x": torch.rand(B, 5) * 2 - 1, "cond": torch.rand(B) * 100}, generate, (B, 5),
         (B, 6), figure="samples"),
    Case("calo_wgan", "small", dict(data_shape=(2, 4, 4), latent_dim=4, g_hidden=(16,),
                                    d_hidden=(16,), n_critic=2),
         lambda: {"x": img(2, 4, 4) * 0.1, "cond": 1 + 99 * torch.rand(B)}, generate, (B, 2, 4, 4),
         (B, 2, 4, 5), figure="samples"),
    Case("calo_wgan", "deep", dict(data_shape=(3, 4, 2), latent_dim=3, g_hidden=(8, 16),
                                   d_hidden=(16, 8), cond_range=(10.0, 20.0), ratio_ref=0.5,
                                   quantum=0.05, cell_features=False),
         lambda: {"x": img(3, 4, 2), "cond": 10 + 10 * torch.rand(B)}, generate, (B, 3, 4, 2),
         (B, 24), figure="samples"),
    Case("cyclegan", "lsgan-identity", dict(width=4, n_res_blocks=1, d_width=4),
         lambda: {"x": img(1, 16, 16), "y": img(1, 16, 16)},
         lambda m, b: m.generators["ab"](b["x"]), (B, 1, 16, 16), (B, 2, 16, 16), figure="a_to_b"),
    Case("cyclegan", "bce-1to2-channels", dict(channels_b=2, width=4, n_down=2, n_res_blocks=1,
                                               d_width=4, adversarial="bce", identity_weight=0.0,
                                               output="tanh"),
         lambda: {"x": img(1, 16, 16) * 2 - 1, "y": img(2, 16, 16) * 2 - 1},
         lambda m, b: m.generators["ab"](b["x"]), (B, 2, 16, 16), (B, 16, 16), figure="a_to_b"),
    Case("autoregressive", "8px", dict(image_size=8, columns=4, hidden=8, embed=4, kernel=3),
         lambda: {"x": img(1, 8, 8).round(), "cond": 1.6 + 1.6 * torch.rand(B)},
         lambda m, b: m.logits(2 * b["x"][:, 0] - 1, b["cond"]), (B, 8, 8), (B, 1, 16, 16),
         figure="samples"),
    Case("autoregressive", "6px-mh", dict(image_size=6, columns=3, hidden=5, embed=2, kernel=5,
                                          mh_steps=2),
         lambda: {"x": img(1, 6, 6).round()}, lambda m, b: m.sample(B, b), (B, 1, 6, 6),
         (B, 6, 6), figure="samples"),
    Case("aae", "image-bernoulli", dict(data_shape=(1, 8, 8), hidden=(32,), latent_dim=4,
                                        d_hidden=(16,)),
         lambda: {"x": img(1, 8, 8)}, lambda m, b: m.decode(m.encode(b["x"])), (B, 1, 8, 8),
         (B, 8, 8), figure="samples"),
    Case("aae", "vector-gaussian", dict(data_shape=(6,), hidden=(16, 16), latent_dim=2,
                                        decoder="gaussian"),
         lambda: {"x": torch.randn(B, 6)}, lambda m, b: m.decode(m.encode(b["x"])), (B, 6), (B, 7),
         figure="samples"),
]


def train(model: Trainable, batches: Batch | Callable[[int], Batch], steps: int,
          lr: float = 1e-2) -> dict[str, list[float]]:
    """The trainer's loop in miniature: one Adam per OptimizerSpec, phases in order, each repeated
    `schedule` times per step; `batches` is a fixed batch or step -> batch. Returns each phase's
    losses."""
    opts = {s.name: torch.optim.Adam(s.module.parameters(), lr * s.lr_scale, betas=s.betas)
            for s in model.optimizers()}
    history: dict[str, list[float]] = {name: [] for name in opts}
    model.train()
    for step in range(steps):
        batch = batches(step) if callable(batches) else batches
        for name in opts:
            for _ in range(model.schedule[name]):
                opts[name].zero_grad(set_to_none=True)
                loss = model.losses(batch, name)["loss"]
                loss.backward()
                opts[name].step()
                history[name].append(loss.item())
    return history


def ends(history: list[float], k: int = 5) -> tuple[float, float]:
    """Mean of the first and of the last k losses (smooths out one noisy step)."""
    return sum(history[:k]) / k, sum(history[-k:]) / k


def sines(n: int = 16, length: int = 40) -> torch.Tensor:
    """(n, length) sines of one frequency and random phases."""
    g = torch.Generator().manual_seed(0)
    return torch.sin(0.3 * torch.arange(length) + 6.28 * torch.rand(n, 1, generator=g))


def frequencies(n: int = 16, length: int = 32,
                gap: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, length) sines with random phases, of frequency 0.2 (label 0) or 0.2 + gap (label 1)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    phase = 6.28 * torch.rand(n, 1, generator=g)
    return torch.sin((0.2 + gap * y[:, None]) * torch.arange(length) + phase), y
