"""Trainer benchmarks (trainer issue), run on N ranks by benchmarks/run.py:

    python -m benchmarks.trainer OUT trainer STORE BACKEND STEPS   # hpcforge's Trainer.fit
    python -m benchmarks.trainer OUT loop    MODEL BACKEND STEPS   # a minimal hand-written loop

`loop` is the baseline a Horovod user would write: the same model, batches already in memory,
hvd.DistributedOptimizer, zero_grad/backward/step. Rank 0 writes {"steps_per_s", "samples_per_s"}.
"""
from __future__ import annotations

import json
import sys
import time

import torch

BATCH = 32  # per rank


def _config(store: str, backend: str, steps: int, model: str):
    from pipeline.config import load_config
    extra = ["model=vae", "model.image_size=16"] if model == "vae" else []
    return load_config("demo", [f"data.path={store}", f"output_dir={store}.bench",
                                f"train.dist.backend={backend}", f"train.max_steps={steps}",
                                "train.epochs=1000", f"train.batch_size={BATCH}", "train.threads=1",
                                "train.logger.mode=disabled", "train.logger.log_every=1000000",
                                "train.logger.images_every=0", *extra])


def run_trainer(store: str, backend: str, steps: int) -> dict:
    from pipeline.dist import init_distributed
    from pipeline.trainer import Trainer
    cfg = _config(store, backend, steps, "vae")
    dist = init_distributed(cfg.train.dist)
    trainer = Trainer(cfg, dist)
    dist.barrier()
    t0 = time.perf_counter()
    trainer.fit()
    dt = time.perf_counter() - t0
    return {"steps_per_s": steps / dt, "samples_per_s": steps * BATCH * dist.size / dt,
            "rank": dist.rank}


def run_loop(model_name: str, backend: str, steps: int) -> dict:
    """The baseline: no loader, no metrics, no checkpoints; plain Horovod (or plain DDP)."""
    import horovod.torch as hvd
    from models import MODELS
    torch.set_num_threads(1)
    hvd.init()
    if model_name == "vae":
        cfg_cls, build = MODELS["vae"]
        model = build(cfg_cls(image_size=16))
        batch = {"x": torch.rand(BATCH, 1, 16, 16).round()}
        phase = "model"
    else:  # a compute-bound CNN for weak scaling
        cfg_cls, build = MODELS["resnet"]
        model = build(cfg_cls())
        batch = {"x": torch.randn(BATCH, 1, 32, 32), "y": torch.randint(0, 10, (BATCH,))}
        phase = model.optimizers()[0].name
    opt = hvd.DistributedOptimizer(torch.optim.Adam(model.parameters(), 1e-3),
                                   named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def step():
        opt.zero_grad()
        model.losses(batch, phase)["loss"].backward()
        opt.step()
    for _ in range(3):
        step()
    hvd.allreduce(torch.zeros(1), name="sync")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    dt = time.perf_counter() - t0
    return {"steps_per_s": steps / dt, "samples_per_s": steps * BATCH * hvd.size() / dt,
            "rank": hvd.rank()}


if __name__ == "__main__":
    out, mode, what, backend, steps = sys.argv[1:6]
    result = run_trainer(what, backend, int(steps)) if mode == "trainer" else run_loop(what, backend, int(steps))
    if result["rank"] == 0:
        with open(out, "w") as f:
            json.dump(result, f)
