"""Run on 2 ranks by test_dist.py: ddp's gradient buckets, all-reduced while backward runs."""
from __future__ import annotations

import copy
import json
import sys

import torch

from pipeline.config import DistConfig
from pipeline.runtime.dist import init_distributed


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
    flat = torch.cat([p.grad.reshape(-1) for p in ref.parameters()]) / dist.world_size
    dist.td.all_reduce(flat)
    expected = list(flat.split([p.numel() for p in ref.parameters()]))
    # accumulation over 2 backward passes: nothing starts before the second
    acc_opt = dist.optimizer(torch.optim.SGD(acc.parameters(), lr=0.1), acc, prefix="acc",
                             accumulate=2)
    acc_started, acc_grads = grads_after(acc, dist, acc_opt, x, 2)
    # a head that only rank 1 uses: rank 0 contributes zeros to its bucket (no size mismatch)
    torch.manual_seed(1)
    trunk, head = torch.nn.Linear(20, 8), torch.nn.Linear(8, 4)
    both = torch.nn.ModuleDict({"trunk": trunk, "head": head})
    ref1 = copy.deepcopy(both)  # rank 1's own gradient of the head, computed on every rank
    x1 = torch.randn(5, 20, generator=torch.Generator().manual_seed(1))
    ref1["head"](ref1["trunk"](x1)).square().mean().backward()
    both_opt = dist.optimizer(torch.optim.SGD(both.parameters(), lr=0.1), both, prefix="both")
    h = trunk(x)
    (h if dist.rank == 0 else head(h)).square().mean().backward()
    had_grad = head.weight.grad is not None
    dist.synchronize(both_opt)  # (no other collective before it: rank 1's bucket is in flight)
    had_grad = dist.gather_object(had_grad)
    out = {"buckets": len(dist._buckets[id(opt)].buckets), "started": started,
           "unused_had_grad": had_grad,
           "unused_mean": torch.equal(head.weight.grad, ref1["head"].weight.grad / 2),
           "equal": all(torch.equal(g.reshape(-1), e) for g, e in zip(grads, expected)),
           "acc_started": acc_started,
           "acc_equal": all(torch.equal(a, 2 * g) for a, g in zip(acc_grads, grads)),
           "again": grads_after(net, dist, opt, x, 1)[0]}
    with open(f"{sys.argv[1]}.{dist.rank}", "w") as f:
        json.dump(out, f)
    dist.shutdown()
