"""Images the model families log: fixed noise for sample grids, [0, 1] scaling, heatmaps, forecast
and field figures."""
from __future__ import annotations

import torch


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
