"""Run on 2 ranks by test_dist.py: the Horovod backend's step-boundary collectives."""
from __future__ import annotations

import json
import sys

import torch

from pipeline.config import DistConfig
from pipeline.runtime.dist import init_distributed

if __name__ == "__main__":
    dist = init_distributed(DistConfig(backend="horovod"))
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(dist.rank))                  # ranks 0 and 1: mean 0.5
    bn.running_var.fill_(2.0 + 2 * dist.rank)                # 2 and 4: mean 3
    dist.average_buffers(bn)
    averaged = [bn.running_mean.tolist(), bn.running_var.tolist()]
    quiet = dist.begin_sum([0.0, 7.0 if dist.rank == 0 else 0.0])()
    flagged = dist.begin_sum([float(dist.rank == 1), 0.0])()  # only rank 1 saw the signal
    means = dist.mean({"loss": 1.0 + dist.rank, "lr": 0.25})
    # a sum in flight while other collectives run on the same communicator
    bn.running_mean.fill_(float(dist.rank) * 4)              # 0 and 4: mean 2
    finish = dist.begin_sum([float(dist.rank == 0), 3.0])
    during = dist.mean({"x": 10.0 * dist.rank})
    dist.average_buffers(bn)
    overlapped = finish()
    gathered = dist.gather_object({"rank": dist.rank})
    broadcast = dist.broadcast_object("rank 0's" if dist.rank == 0 else None)
    out = {"own_comm": dist._comm is not None, "quiet": quiet, "flagged": flagged, "means": means,
           "averaged": averaged,
           "tracked": int(bn.num_batches_tracked), "during": during, "overlapped": overlapped,
           "overlapped_mean": bn.running_mean.tolist(), "gathered": gathered,
           "broadcast": broadcast}
    with open(f"{sys.argv[1]}.{dist.rank}", "w") as f:
        json.dump(out, f)
    dist.shutdown()
