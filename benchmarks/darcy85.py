"""Darcy flow at the FNO paper's protocol (issue #15; Li et al. 2021, arXiv:2010.08895, sec. 5.2):
train unet_darcy85 and fno_darcy85 for the same CPU budget (1 rank, 1 thread), checkpoint every
`--every` steps, and evaluate each checkpoint with `hpcforge evaluate` on the 100 test samples: the
raw relative L2 (the paper's metric) against steps and epochs. Results go to
outputs/darcy85/<experiment>-seed<S>/curve.json, the figure to --figure.

    python -m benchmarks.darcy85 run --only fno_darcy85 --cpu-s 420 --seeds 0
    python -m benchmarks.darcy85 plot --figure benchmarks/darcy85_curve.png
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks.quality import ROOT, RUN_KEYS, STEP_CAP, command, run_cli, train_within

OUT = "outputs/darcy85"
EXPERIMENTS = ("unet_darcy85", "fno_darcy85")
PAPER_FNO = 0.0108        # FNO-2D, s = 85 (Li et al. 2021, Table 4)
TRAIN_SAMPLES = 1000      # configs/data/darcy85.yaml
WALL_LIMIT_S = 6 * 3600   # of one training run


def train(experiment: str, seed: int, cpu_s: float, every: int, step_size: int) -> tuple[Path, dict]:
    """One budgeted run; its checkpoint folder and what the run cost."""
    out = f"{OUT}/{experiment}-seed{seed}"
    shutil.rmtree(ROOT / out, ignore_errors=True)  # a fresh run (a used output_dir is refused)
    keys = [k for k in RUN_KEYS if not k.startswith("train.seed=")]
    args = ["train", "-e", experiment, f"output_dir={out}", *keys, f"train.seed={seed}",
            "train.dist.backend=none", f"train.checkpoint.every_steps={every}",
            "train.checkpoint.keep=1000", f"train.schedule.step_size={step_size}"]
    # train_within's default 30-min wall limit kills a run that a loaded machine slows (it did here)
    run = train_within([*args, f"train.max_steps={STEP_CAP}"], cpu_s, timeout=WALL_LIMIT_S)
    if run.checkpoint is None:
        raise RuntimeError(f"{experiment}: no budget checkpoint: {run.output[-500:]}")
    cost = {"cpu_s": run.cpu_s, "wall_s": run.wall_s, "steps": run.step,
            "command": command([*args, f"train.max_steps={run.step}"])}
    return ROOT / out / "train" / "checkpoints", cost


def curve(folder: Path, batch_size: int) -> list[dict]:
    """`hpcforge evaluate` on every step checkpoint: (step, epoch, raw and standardised rel. L2)."""
    points = []
    for ckpt in sorted(folder.glob("step-*.pt")):
        r, _ = run_cli(["evaluate", str(ckpt)])
        if r.returncode != 0:
            raise RuntimeError(f"evaluate {ckpt}: {r.stderr[-500:]}")
        m = json.loads(ckpt.with_name(ckpt.stem + ".eval.json").read_text())["metrics"]
        step = int(ckpt.stem.split("-")[1])
        points.append({"step": step, "epoch": step * batch_size / TRAIN_SAMPLES,
                       "relative_l2_raw": m["relative_l2_raw"], "relative_l2": m["relative_l2"]})
    return points


def run(experiment: str, seed: int, cpu_s: float, every: int, step_size: int) -> dict:
    from pipeline.config import load_config
    folder, cost = train(experiment, seed, cpu_s, every, step_size)
    result = {"experiment": experiment, "seed": seed, **cost,
              "curve": curve(folder, load_config(experiment).train.batch_size)}
    (folder.parent.parent / "curve.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "curve"} | {"final": result["curve"][-1]}))
    return result


def val_curve(run_dir: Path) -> tuple[list[float], list[float]]:
    """(epochs, val rel. L2 of the standardised pressure) as the trainer logged them each epoch."""
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "val/rel_l2" in r]
    return [r["epoch"] + 1 for r in rows], [r["val/rel_l2"] for r in rows]


def evaluate_existing(experiment: str, seed: int) -> dict:
    """The curve of a run whose training ended without a budget checkpoint (killed, stopped): its
    step checkpoints as they are; CPU seconds unknown (None)."""
    from pipeline.config import load_config
    folder = ROOT / OUT / f"{experiment}-seed{seed}" / "train" / "checkpoints"
    result = {"experiment": experiment, "seed": seed, "cpu_s": None,
              "curve": curve(folder, load_config(experiment).train.batch_size)}
    (folder.parent.parent / "curve.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def plot(figure: Path) -> None:
    """Left: test raw relative L2 of each evaluated checkpoint against epochs, the paper's FNO line.
    Right: the trainer's per-epoch val relative L2 of the standardised pressure. Every run found
    under outputs/darcy85."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (raw, std) = plt.subplots(1, 2, figsize=(10, 4))
    for path in sorted((ROOT / OUT).glob("*/curve.json")):
        r = json.loads(path.read_text())
        cost = f"{r['cpu_s']:.0f} CPU s" if r["cpu_s"] else "stopped early"
        label = f"{r['experiment']} seed {r['seed']} ({cost})"
        raw.plot([p["epoch"] for p in r["curve"]], [100 * p["relative_l2_raw"] for p in r["curve"]],
                 marker="o", label=label)
        std.plot(*val_curve(path.parent), marker="s", label=label)
    raw.axhline(100 * PAPER_FNO, color="k", ls="--", label="FNO paper, 500 epochs (1.08 %)")
    raw.set(xlabel="epoch (1000 samples)", ylabel="test relative L2, raw pressure (%)", yscale="log",
            title="Darcy 85 x 85, paper's metric")
    std.set(xlabel="epoch", ylabel="val relative L2, standardised pressure", yscale="log",
            title="as trained (standardised)")
    for ax in (raw, std):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.darcy85", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["run", "evaluate", "plot"],
                   help="evaluate: only the curve of runs already trained (their step checkpoints)")
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--cpu-s", type=float, default=420.0, help="CPU seconds of each training run")
    p.add_argument("--every", type=int, default=50, help="steps between evaluated checkpoints")
    p.add_argument("--step-size", type=int, default=100,
                   help="train.schedule.step_size: steps between lr halvings (a fifth of the run, as "
                        "the paper halves every 100 of 500 epochs)")
    p.add_argument("--figure", type=Path, default=ROOT / "benchmarks" / "darcy85_curve.png")
    args = p.parse_args(argv)
    if args.what == "plot":
        plot(args.figure)
        return 0
    for experiment in args.only:
        for seed in args.seeds:
            if args.what == "evaluate":
                evaluate_existing(experiment, seed)
            else:
                run(experiment, seed, args.cpu_s, args.every, args.step_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
