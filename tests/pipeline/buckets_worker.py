"""Run on 2 ranks by test_dist.py: ddp's gradient buckets, all-reduced while backward runs."""
from __future__ import annotations

import copy
import json
import sys

import torch

from pipeline.config import DistConfig
from pipeline.dist import init_distributed


def grads_after(model, dist, opt, x, passes: int) -> tuple[list[int], list[torch.Tensor]]:
    """Buckets started after each backward pass (before synchronize), then the averaged grads."""
    started = []
    opt.zero_grad()
    for _ in range(passes):
        model(x).square().mean().backward()
        started.append(dist._buckets[id(opt)].started)
    dist.synchronize(opt)
    return started, [p.grad.clone() for p in model.parameters()]


if __name__ == "__main__":
    # 256-byte buckets, filled last layer first: (bias 8 + weight 320 bytes), (160 + 1280), (32 + 640)
    dist = init_distributed(DistConfig(backend="ddp", bucket_mb=256 / 2 ** 20))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.Linear(8, 40), torch.nn.Linear(40, 2))
    ref, acc = copy.deepcopy(net), copy.deepcopy(net)
    x = torch.randn(5, 20, generator=torch.Generator().manual_seed(dist.rank))  # differs per rank
    opt = dist.optimizer(torch.optim.SGD(net.parameters(), lr=0.1), net, prefix="net")
    started, grads = grads_after(net, dist, opt, x, 1)
    # the reference: this rank's own gradients, then one flat mean over the ranks
    ref(x).square().mean().backward()
    flat = torch.cat([p.grad.reshape(-1) for p in ref.parameters()]) / dist.size
    dist.td.all_reduce(flat)
    expected = list(flat.split([p.numel() for p in ref.parameters()]))
    # accumulation over 2 backward passes: nothing starts before the second
    acc_opt = dist.optimizer(torch.optim.SGD(acc.parameters(), lr=0.1), acc, prefix="acc",
                             accumulate=2)
    acc_started, acc_grads = grads_after(acc, dist, acc_opt, x, 2)
    out = {"buckets": len(dist._buckets[id(opt)].buckets), "started": started,
           "equal": all(torch.equal(g.reshape(-1), e) for g, e in zip(grads, expected)),
           "acc_started": acc_started,
           "acc_equal": all(torch.equal(a, 2 * g) for a, g in zip(acc_grads, grads)),
           "again": grads_after(net, dist, opt, x, 1)[0]}
    with open(f"{sys.argv[1]}.{dist.rank}", "w") as f:
        json.dump(out, f)
    dist.shutdown()
