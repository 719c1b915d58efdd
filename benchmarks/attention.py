"""SelfAttention: forward+backward steps/s of scaled_dot_product_attention (models/transformer.py,
issue #16) against the explicit softmax(QK^T) V it replaced, at configs/experiment/
transformer_lorenz96.yaml's size (batch 64, 16 frames of 40 sites, d_model 64, 4 heads, 2 layers).

Both sides are the same Transformer with the same weights; the "explicit" side swaps each layer's
forward for the pre-#16 formula. They run in turn, `rounds` times, each timed for a few seconds per
round; the ratio is the median over rounds of SDPA / explicit steps/s.
`python -m benchmarks.attention [--rounds 7] [--seconds 3] [--threads 1]`
"""
from __future__ import annotations

import argparse
import json
import math
import time
from statistics import median

import torch
import torch.nn.functional as F

from benchmarks.table import row


def explicit_forward(attn, x: torch.Tensor) -> torch.Tensor:
    """The hand-written attention models/transformer.py had before issue #16."""
    b, t, d = x.shape
    q, k, v = attn.heads(x)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d // attn.n_heads)
    if attn.causal:
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    w = F.dropout(scores.softmax(-1), attn.dropout, attn.training)
    return attn.proj((w @ v).transpose(1, 2).reshape(b, t, d))


def _setup():
    from pipeline.config import load_config
    from pipeline.train.assembly import build_model
    cfg = load_config("transformer_lorenz96")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    m = model.cfg
    x = torch.randn(cfg.train.batch_size, cfg.data.params.window_in, m.in_features)
    y = torch.randn(cfg.train.batch_size, m.horizon, m.in_features)
    return model, x, y


def _rate(model, x, y, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t0 < seconds:
        model.zero_grad()
        F.mse_loss(model(x), y).backward()
        n += 1
    return n / (time.perf_counter() - t0)


def measure(rounds: int, seconds: float) -> dict[str, float]:
    model, x, y = _setup()
    layers = [block.attn for block in model.blocks]
    sdpa, explicit = [], []
    for _ in range(rounds):
        sdpa.append(_rate(model, x, y, seconds))
        for a in layers:
            a.forward = lambda h, a=a: explicit_forward(a, h)
        explicit.append(_rate(model, x, y, seconds))
        for a in layers:
            del a.forward
    ratios = sorted(s / e for s, e in zip(sdpa, explicit))
    return {"sdpa_steps_per_s": median(sdpa), "explicit_steps_per_s": median(explicit),
            "ratio_median": median(ratios), "ratio_min": ratios[0], "ratio_max": ratios[-1],
            "rounds": rounds, "threads": torch.get_num_threads(), "torch": torch.__version__}


def bench_attention(quick: bool) -> list[dict]:
    """The `hpcforge bench` row (one thread, as the study above; quick: 1 round of 1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = measure(1 if quick else 7, 1.0 if quick else 3.0)
    finally:
        torch.set_num_threads(threads)
    return [row("attention", "SDPA / explicit, 1 thr", m["sdpa_steps_per_s"],
                 m["explicit_steps_per_s"], "step/s", "report",
                 f"transformer_lorenz96 forward+backward steps/s with scaled_dot_product_attention "
                 f"/ with the explicit softmax(QK^T)V, median of {m['rounds']} rounds run in turn "
                 f"(ratios {m['ratio_min']:.3f}-{m['ratio_max']:.3f}); CPU gains none, GPUs fuse it",
                 ratio=m["ratio_median"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.rounds, args.seconds), indent=2))


if __name__ == "__main__":
    main()
