"""Network building blocks shared by several model families: activations, norms, MLPs, conv
stacks, residual blocks, positional encodings, weight init, freezing."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
               "leaky_relu": lambda: nn.LeakyReLU(0.2)}  # 0.2: the slope of Radford et al. 2015


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r}: expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def norm2d(kind: bool | str, channels: int) -> nn.Module:
    """True or "batch": BatchNorm2d; "instance": affine InstanceNorm2d (CycleGAN); False: none."""
    if kind in (True, "batch"):
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind in (False, "none"):
        return nn.Identity()
    raise ValueError(f"norm {kind!r}: expected 'batch', 'instance' or 'none'")


def needs_bias(norm: bool | str) -> bool:
    """A conv followed by a norm layer needs no bias: the norm's shift takes its place."""
    return norm in (False, "none")


def mlp(sizes: tuple[int, ...], act: str = "relu", dropout: float = 0.0,
        batchnorm: bool = False) -> nn.Sequential:
    """(B, sizes[0]) -> (B, sizes[-1]); hidden layers get [BatchNorm], activation, [Dropout];
    the last layer is linear (logits or raw regression outputs)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(b)] if batchnorm else []
            layers.append(activation(act))
            layers += [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers)


def fc_autoencoder(shape: tuple[int, ...], hidden: tuple[int, ...],
                   latent_dim: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Mirrored MLP encoder (B, *shape) -> (B, latent_dim) and decoder back to (B, *shape)."""
    sizes = (math.prod(shape), *hidden, latent_dim)
    return (nn.Sequential(nn.Flatten(), mlp(sizes)),
            nn.Sequential(mlp(sizes[::-1]), nn.Unflatten(1, shape)))


def conv_block(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, dilation: int = 1,
               norm: bool | str = True, act: str = "relu") -> nn.Sequential:
    """Conv ("same" padding) + norm + activation: (B, c_in, H, W) -> (B, c_out, H/s, W/s)."""
    pad = dilation * (kernel - 1) // 2
    conv = nn.Conv2d(c_in, c_out, kernel, stride, pad, dilation=dilation, bias=needs_bias(norm))
    return nn.Sequential(conv, norm2d(norm, c_out), activation(act))


def conv_down(c_in: int, c_out: int, norm: bool | str = True,
              padding_mode: str = "zeros") -> nn.Sequential:
    """Strided 4x4 convolution halving the resolution: (B, c_in, H, W) -> (B, c_out, H/2, W/2).
    padding_mode "circular" wraps around, for periodic lattices."""
    conv = nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=needs_bias(norm),
                     padding_mode=padding_mode)
    return nn.Sequential(conv, norm2d(norm, c_out), nn.LeakyReLU(0.2))


def conv_up(c_in: int, c_out: int, norm: bool | str = True) -> nn.Sequential:
    """Transposed 4x4 convolution doubling the resolution: (B, c_in, H, W) -> (B, c_out, 2H, 2W)."""
    conv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=needs_bias(norm))
    return nn.Sequential(conv, norm2d(norm, c_out), nn.ReLU())


def conv_encoder(channels: tuple[int, ...], norm: bool | str = True,
                 padding_mode: str = "zeros") -> nn.Sequential:
    """Stack of conv_down, no norm on the input layer (Radford et al. 2015):
    (B, channels[0], S, S) -> (B, channels[-1], S / 2**n, S / 2**n), n = len(channels) - 1."""
    return nn.Sequential(*[conv_down(a, b, norm=norm if i > 0 else False, padding_mode=padding_mode)
                           for i, (a, b) in enumerate(zip(channels[:-1], channels[1:]))])


def conv_decoder(channels: tuple[int, ...], out_channels: int) -> nn.Sequential:
    """Stack of conv_up and a plain transposed conv (no norm at the output, Radford et al. 2015):
    (B, channels[0], s, s) -> (B, out_channels, s * 2**n, s * 2**n), n = len(channels)."""
    ups = [conv_up(a, b) for a, b in zip(channels[:-1], channels[1:])]
    return nn.Sequential(*ups, nn.ConvTranspose2d(channels[-1], out_channels, 4, 2, 1))


def periodic_decoder(channels: tuple[int, ...], out_channels: int) -> nn.Sequential:
    """conv_decoder for periodic lattices: nearest 2x upsampling then a 3x3 convolution with
    circular padding per level (a transposed convolution cannot wrap around the boundary), so the
    generator sees the lattice's left and right edges as neighbours, as the Hamiltonian does:
    (B, channels[0], s, s) -> (B, out_channels, s * 2**n, s * 2**n), n = len(channels)."""
    def up(c_in: int, c_out: int, bias: bool) -> list[nn.Module]:
        return [nn.Upsample(scale_factor=2),
                nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias, padding_mode="circular")]
    layers: list[nn.Module] = []
    for a, b in zip(channels[:-1], channels[1:]):
        layers += [*up(a, b, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
    return nn.Sequential(*layers, *up(channels[-1], out_channels, bias=True))


class BasicBlock(nn.Module):
    """Residual basic block (He et al. 2016, arXiv:1512.03385): two 3x3 convs plus a shortcut,
    the identity when the shape is kept, else a strided 1x1 projection (their option B)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, norm: bool | str = True):
        super().__init__()
        # (B, c_in, H, W) -> (B, c_out, H/stride, W/stride)
        self.conv1 = conv_block(c_in, c_out, 3, stride, norm=norm)
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=needs_bias(norm)),
                                   norm2d(norm, c_out))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          norm2d(norm, c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class SinusoidalEncoding(nn.Module):
    """Fixed positional encoding of Vaswani et al. 2017 (arXiv:1706.03762), added to the input."""

    def __init__(self, d_model: int, max_len: int):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        freq = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
        self.register_buffer("pe", pe, persistent=False)  # derived, not worth checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[: x.shape[1]]  # (B, T, D) -> (B, T, D)


def output_activation(name: str) -> nn.Module:
    """Generator output range: "sigmoid" for data in [0, 1] (minmax), "tanh" for [-1, 1]."""
    if name not in ("sigmoid", "tanh"):
        raise ValueError(f"output {name!r}: expected 'sigmoid' (data in [0, 1]) or 'tanh' "
                         f"(data in [-1, 1])")
    return activation(name)


def init_dcgan_weights(module: nn.Module) -> None:
    """N(0, 0.02) weights, N(1, 0.02) norm scales, zero biases (Radford et al. 2015, sec. 4)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Stop gradients into `modules` for a block (e.g. D while G is updated); restores the flags."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
