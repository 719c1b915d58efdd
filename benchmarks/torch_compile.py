"""`train.compile`: steps/s of torch.compile'd losses against eager, and whether a run gains.

For the VAE, ResNet and DCGAN of the Ising experiments (configs/experiment/*_ising2d.yaml, their
batch size, 1 thread): one training step is every phase the model declares (zero_grad, the
phase's losses and backward with only that network's gradients on, as the trainer does, Adam
step). Eager and compiled steps run in turn in this process, `rounds` times, each side timed for a
few seconds per round; the ratio is the median over rounds of compiled / eager steps/s. Compile
time is the first compiled step (every phase compiles there) minus one eager step, with
inductor's on-disk caches off: what a first run pays. "Run" rows put the two together for the
experiment's own length (epochs x steps per epoch on one rank): eager run time / (compile time +
compiled run time), which is what train.compile's default is decided on.
"""
from __future__ import annotations

import time
from statistics import median

import torch

from benchmarks.table import row

EXPERIMENTS = {"VAE": "vae_ising2d", "ResNet": "resnet_ising2d", "DCGAN": "dcgan_ising2d"}


def _setup(experiment: str):
    """The experiment's model, a batch like its data (32x32 spins in {0, 1}, phase labels), the
    optimizers, and the number of steps of its run on one rank."""
    from pipeline.config import load_config
    from pipeline.train.assembly import build_model
    cfg = load_config(experiment)
    torch.manual_seed(0)
    model = build_model(cfg)
    b, side = cfg.train.batch_size, cfg.data.params.lattice
    batch = {"x": torch.rand(b, 1, side, side).round(), "y": torch.randint(0, 2, (b,))}
    phases = [(s.name, list(s.module.parameters()),
               torch.optim.Adam(s.module.parameters(), cfg.train.lr)) for s in model.optimizers()]
    train = int(cfg.data.n_samples * (1 - cfg.data.val_fraction - cfg.data.test_fraction))
    return model, batch, phases, cfg.train.epochs * (train // b)


def _stepper(model, batch, phases, losses):
    from pipeline.runtime.dist import only_grads_of

    def step() -> None:
        for name, params, opt in phases:
            opt.zero_grad()
            with only_grads_of(model, params):
                losses(batch, name)["loss"].backward()
            opt.step()
    return step


def _rate(step, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n / (time.perf_counter() - t0)


def _measure(experiment: str, rounds: int, seconds: float) -> dict[str, float]:
    model, batch, phases, run_steps = _setup(experiment)
    eager = _stepper(model, batch, phases, model.losses)
    compiled = _stepper(model, batch, phases, torch.compile(model.losses))
    for _ in range(3):
        eager()
    t0 = time.perf_counter()
    eager()
    eager_step = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled()  # every phase compiles here (forward and backward)
    compile_s = time.perf_counter() - t0 - eager_step
    for _ in range(2):
        compiled()
    pairs = [(_rate(eager, seconds), _rate(compiled, seconds)) for _ in range(rounds)]
    e, c = median(p[0] for p in pairs), median(p[1] for p in pairs)
    return {"eager": e, "compiled": c, "ratio": median(p[1] / p[0] for p in pairs),
            "compile_s": compile_s, "run_steps": run_steps,
            "run_ratio": (run_steps / e) / (compile_s + run_steps / c)}


def bench_compile(quick: bool) -> list[dict]:
    import torch._inductor.config as inductor
    inductor.fx_graph_cache = False  # a first run's compile time, not a cache hit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for label, experiment in EXPERIMENTS.items():
            m = _measure(experiment, 1 if quick else 3, 1.0 if quick else 4.0)
            rows.append(row("compile", f"{label} ({experiment}), 1 thr", m["compiled"],
                             m["eager"], "step/s", "report",
                             f"train.compile=true / eager training steps/s, median of rounds run "
                             f"in turn; compile time {m['compile_s']:.1f} s (caches off)",
                             ratio=m["ratio"]))
            rows.append(row("compile-run", f"{label}, {m['run_steps']} steps", m["run_steps"] /
                             m["eager"], m["compile_s"] + m["run_steps"] / m["compiled"], "s",
                             "> 1: compile wins", "the experiment's run on one rank: eager time / "
                             "(compile time + compiled time)", ratio=m["run_ratio"]))
    finally:
        torch.set_num_threads(threads)
    return rows
