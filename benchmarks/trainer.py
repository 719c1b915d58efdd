"""Trainer benchmarks (trainer issue), run on N ranks by benchmarks/run.py:

    python -m benchmarks.trainer OUT trainer STORE BACKEND STEPS [MODEL]   # hpcforge's Trainer.fit
    python -m benchmarks.trainer OUT loop    MODEL BACKEND STEPS   # a minimal hand-written loop
    python -m benchmarks.trainer OUT paired  STORE REPEATS STEPS [MODEL]   # both, alternating

`loop` is the baseline a Horovod user would write: the same model, batches already in memory,
torch.optim.Adam as it comes, hvd.DistributedOptimizer, zero_grad/backward/step. Rank 0 writes
{"steps_per_s", "samples_per_s"} (`paired`: {"trainer": [...], "loop": [...], "loop_fused": [...]}
in steps/s).

`paired` (MODEL vae, or mlp: a small MLP whose ~1 ms steps show fixed costs most, issue 28) runs
the loop, the same loop with the fused Adam the Trainer picks on CPU
(train.optim.impl=auto), and a fresh Trainer.fit (each STEPS steps, Horovod) in turn in the same
ranks, in the order loop, loop_fused, trainer, then trainer, loop_fused, loop, ... so that a linear
drift of the machine's speed cancels; each round is seconds long. trainer / loop is what a user
gains or loses against writing the loop; trainer / loop_fused is the Trainer's own overhead.
Separate jobs for each side were minutes apart on a VM whose speed drifts by 30 % over minutes.
One untimed run of each comes first: the first Trainer in a process pays for imports and first
calls (a few tenths of a second), as the loop's first steps do.
"""
from __future__ import annotations

import json
import sys
import time

import torch

BATCH = 32  # per rank


def _config(store: str, backend: str, steps: int, model: str):
    from pipeline.config import load_config
    extra = {"vae": ["model=vae", "model.image_size=16"],
             "mlp": ["model=mlp", "model.in_features=256", "model.out_features=2",
                     "data.inputs={x: spins, y: phase}"],
             "resnet": ["model=resnet", "model.in_channels=1", "model.n_outputs=2",
                        "data.inputs={x: spins, y: phase}"]}.get(model, [])
    return load_config("demo", [f"data.path={store}", f"output_dir={store}.bench",
                                f"train.dist.backend={backend}", f"train.max_steps={steps}",
                                "train.epochs=1000", f"train.batch_size={BATCH}", "train.threads=1",
                                "train.logger.mode=disabled", "train.logger.log_every=1000000",
                                "train.logger.images_every=0", *extra])


def _fit(cfg, dist) -> float:
    """fit's steps/s: all of it (loader start, checkpoints, the final save), not set-up (build)."""
    from pipeline.train.assembly import build
    from pipeline.train.loop import fit
    run = build(cfg, dist)
    dist.barrier()
    t0 = time.perf_counter()
    fit(run)
    return cfg.train.max_steps / (time.perf_counter() - t0)


def run_trainer(store: str, backend: str, steps: int, model: str = "vae") -> dict:
    from pipeline.runtime.dist import init_distributed
    cfg = _config(store, backend, steps, model)
    dist = init_distributed(cfg.train.dist)
    rate = _fit(cfg, dist)
    return {"steps_per_s": rate, "samples_per_s": rate * BATCH * dist.world_size, "rank": dist.rank}


def _loop(model_name: str, fused: bool = False):
    """The baseline: no loader, no metrics, no checkpoints; plain Horovod. Returns step()."""
    import horovod.torch as hvd

    from models import MODELS
    torch.set_num_threads(1)
    hvd.init()
    if model_name == "vae":
        cfg_cls, build = MODELS["vae"]
        model = build(cfg_cls(image_size=16))
        batch = {"x": torch.rand(BATCH, 1, 16, 16).round()}
        phase = "model"
    elif model_name == "mlp":  # the Trainer's config above: 16x16 spins -> phase
        cfg_cls, build = MODELS["mlp"]
        model = build(cfg_cls(in_features=256, out_features=2))
        batch = {"x": torch.rand(BATCH, 1, 16, 16).round(), "y": torch.randint(0, 2, (BATCH,))}
        phase = model.optimizers()[0].name
    else:  # a compute-bound CNN for weak scaling
        cfg_cls, build = MODELS["resnet"]
        model = build(cfg_cls())
        batch = {"x": torch.randn(BATCH, 1, 32, 32), "y": torch.randint(0, 10, (BATCH,))}
        phase = model.optimizers()[0].name
    adam = torch.optim.Adam(model.parameters(), 1e-3, fused=fused or None)  # None: as it comes
    opt = hvd.DistributedOptimizer(adam, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def step():
        opt.zero_grad()
        model.losses(batch, phase)["loss"].backward()
        opt.step()
    for _ in range(3):
        step()
    return step


def _time_loop(step, steps: int) -> float:
    import horovod.torch as hvd
    hvd.allreduce(torch.zeros(1), name="sync")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - t0)


def run_loop(model_name: str, backend: str, steps: int) -> dict:
    import horovod.torch as hvd
    rate = _time_loop(_loop(model_name), steps)
    return {"steps_per_s": rate, "samples_per_s": rate * BATCH * hvd.size(), "rank": hvd.rank()}


def run_paired(store: str, repeats: int, steps: int, model: str = "vae") -> dict:
    from pipeline.runtime.dist import init_distributed
    loops = {"loop": _loop(model), "loop_fused": _loop(model, fused=True)}
    out: dict = {"trainer": [], **{side: [] for side in loops}}
    warm = _config(store, "horovod", min(steps, 100), model)
    warm.output_dir = f"{warm.output_dir}/warm-up-{model}"
    dist = init_distributed(warm.train.dist)
    _fit(warm, dist)
    for step in loops.values():
        _time_loop(step, min(steps, 100))
    for r in range(repeats):
        cfg = _config(store, "horovod", steps, model)
        cfg.output_dir = f"{cfg.output_dir}/{model}-{r}"  # a fresh run each time (resume is "never")
        order = ("loop", "loop_fused", "trainer")
        for side in order if r % 2 == 0 else reversed(order):
            out[side].append(_fit(cfg, dist) if side == "trainer" else _time_loop(loops[side], steps))
    return {**out, "rank": dist.rank}


def profile_off_cost(parts: int = 8, steps: int = 20000) -> float:
    """Seconds a step pays for train.profile=off: the no-op parts the loop enters (data, forward,
    backward, all-reduce, optimizer twice, logging: 7 for one phase and one batch; 8 to spare)."""
    from pipeline.train.profile import StepTimer
    timer = StepTimer()
    t0 = time.perf_counter()
    for _ in range(steps):
        for _ in range(parts):
            with timer.part("forward"):
                pass
        timer.step_done()
    return (time.perf_counter() - t0) / steps


if __name__ == "__main__":
    out, mode, what, arg, steps = sys.argv[1:6]
    if mode == "paired":
        result = run_paired(what, int(arg), int(steps), *sys.argv[6:7])
    elif mode == "trainer":
        result = run_trainer(what, arg, int(steps), *sys.argv[6:7])
    else:
        result = run_loop(what, arg, int(steps))
    if result["rank"] == 0:
        with open(out, "w") as f:
            json.dump(result, f)
