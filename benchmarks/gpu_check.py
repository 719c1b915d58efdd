"""`make gpu-check` (issue 26): on a GPU node, one prepared run of at most ~10 minutes that checks
what no CPU machine can, and writes one table (outputs/gpu-check/results.json and the terminal):

    allreduce  NCCL all-reduce bus bandwidth of 64 MiB, Horovod against torch.distributed, on every
               GPU of the node (one rank each, started by mpirun)
    bf16       a matmul under CUDA autocast is bf16, and close to fp32 (relative error)
    compile    torch.compile of a conv net: the same output as eager, and its speed-up
    steps/s    hpcforge's training (Trainer fit: loader, metrics, checkpoints) against a plain PyTorch
               loop of the same model on the same batches, one GPU: a DCGAN and a ResNet

On a machine without a CUDA GPU it says so in one line and exits 0 (nothing to check there).
    python -m benchmarks.gpu_check [--out outputs/gpu-check/results.json]
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

MIB = 2 ** 20
STEPS = 200      # timed steps per side of the step-rate rows (a few seconds each on a GPU)
DEVICE = "cuda"
MODELS = (("DCGAN", "dcgan_ising2d"), ("ResNet", "resnet_ising2d"))   # the step-rate rows
STORE = ["data.n_samples=4096", "data.dask.progress=false"]   # their 32 x 32 Ising store


def _row(benchmark, case, value, baseline, unit, what) -> dict:
    """A row of benchmarks.run.table; `what` goes in its last column."""
    return {"benchmark": benchmark, "case": case, "value": float(f"{value:.4g}"),
            "baseline": float(f"{baseline:.4g}"), "unit": unit,
            "ratio": round(value / baseline, 3) if baseline else "-", "target": what}


# ------------------------------------------------------------------ all-reduce (under mpirun)
def allreduce_worker(out: str, backend: str, iters: int = 20) -> None:
    """Rank r on GPU r: bus bandwidth (GB/s, nccl-tests' definition) of a 64 MiB sum."""
    from pipeline.config import DistConfig
    from pipeline.runtime.dist import init_distributed
    dist = init_distributed(DistConfig(backend=backend))
    x = torch.ones(64 * MIB // 4, device=dist.device)
    if backend == "horovod":
        reduce = lambda: dist.hvd.allreduce_(x, op=dist.hvd.Sum, name="gpu_check")  # noqa: E731
    else:
        reduce = lambda: dist.td.all_reduce(x)  # noqa: E731
    seconds = 1.0 / _rate(reduce, iters, warmup=5)
    n = dist.world_size
    busbw = x.numel() * 4 / seconds * (2 * (n - 1) / n if n > 1 else 1) / 1e9
    if dist.is_main:
        Path(out).write_text(json.dumps({"GB_per_s": busbw, "ranks": n}))
    dist.shutdown()


def allreduce_rows() -> list[dict]:
    from benchmarks.run import _mpi_json
    n = torch.cuda.device_count()
    ddp = _mpi_json(n, "benchmarks.gpu_check", ["--allreduce", "ddp"])
    try:
        hvd = _mpi_json(n, "benchmarks.gpu_check", ["--allreduce", "horovod"])
    except RuntimeError as e:  # Horovod optional (issue 26): the row says why it is missing
        return [_row("allreduce", f"torch.distributed {n} GPU", ddp["GB_per_s"], 0, "GB/s",
                     f"Horovod failed: {str(e).splitlines()[-1][:120]}")]
    return [_row("allreduce", f"horovod/ddp {n} GPU", hvd["GB_per_s"], ddp["GB_per_s"], "GB/s",
                 "NCCL bus bandwidth, 64 MiB")]


# ------------------------------------------------------------------ bf16 and torch.compile
def bf16_row() -> dict:
    a, b = torch.randn(2048, 2048, device="cuda"), torch.randn(2048, 2048, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        c = a @ b
    assert c.dtype == torch.bfloat16, f"autocast gave {c.dtype}"
    err = ((c.float() - a @ b).norm() / (a @ b).norm()).item()
    assert err < 2e-2, f"bf16 matmul is {err:.3g} off fp32"
    return _row("bf16", "autocast matmul 2048", err, 2e-2, "relerr", "dtype bfloat16; error < 2e-2")


def _rate(fn, steps: int, warmup: int = 3) -> float:
    """Calls of `fn` per second on the GPU clock (synchronised), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def compile_row() -> dict:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(64, 10)).cuda()
    x = torch.randn(256, 3, 64, 64, device="cuda")
    fast = torch.compile(net)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), net(x), rtol=1e-3, atol=1e-3)
        return _row("compile", "conv net forward", _rate(lambda: fast(x), 100),
                    _rate(lambda: net(x), 100), "it/s", "same output as eager")


# ------------------------------------------------------------------ hpcforge vs a plain loop
def _store(tmp: str) -> str:
    """The Ising 32 x 32 data both experiments train on (their data settings are the same)."""
    from pipeline.config import load_config
    from pipeline.data.prepare import prepare
    cfg = load_config(MODELS[0][1], [f"output_dir={tmp}", f"data.path={tmp}/ising2d-32.zarr", *STORE])
    return str(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))


def _run(store: str, experiment: str, out: str):
    from pipeline.config import load_config
    from pipeline.runtime.dist import init_distributed
    from pipeline.train.assembly import build
    cfg = load_config(experiment, [f"data.path={store}", f"output_dir={out}",
                                   "train.dist.backend=none", "train.dist.nproc=1",
                                   f"train.max_steps={STEPS}", "train.epochs=1000",
                                   "train.logger.mode=disabled", "train.logger.images_every=0"])
    return cfg, build(cfg, init_distributed(cfg.train.dist))


def _plain_loop(run) -> float:
    """What a user writes: the same model and batch on the GPU, Adam per network, zero_grad,
    backward, step; no loader, metrics or checkpoints."""
    batch = {k: v.to(DEVICE) for k, v in next(iter(run.loader)).items()}
    opts = [(p.name, torch.optim.Adam(p.params, run.cfg.train.lr)) for p in run.phases]

    def step():
        for name, opt in opts:
            opt.zero_grad(set_to_none=True)
            run.model.losses(batch, name)["loss"].backward()
            opt.step()
    return _rate(step, STEPS)


def step_rows() -> list[dict]:
    from pipeline.train.loop import fit
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = _store(tmp)
        for name, experiment in MODELS:
            cfg, run = _run(store, experiment, f"{tmp}/{name}")
            t0 = time.perf_counter()
            fit(run)
            ours = STEPS / (time.perf_counter() - t0)
            _, fresh = _run(store, experiment, f"{tmp}/{name}-loop")
            rows.append(_row("steps/s", f"{name} hpcforge/plain", ours, _plain_loop(fresh),
                             "step/s", f"batch {cfg.train.batch_size}, 1 GPU"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu-check")
    ap.add_argument("--out", default="outputs/gpu-check/results.json")
    ap.add_argument("worker_out", nargs="?", help=argparse.SUPPRESS)   # a rank's result file
    ap.add_argument("--allreduce", metavar="BACKEND", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.allreduce:   # one rank of allreduce_rows, under mpirun (benchmarks.run._mpi_json)
        allreduce_worker(args.worker_out, args.allreduce)
        return 0
    if not torch.cuda.is_available():
        print(f"gpu-check: needs a CUDA GPU; torch {torch.__version__} finds none on "
              f"{socket.gethostname()}, so there is nothing to check here (run `make gpu-check` on "
              f"a GPU node)")
        return 0
    from benchmarks.run import _versions, table
    rows = [*allreduce_rows(), bf16_row(), compile_row(), *step_rows()]
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                               "versions": _versions(), "rows": rows}, indent=1))
    print(f"gpu-check: table in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
