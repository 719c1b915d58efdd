"""The scaling study's figure (README, "Scaling"): quality against ranks at equal samples seen.

Reads `<dir>/{n1,n2,n4}` (seed 0) and `<dir>/s<S>-n<N>` (seeds 1, 2), each a `hpcforge train`
output of demo_generator's model with `hpcforge evaluate` run on its final checkpoint, and draws
W1 / floor of |m| and E and the classifier AUC per run, the medians joined.

    python -m benchmarks.scaling_plot outputs/scaling --figure docs/img/scaling.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import median

RANKS = (1, 2, 4)
PANELS = (("w1_ratio/abs_magnetization", "W1(|m|) / floor"), ("w1_ratio/energy", "W1(E) / floor"),
          ("classifier/auc", "classifier AUC"))


def runs(root: Path) -> dict[int, list[dict]]:
    """ranks -> the eval metrics of every seed found."""
    out: dict[int, list[dict]] = {n: [] for n in RANKS}
    for n in RANKS:
        for folder in (root / f"n{n}", *sorted(root.glob(f"s*-n{n}"))):
            path = folder / "train" / "checkpoints" / "final.eval.json"
            if path.is_file():
                out[n].append(json.loads(path.read_text())["metrics"])
    return out


def plot(root: Path, figure: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    found = runs(root)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (key, label) in zip(axes, PANELS):
        for n, rows in found.items():
            ax.scatter([n] * len(rows), [r[key] for r in rows], color="tab:blue", alpha=0.6)
        ax.plot(RANKS, [median(r[key] for r in found[n]) for n in RANKS], color="tab:blue",
                label="median of seeds")
        goal = 0.5 if key.startswith("classifier") else 2.0
        ax.axhline(goal, color="k", ls="--", label="indistinguishable" if goal == 0.5 else "goal (2x)")
        ax.set(xscale="log", xticks=RANKS, xticklabels=[str(n) for n in RANKS],
               xlabel="Horovod ranks (equal samples seen, lr x ranks)", title=label)
        ax.minorticks_off()
        ax.legend(fontsize=7)
    fig.suptitle("dcgan_ising2d_cond: 71,680 samples seen at every rank count", fontsize=10)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--figure", type=Path, default=Path("docs/img/scaling.png"))
    args = p.parse_args()
    plot(args.root, args.figure)


if __name__ == "__main__":
    main()
