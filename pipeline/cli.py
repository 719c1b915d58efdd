"""The `hpcforge` command (also `python -m pipeline`).

    hpcforge prepare [-e EXPERIMENT] [key=value ...]
    hpcforge train   [-e EXPERIMENT] [--nproc N] [key=value ...]
    hpcforge bench   [--quick]

Bad input prints one line (`hpcforge: error: ...`) and exits 2; nothing is started.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import UserError

# Commands whose issues are still open: they answer clearly instead of half-working.
PLANNED = {
    "submit": "submit a run as a Slurm job through submitit",
    "sweep": "expand a grid over config keys into one Slurm job array",
    "evaluate": "score a checkpoint on the test split (metrics JSON + W&B)",
    "report": "write an offline HTML report of one or more runs",
    "status": "show a submitted job's state",
    "logs": "show a submitted job's rank logs",
    "cancel": "cancel a submitted job",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-e", "--experiment", default="demo",
                   help="configs/experiment/<name>.yaml (default: demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="group=name swaps a config group file; a.b=value sets a key")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hpcforge", description="Distributed HPC training pipeline: "
                                 "Dask -> Zarr -> Horovod/MPI -> W&B, on Slurm through submitit.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("prepare", help="generate/import a dataset with Dask into a sharded Zarr store")
    _add_config_args(p)
    p = sub.add_parser("train", help="train a model data-parallel (Horovod over MPI)")
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks to start on this machine (sets train.dist.nproc)")
    p = sub.add_parser("config", help="print the resolved config as JSON")
    _add_config_args(p)
    p = sub.add_parser("bench", help="run the ratio benchmarks under benchmarks/")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    p.add_argument("--out", default="outputs/bench/results.json", help="JSON file for the table")
    for name, what in PLANNED.items():
        p = sub.add_parser(name, help=f"{what} (not yet available)")
        p.add_argument("args", nargs="*")
    return ap


def _config(args: argparse.Namespace, extra: list[str] | None = None):
    from pipeline.config import load_config
    return load_config(args.experiment, list(args.overrides) + (extra or []))


def cmd_prepare(args: argparse.Namespace) -> int:
    from pipeline.data.prepare import prepare
    cfg = _config(args)
    path = prepare(cfg.data, cfg.to_dict())
    from pipeline.data.store import open_store
    meta = open_store(path).meta
    print(f"[hpcforge] dataset: {path}  splits {meta['splits']}  "
          f"({meta['shuffle']['tasks']} Dask tasks, {meta['seconds']} s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    extra = [f"train.dist.nproc={args.nproc}"] if args.nproc is not None else []
    cfg = _config(args, extra)  # validate before starting any rank
    from pipeline.launch import needs_launch, relaunch
    if needs_launch(cfg.train.dist.nproc):
        if cfg.train.dist.backend == "none":
            raise UserError(f"train.dist.nproc={cfg.train.dist.nproc} needs a distributed backend; "
                            f"set train.dist.backend=horovod")
        argv = ["train", "-e", args.experiment, *args.overrides, *extra]
        return relaunch(cfg.train.dist.nproc, argv, cfg.train.dist.launcher)
    from pipeline.trainer import train
    summary = train(cfg)
    if "checkpoint" in summary:  # rank 0
        last = summary["history"][-1] if summary["history"] else {}
        print(f"[hpcforge] {summary['steps']} steps on {summary['ranks']} ranks "
              f"({summary['launcher']}); final {json.dumps({k: round(v, 4) for k, v in last.items()})}")
        print(f"[hpcforge] checkpoint: {summary['checkpoint']}")
        print(f"[hpcforge] metrics:    {summary['metrics']}")
        print(f"[hpcforge] W&B run:    {summary['wandb_run']} (upload later: wandb sync <dir>)")
        print(f"[hpcforge] summary:    {Path(cfg.output_dir) / 'train' / 'summary.json'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(json.dumps(_config(args).to_dict(), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from benchmarks.run import main as bench_main
    return bench_main(quick=args.quick, out=args.out)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command in PLANNED:
            raise UserError(f"`hpcforge {args.command}` ({PLANNED[args.command]}) is not yet "
                            f"available in this version; see the README's roadmap")
        return {"prepare": cmd_prepare, "train": cmd_train, "config": cmd_config,
                "bench": cmd_bench}[args.command](args)
    except UserError as e:
        print(f"hpcforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
