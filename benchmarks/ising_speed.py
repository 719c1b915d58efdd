"""CPU seconds per independent Ising lattice near T_c: the source's Metropolis, the Swendsen-Wang
cluster algorithm (the physicist's baseline) and the autoregressive generator (issue #23, point 4).

    .venv/bin/python -m benchmarks.ising_speed                 # L = 32 and 64 at T = 2.27
    .venv/bin/python -m benchmarks.ising_speed --checkpoint CKPT   # also that model's MH acceptance

A Markov chain's samples are independent once they are about 2 tau_int apart (tau_int of |m|,
the slowest observable here; `ising_mc.integrated_time`), so its cost per independent lattice is
2 tau_int x (CPU s per sweep per lattice), measured on chains vectorised over lattices as the
source runs them. A generator's lattices are independent by construction: its cost is CPU s per
lattice of a batched draw. With an independence Metropolis-Hastings correction (4 proposals per
chain) a chain costs 5 draws and no likelihood pass (the draw gives log q), and delivers one
lattice, independent of the other chains'; whether 4 proposals reach equilibrium is what
`hpcforge evaluate` measures. Everything on one thread (torch.set_num_threads(1);
NumPy and SciPy are single-threaded here), CPU time of this process (time.process_time).

Wolff's single-cluster update (`ising_mc.Wolff`), the usual physicist's choice, flips one
Fortuin-Kasteleyn cluster per step. Its tau_int is measured in cluster flips and converted to
sweeps (x <cluster size> / L^2); its cost per independent lattice is 2 tau_int(flips) x (CPU s
per flip per lattice). Its chains start from Swendsen-Wang equilibrium (a random start grows
only small clusters for a long while at L = 64). The clusters of WOLFF_CHAINS lattices grow
together, layer by layer, so NumPy's fixed cost per layer is shared: with 16 chains a flip costs
about twice as much. A compiled Wolff (a C loop over a stack of sites) would be cheaper still;
this one is what the project can run without a compiler.
Writes benchmarks/ising_speed.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.sources import ising_mc

OUT = Path(__file__).resolve().parent
CHAIN_SWEEPS = {32: (1000, 2000), 64: (3000, 4000)}   # (burn-in, measured) Metropolis sweeps
SW_SWEEPS = (60, 300)
WOLFF_FLIPS = (50, 2000)         # (burn-in, measured) cluster flips, after 60 Swendsen-Wang sweeps
WOLFF_CHAINS = 64


def chain_cost(algorithm: str, size: int, t: float, chains: int, burn_in: int, sweeps: int,
               rng: np.random.Generator) -> dict[str, float]:
    t0 = time.process_time()
    series = ising_mc.series(algorithm, t, size, chains, sweeps, rng, burn_in=burn_in)
    per_sweep = (time.process_time() - t0) / ((burn_in + sweeps) * chains)
    tau = {k: ising_mc.integrated_time(v) for k, v in series.items()}
    slowest = max(tau.values())
    return {"tau_abs_magnetization": tau["abs_magnetization"], "tau_energy": tau["energy"],
            "cpu_s_per_sweep": per_sweep, "sweeps_per_sample": 2 * slowest,
            "cpu_s_per_sample": 2 * slowest * per_sweep}


def wolff_cost(size: int, t: float, chains: int, burn_in: int, flips: int,
               rng: np.random.Generator) -> dict[str, float]:
    """As chain_cost, for Wolff: tau_int in flips, converted to sweeps by the mean cluster."""
    start = ising_mc.equilibrium(np.full(chains, t), size, rng, "swendsen_wang", SW_SWEEPS[0])
    t0 = time.process_time()
    series = ising_mc.series("wolff", t, size, chains, flips, rng, burn_in=burn_in, initial=start)
    per_flip = (time.process_time() - t0) / ((burn_in + flips) * chains)
    tau = {k: ising_mc.integrated_time(series[k]) for k in ("abs_magnetization", "energy")}
    slowest = max(tau.values())
    sweeps_per_flip = float(series["cluster_size"].mean()) / size**2
    return {"tau_flips_abs_magnetization": tau["abs_magnetization"], "tau_flips_energy": tau["energy"],
            "cluster_fraction": sweeps_per_flip,
            "tau_sweeps_abs_magnetization": tau["abs_magnetization"] * sweeps_per_flip,
            "tau_sweeps_energy": tau["energy"] * sweeps_per_flip, "chains": chains,
            "cpu_s_per_flip": per_flip, "flips_per_sample": 2 * slowest,
            "cpu_s_per_sample": 2 * slowest * per_flip}


def generator_cost(size: int, t: float, batch: int, checkpoint: Path | None) -> dict[str, float]:
    from models.autoregressive import AutoregressiveConfig, AutoregressiveSpins
    model = AutoregressiveSpins(AutoregressiveConfig(image_size=size)).eval()
    temps = torch.full((batch,), t)
    t0 = time.process_time()
    model.draw(temps)
    out = {"cpu_s_per_sample": (time.process_time() - t0) / batch}
    if checkpoint is not None:
        from pipeline.core.checkpoint import load
        ckpt = load(checkpoint)
        model.load_state_dict(ckpt["model"])
        t0 = time.process_time()
        model.corrected(temps, 4)
        out.update(mh_acceptance=model.last_acceptance,
                   cpu_s_per_corrected_sample=(time.process_time() - t0) / batch)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--t", type=float, default=2.27)
    p.add_argument("--checkpoint", type=Path, help="an autoregressive checkpoint at the first size")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes:
        burn, sweeps = CHAIN_SWEEPS.get(size, (3000, 4000))
        row = {"L": size, "T": args.t,
               "metropolis": chain_cost("metropolis", size, args.t, 16, burn, sweeps, rng),
               "swendsen_wang": chain_cost("swendsen_wang", size, args.t, 16, *SW_SWEEPS, rng),
               "wolff": wolff_cost(size, args.t, WOLFF_CHAINS, *WOLFF_FLIPS, rng),
               "autoregressive": generator_cost(size, args.t, 256,
                                                args.checkpoint if size == args.sizes[0] else None)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": 1,
            "date": time.strftime("%Y-%m-%d")}
    (OUT / "ising_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| L | T | Metropolis tau_int(abs m) | Metropolis ms / sample | SW tau_int (abs m, E) | "
             "SW ms / sample | Wolff tau_int in flips (abs m, E) | Wolff tau_int in sweeps (abs m, E) | "
             "Wolff ms / sample | generator ms / sample | Metropolis / generator | SW / generator | "
             "Wolff / generator |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mh, sw, wo, ar = r["metropolis"], r["swendsen_wang"], r["wolff"], r["autoregressive"]
        lines.append(f"| {r['L']} | {r['T']} | {mh['tau_abs_magnetization']:.0f} | "
                     f"{1e3 * mh['cpu_s_per_sample']:.1f} | {sw['tau_abs_magnetization']:.1f}, "
                     f"{sw['tau_energy']:.1f} | {1e3 * sw['cpu_s_per_sample']:.2f} | "
                     f"{wo['tau_flips_abs_magnetization']:.1f}, {wo['tau_flips_energy']:.1f} | "
                     f"{wo['tau_sweeps_abs_magnetization']:.1f}, {wo['tau_sweeps_energy']:.1f} | "
                     f"{1e3 * wo['cpu_s_per_sample']:.2f} | "
                     f"{1e3 * ar['cpu_s_per_sample']:.2f} | "
                     f"{mh['cpu_s_per_sample'] / ar['cpu_s_per_sample']:.1f} | "
                     f"{sw['cpu_s_per_sample'] / ar['cpu_s_per_sample']:.2f} | "
                     f"{wo['cpu_s_per_sample'] / ar['cpu_s_per_sample']:.2f} |")
    (OUT / "ising_speed.md").write_text("\n".join(lines) + f"\n\n{json.dumps(meta)}\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
