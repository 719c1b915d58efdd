"""Blocks, objectives and figure helpers shared by several model families."""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Batch, InputShapeError, Trainable, check_shape

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
               "leaky_relu": lambda: nn.LeakyReLU(0.2)}  # 0.2: the slope of Radford et al. 2015


# --------------------------------------------------------------------------- blocks
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


# --------------------------------------------------------------------------- objectives
def check_loss(family: str, loss: str, allowed: tuple[str, ...]) -> None:
    if loss not in allowed:
        raise ValueError(f"{family}: loss {loss!r}: expected one of {', '.join(allowed)}")


def check_labels(name: str, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Class labels as int64 indices: any integer dtype (stores keep int8) in [0, n_classes).
    The range is checked on the labels' device, not read on the host at every step (issue 28: a
    read waits for a GPU's queue): on the CPU a bad label is refused here, on a GPU it is a
    device-side assert (the store's class table is checked before the run starts, run.py)."""
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputShapeError(f"{name}: expected integer class indices, got dtype {y.dtype}; "
                              f"store labels as integers or use a regression loss")
    if y.numel() and not _in_range(y, n_classes):
        raise InputShapeError(f"{name}: expected class indices in [0, {n_classes}), got values in "
                              f"[{int(y.min())}, {int(y.max())}]; check the model's class count")
    return y.long()


def _in_range(y: torch.Tensor, n: int) -> bool:
    try:
        torch._assert_async(((y >= 0) & (y < n)).all(), "class index out of range")
        return True
    except RuntimeError:  # (raised at once on the CPU; on a GPU the assert fires on the device)
        return False


def supervised_losses(out: torch.Tensor, y: torch.Tensor, loss: str) -> dict[str, torch.Tensor]:
    """Named losses of a prediction `out` against the target `y`.

    ce / hinge: logits (B, K, ...) against int64 labels (B, ...), also reports accuracy;
    bce: one logit per sample (B, 1) against 0/1 targets (B,); mse: `y` shaped like `out`, or
    one scalar per sample (B,) for one output (B, 1), as a store keeps a per-sample quantity.
    """
    if loss == "mse":
        if y.dim() == 1 and tuple(out.shape[1:]) == (1,):
            y = y[:, None]
        check_shape("target y", y, tuple(out.shape))
        return {"loss": F.mse_loss(out, y.to(out.dtype))}
    if loss == "bce":
        check_shape("target y", y, (out.shape[0],))
        logit = out.squeeze(1)
        acc = ((logit > 0) == (y > 0.5)).float().mean()
        return {"loss": F.binary_cross_entropy_with_logits(logit, y.to(out.dtype)), "accuracy": acc}
    check_shape("target y", y, (out.shape[0], *out.shape[2:]))
    y = check_labels("target y", y, out.shape[1])
    acc = (out.argmax(1) == y).float().mean()
    if loss == "ce":
        return {"loss": F.cross_entropy(out, y), "accuracy": acc}
    if loss == "hinge":  # multi-class margin loss (Crammer & Singer style, torch's multi_margin)
        flat = out.movedim(1, -1).reshape(-1, out.shape[1])
        return {"loss": F.multi_margin_loss(flat, y.reshape(-1)), "accuracy": acc}
    raise ValueError(f"loss {loss!r}: expected one of ce, hinge, bce, mse")


def relative_l2(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ||pred - truth|| / ||truth|| (the usual error of field surrogates)."""
    err = (pred - truth).flatten(1).norm(dim=1)
    return (err / truth.flatten(1).norm(dim=1).clamp_min(1e-12)).mean()


def reconstruction_loss(out: torch.Tensor, x: torch.Tensor, decoder: str) -> torch.Tensor:
    """Mean per element: BCE on logits ("bernoulli", x in [0, 1]) or MSE ("gaussian")."""
    if decoder == "bernoulli":
        return F.binary_cross_entropy_with_logits(out, x)
    return F.mse_loss(out, x)


def decoded(out: torch.Tensor, decoder: str) -> torch.Tensor:
    """The decoder's mean: sigmoid of the logits (Bernoulli) or the output itself (Gaussian)."""
    return torch.sigmoid(out) if decoder == "bernoulli" else out


def adversarial_loss(logits: torch.Tensor, real: bool, kind: str = "bce") -> torch.Tensor:
    """Loss pushing D's logits toward "real" or "fake": BCE (Goodfellow et al. 2014) or least
    squares (LSGAN, Mao et al. 2017). For G, real=True gives the non-saturating loss."""
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    raise ValueError(f"adversarial loss {kind!r}: expected 'bce' or 'lsgan'")


# --------------------------------------------------------------------------- figures
def fixed_noise(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """The same (n, dim) standard normal batch every call, so samples are comparable over time."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def to_unit(x: torch.Tensor, output: str) -> torch.Tensor:
    """Map a generator's output range ("sigmoid" or "tanh") onto [0, 1] for logging."""
    return ((x + 1) / 2 if output == "tanh" else x).clamp(0, 1)


def heatmap(*rows: torch.Tensor) -> torch.Tensor:
    """One (1, 1, H, W) image in [0, 1] from 2-D tensors stacked vertically, each min-max scaled
    over all of them (so prediction and truth share a colour scale)."""
    stack = torch.cat([r.detach().float().reshape(r.shape[0], -1) for r in rows])
    lo, hi = stack.min(), stack.max()
    return ((stack - lo) / (hi - lo).clamp_min(1e-12))[None, None]


def as_images(x: torch.Tensor) -> torch.Tensor:
    """Samples in [0, 1] as loggable images (N, 1 or 3, H, W): 1- or 3-channel images as they are,
    other channel counts (e.g. calorimeter layers) averaged into one, vectors as heat-map rows."""
    if x.dim() != 4:
        return x.flatten(1)[None, None]
    return x if x.shape[1] in (1, 3) else x.mean(1, keepdim=True)


def forecast_figure(pred: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sequences (N, T) as one heat-map: N rows of truth, then of prediction, then of |error|."""
    return {"forecast": heatmap(truth, pred, (pred - truth).abs())}


def field_figures(out: torch.Tensor, y: torch.Tensor, loss: str) -> dict[str, torch.Tensor]:
    """Prediction, truth and absolute error images of a dense model's output (N, K, H, W):
    the first field against y[:, :1] (mse), or the argmax class against labels y (N, H, W).
    Prediction and truth share the truth's range so they are comparable; all lie in [0, 1]."""
    if loss == "mse":
        pred, truth = out[:, :1], y[:, :1].to(out.dtype)
    else:
        pred, truth = out.argmax(1, keepdim=True).float(), y[:, None].float()
    lo = truth.amin(dim=(1, 2, 3), keepdim=True)
    span = (truth.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp_min(1e-12)
    err = (pred - truth).abs()
    return {"prediction": ((pred - lo) / span).clamp(0, 1), "truth": (truth - lo) / span,
            "error": (err / err.amax().clamp_min(1e-12))}


class Supervised(Trainable):
    """A single network trained on (x, y) with `self.cfg.loss` (see `supervised_losses`)."""

    cfg: Any  # the family's config dataclass; it has a `loss` field

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        return supervised_losses(self(batch["x"]), batch["y"], self.cfg.loss)


# --------------------------------------------------------------------------- Ising spins
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
