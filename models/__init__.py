"""Model families. `MODELS` maps a config name to (config class, build function)."""
from __future__ import annotations

from typing import Any

from models import (aae, autoencoder, autoregressive, calo_wgan, cgan, cnn, cnn1d, cyclegan, dcgan,
                    dilated, fno, gan, mlp, resnet, rnn, tower, transformer, unet, vae, wgan_gp)

MODELS = {
    "mlp": (mlp.MLPConfig, mlp.build),
    "cnn": (cnn.CNNConfig, cnn.build),
    "resnet": (resnet.ResNetConfig, resnet.build),
    "tower": (tower.TowerConfig, tower.build),
    "dilated_cnn": (dilated.DilatedConfig, dilated.build),
    "cnn1d": (cnn1d.CNN1DConfig, cnn1d.build),
    "unet": (unet.UNetConfig, unet.build),
    "fno": (fno.FNOConfig, fno.build),
    "rnn": (rnn.RNNConfig, rnn.build),
    "transformer": (transformer.TransformerConfig, transformer.build),
    "autoencoder": (autoencoder.AutoencoderConfig, autoencoder.build),
    "vae": (vae.VAEConfig, vae.build),
    "gan": (gan.GANConfig, gan.build),
    "dcgan": (dcgan.DCGANConfig, dcgan.build),
    "wgan_gp": (wgan_gp.WGANGPConfig, wgan_gp.build),
    "cgan": (cgan.CGANConfig, cgan.build),
    "calo_wgan": (calo_wgan.CaloWGANConfig, calo_wgan.build),
    "cyclegan": (cyclegan.CycleGANConfig, cyclegan.build),
    "aae": (aae.AAEConfig, aae.build),
    "autoregressive": (autoregressive.AutoregressiveConfig, autoregressive.build),
}


def config_class(name: str) -> type:
    """The dataclass that types `model.params` for family `name`. The registry owns its names, so
    an unknown one is refused here, listing the families (pipeline/config/__init__.py adds the key)."""
    if name not in MODELS:
        raise LookupError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name][0]


def build(name: str, params: Any) -> Any:
    """Family `name` built from its config dataclass `params` (a `models.base.Trainable`): the one
    place a model is made, for training and for every analysis of a checkpoint alike."""
    config_class(name)   # an unknown name is refused here, listing the families
    return MODELS[name][1](params)
