"""Transformer encoder (Vaswani et al. 2017, arXiv:1706.03762) over sequences (B, T, F): scaled
dot-product multi-head self-attention, sinusoidal positional encoding, pre-norm residual blocks
(Xiong et al. 2020, arXiv:2002.04745, stable without warm-up). Forecasts the next `horizon` steps
from the last position's encoding (MSE), or classifies the sequence from the mean encoding."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.base import Batch, check_shape
from models.blocks import SinusoidalEncoding
from models.figures import forecast_figure
from models.objectives import Supervised, check_loss


@dataclass
class TransformerConfig:
    in_features: int = 1          # features F per time step
    d_model: int = 32             # width of every token; divisible by n_heads
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 64                # hidden width of each feed-forward block
    dropout: float = 0.0
    max_len: int = 512            # longest sequence the positional encoding covers
    causal: bool = False          # mask attention to earlier steps only
    loss: Literal["mse", "ce", "hinge"] = "mse"  # mse: forecast; ce/hinge: classify the sequence
    horizon: int = 8              # steps forecast (mse): y (B, horizon, F)
    n_classes: int = 2            # classes (ce, hinge)


class SelfAttention(nn.Module):
    """Multi-head self-attention computed by F.scaled_dot_product_attention: one call that takes
    PyTorch's fused kernels (flash / memory-efficient on a GPU) instead of materialising the
    (B, heads, T, T) softmax (issue #16). The weights themselves come only from `weights()`."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, causal: bool):
        super().__init__()
        self.n_heads, self.causal, self.dropout = n_heads, causal, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)   # (B, T, D) -> (B, T, 3D)
        self.proj = nn.Linear(d_model, d_model)      # (B, T, D) -> (B, T, D)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        # (B, T, 3D) -> 3 x (B, heads, T, D/heads)
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.heads(x)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))   # (B, heads, T, D/h) -> (B, T, D)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(QK^T / sqrt(d_head)) with the causal mask, (B, heads, T, T), rows sum to 1:
        what forward's fused kernel applies (before dropout), written out for inspection."""
        q, k, _ = self.heads(x)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, T, T)
        if self.causal:
            t = x.shape[1]
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return scores.softmax(-1)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.causal)
        # (B, T, D) -> (B, T, d_ff) -> (B, T, D)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(),
                                nn.Linear(cfg.d_ff, cfg.d_model), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


class Transformer(Supervised):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        check_loss("transformer", cfg.loss, ("mse", "ce", "hinge"))
        if cfg.d_model % cfg.n_heads or cfg.d_model % 2:
            raise ValueError(f"transformer: d_model {cfg.d_model} must be even and divisible by "
                             f"n_heads {cfg.n_heads}")
        self.cfg = cfg
        self.embed = nn.Linear(cfg.in_features, cfg.d_model)       # (B, T, F) -> (B, T, D)
        self.pos = SinusoidalEncoding(cfg.d_model, cfg.max_len)     # (B, T, D) -> (B, T, D)
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.n_layers)])
        self.ln = nn.LayerNorm(cfg.d_model)
        out = cfg.horizon * cfg.in_features if cfg.loss == "mse" else cfg.n_classes
        self.head = nn.Linear(cfg.d_model, out)                     # (B, D) -> (B, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> the forecast (B, horizon, F) for mse, else logits (B, n_classes)."""
        check_shape("transformer input x", x, (None, None, self.cfg.in_features))
        if x.shape[1] > self.cfg.max_len:
            raise ValueError(f"transformer input x: expected T <= max_len {self.cfg.max_len}, got "
                             f"{tuple(x.shape)}; raise max_len or shorten the windows")
        h = self.ln(self.blocks(self.pos(self.embed(x))))
        if self.cfg.loss == "mse":
            return self.head(h[:, -1]).view(-1, self.cfg.horizon, self.cfg.in_features)
        return self.head(h.mean(1))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
        """layer -> its attention weights (B, heads, T, T) for input x (B, T, F), for the chosen
        layers (default all). Runs the blocks as forward does and reads each chosen layer's
        softmax(QK^T) explicitly; forward itself never forms it (SDPA)."""
        check_shape("transformer input x", x, (None, None, self.cfg.in_features))
        chosen = list(range(self.cfg.n_layers)) if layers is None else list(layers)
        bad = [i for i in chosen if not 0 <= i < self.cfg.n_layers]
        if bad:
            raise ValueError(f"transformer attention_maps: layers {bad} out of range; the model "
                             f"has layers 0..{self.cfg.n_layers - 1}")
        h, maps = self.pos(self.embed(x)), {}
        for i, block in enumerate(self.blocks):
            if i in chosen:
                maps[i] = block.attn.weights(block.ln1(h))
            h = block(h)
        return maps

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.cfg.loss != "mse":
            return {}
        return forecast_figure(self(batch["x"][:8])[..., 0], batch["y"][:8, :, 0])


def build(cfg: TransformerConfig) -> Transformer:
    return Transformer(cfg)
