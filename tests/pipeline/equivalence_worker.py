"""Run by tests/pipeline/test_trainer_dist.py under mpirun (2 ranks) or alone (the reference).

Feeds the real pipeline.train.loop.train_step fixed batches cut from one global batch per step:
  ranks   each of 2 ranks takes its half (the data-parallel run under test);
  global  one process takes the whole global batch;
  halves  one process takes the global batch as 2 accumulated halves (batch norm then sees the
          same per-rank batches as in `ranks`: CPU has no SyncBatchNorm).
The models' Gaussian noise comes from one seeded stream per call, cut the same way, so the three
modes draw identical noise per sample. Plain SGD (Adam's update hardly changes when every gradient
doubles, so it cannot tell a sum over ranks from a mean). Batch-norm running statistics are
compared too: each rank keeps its own, averaged over ranks at the end (as the trainer does); the
`halves` reference keeps one set per half. Writes {model: {"param/..", "buffer/.."}, model/start:
initial parameters} from rank 0.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from pipeline.config import load_config
from pipeline.data.store import open_store
from pipeline.runtime.dist import init_distributed
from pipeline.train.assembly import build
from pipeline.train.loop import train_step

RANDN, RANDN_LIKE = torch.randn, torch.randn_like

SGD = ["train.optim.name=sgd", "train.optim.momentum=0"]
MODELS = {  # model, overrides (lr: each moves its weights well past the tolerance in 4 steps)
    "mlp": ["model=mlp", "model.in_features=256", "model.out_features=2",
            "data.inputs={x: spins, y: phase}", "train.lr=0.1", *SGD],
    "vae": ["model=vae", "model.image_size=16", "train.lr=0.001", *SGD],
    "gan": ["model=gan", "model.data_shape=[1,16,16]", "train.lr=0.05", *SGD],
}


class SlicedNoise:
    """torch.randn(_like) replacement: call k of slot s returns rows [sB, (s+1)B) of a
    (B * slots)-row draw from a generator seeded with k, so noise depends on the sample, not the split."""

    def __init__(self, slots: int):
        self.slots, self.slot, self.calls = slots, 0, [0] * slots
        self.randn = torch.randn

    def __call__(self, *shape, generator=None, **kw):
        if generator is not None:  # the models' own fixed-noise figures: leave them alone
            return self.randn(*shape, generator=generator, **kw)
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        g = torch.Generator().manual_seed(1000 + self.calls[self.slot])
        self.calls[self.slot] += 1
        full = self.randn((shape[0] * self.slots, *shape[1:]), generator=g, dtype=kw.get("dtype"))
        return full[self.slot * shape[0]:(self.slot + 1) * shape[0]]

    def like(self, t, **kw):
        return self(*t.shape, dtype=t.dtype)


def global_batches(store, steps: int, size: int):
    x = torch.from_numpy(store.split("train")["spins"][: steps * size].astype(np.float32))
    y = torch.from_numpy(store.split("train")["phase"][: steps * size].astype(np.int64))
    x = (x + 1) / 2
    return [{"x": x[i * size:(i + 1) * size], "y": y[i * size:(i + 1) * size]} for i in range(steps)]


def main(backend: str, mode: str, out: str, overrides: list[str], steps: int = 4, batch: int = 16):
    results = {}
    overrides = [o for o in overrides if not o.startswith("model.")]  # each model sets its own
    for name, extra in MODELS.items():
        accumulate = 2 if mode == "halves" else 1
        cfg = load_config("demo", overrides + extra + [f"train.dist.backend={backend}",
                                                       f"train.accumulate={accumulate}",
                                                       "train.logger.mode=disabled"])
        dist = results.get("_dist") or init_distributed(cfg.train.dist)
        results["_dist"] = dist
        trainer = build(cfg, dist)
        noise = SlicedNoise(slots=dist.world_size if mode == "ranks" else (2 if mode == "halves" else 1))
        torch.randn, torch.randn_like = noise, noise.like
        start = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        buffers = list(trainer.model.buffers())
        slots = [[b.clone() for b in buffers] for _ in range(2)]  # halves: one set per half
        if mode == "halves":  # tell the noise which half each micro-batch is
            orig = trainer.model.losses

            def losses(b, phase, orig=orig):
                noise.slot = h = b["half"]
                for live, mine in zip(buffers, slots[h]):
                    live.copy_(mine)
                out = orig({k: v for k, v in b.items() if k != "half"}, phase)
                for live, mine in zip(buffers, slots[h]):
                    mine.copy_(live)
                return out
            trainer.model.losses = losses
        elif mode == "ranks":
            noise.slot = dist.rank
        for g in global_batches(open_store(cfg.data.path), steps, 2 * batch):
            if mode == "ranks":
                part = {k: v[dist.rank * batch:(dist.rank + 1) * batch] for k, v in g.items()}
                train_step(trainer, [part])
            elif mode == "global":
                train_step(trainer, [g])
            else:
                train_step(trainer, [{**{k: v[h * batch:(h + 1) * batch] for k, v in g.items()},
                                     "half": h} for h in (0, 1)])
        torch.randn, torch.randn_like = RANDN, RANDN_LIKE
        if mode == "ranks":
            dist.average_buffers(trainer.model)
        elif mode == "halves":
            for b, a, c in zip(buffers, *slots):
                b.copy_((a + c) / 2 if b.is_floating_point() else a)
        results[name] = {**{f"param/{k}": v.detach().clone()
                            for k, v in trainer.model.named_parameters()},
                         **{f"buffer/{k}": v.clone() for k, v in trainer.model.named_buffers()}}
        results[f"{name}/start"] = start
    dist = results.pop("_dist")
    if dist.is_main:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
