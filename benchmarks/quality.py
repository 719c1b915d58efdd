"""Quality of every experiment after a stated CPU budget: prepare -> train -> evaluate, one row each.

    .venv/bin/python -m benchmarks.quality                       # every configs/experiment/*.yaml
    .venv/bin/python -m benchmarks.quality --only cnn_digits unet_darcy2d
    .venv/bin/python -m benchmarks.quality domains               # only the CycleGAN's Ising domains
    .venv/bin/python -m benchmarks.quality study --only dcgan_ising2d_cond --cpu-s 120 --seeds 0 1 2
    .venv/bin/python -m benchmarks.quality thermo --checkpoint outputs/study/120s-seed0/dcgan_ising2d_cond/train/checkpoints/final.pt

Each experiment runs through the real CLI in subprocesses, one after the other: `hpcforge prepare`
(skipped when the shared store already holds the same data settings), `hpcforge train` on one rank
with one thread until the training process has used CPU_BUDGET_S seconds of CPU (start-up
included), then `hpcforge evaluate` on its checkpoint. The budget is CPU time, not wall time, so a
row means the same on a machine shared with other work. At the budget the run gets SIGUSR1, the
trainer's preemption signal: it checkpoints at the next step boundary and exits. The row's command
trains exactly the steps reached (train.max_steps), so it reproduces the model without a timer.

The headline metric is read from the evaluation's JSON; next to it sits a reference in the same
units (a trivial baseline, or the same distance between two real samples), so a number can be
judged without knowing the dataset. Writes benchmarks/quality.json (every metric of every run) and
benchmarks/quality.md (the table).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks"
RUNS = "outputs/quality"          # run directories, one per experiment
DOMAINS_DIR = "outputs/data/ising2d-domains"
CLI = [".venv/bin/hpcforge"]      # as written in the commands; run as `python -m hpcforge`


@dataclass(frozen=True)
class Headline:
    """What an experiment's row reports."""
    metric: str                   # key of the headline metric in the evaluation's metrics
    better: str                   # "higher" or "lower"
    reference: str = ""           # key of the reference value (evaluation metric or baseline)
    extra: tuple[str, ...] = ()   # more metrics shown in the notes column
    note: str = ""                # what the number means, where it is not obvious


CPU_BUDGET_S = 60.0     # CPU seconds of each training process (1 rank, 1 thread), start-up included
STEP_CAP = 100_000      # train.max_steps of the budgeted run: never reached, the CPU budget stops it

STANDARDISED = "pressure standardised (train mean and std) before the error"
RAW_PRESSURE = "pressure in its own units, the FNO paper's metric (1.08 % for FNO at 85 x 85)"
NEXT_FRAME = "next frame (0.05 time units) at every step of 64, raw states"
ISING_W1 = ("w1/abs_magnetization", "w1_reference/abs_magnetization")

# The headline metric of each experiment: accuracy for classifiers, relative L2 for surrogates and
# forecasts, the ELBO for VAEs, 1-Wasserstein distances of physical observables for samplers.
HEADLINES: dict[str, Headline] = {
    "unet_darcy2d": Headline("relative_l2", "lower", "baseline/mean_field", note=STANDARDISED),
    "dilated_cnn_darcy2d": Headline("relative_l2", "lower", "baseline/mean_field",
                                    note=STANDARDISED),
    "unet_darcy85": Headline("relative_l2_raw", "lower", "baseline/mean_field", ("relative_l2",),
                             note=RAW_PRESSURE),
    "fno_darcy85": Headline("relative_l2_raw", "lower", "baseline/mean_field", ("relative_l2",),
                            note=RAW_PRESSURE),
    "cgan_calo": Headline("w1/total_energy", "lower", "w1_reference/total_energy",
                          ("w1/shower_depth", "w1/shower_width", "frechet_distance")),
    "wgan_gp_calo": Headline("w1/total_energy", "lower", "w1_reference/total_energy",
                             ("w1/shower_depth", "w1/shower_width", "classifier/auc")),
    "vae_calo": Headline("elbo", "higher", "", ("w1/total_energy", "w1_reference/total_energy"),
                         "nats per shower under a Bernoulli decoder of minmax-scaled deposits"),
    "dcgan_ising2d": Headline("w1/energy", "lower", "w1_reference/energy", ISING_W1),
    "wgan_gp_ising2d": Headline("w1/energy", "lower", "w1_reference/energy", ISING_W1),
    "dcgan_ising2d_cond": Headline("w1/energy", "lower", "w1_reference/energy", ISING_W1),
    "wgan_gp_ising2d_cond": Headline("w1/energy", "lower", "w1_reference/energy", ISING_W1),
    "ar_ising2d_cond": Headline("precise/model/w1_ratio/energy", "lower", "",
                                ("precise/model/w1_ratio/abs_magnetization", "precise/model/auc"),
                                "W1 / floor pooled over 31 temperatures (pipeline/analysis/precise.py), "
                                "no Metropolis sweeps"),
    "vae_ising2d": Headline("elbo", "higher", "", ("w1/energy", "w1_reference/energy"),
                            "nats per 32 x 32 configuration"),
    "vae_ising2d_cond": Headline("w1/energy", "lower", "w1_reference/energy",
                                 (*ISING_W1, "elbo"), "spins from the Bernoulli decoder, then "
                                 "Metropolis sweeps at the sample's T (part of the model)"),
    "gan_ising2d": Headline("w1/energy", "lower", "w1_reference/energy", ISING_W1),
    "aae_ising2d": Headline("w1/energy", "lower", "w1_reference/energy", ISING_W1),
    "autoencoder_ising2d": Headline("anomaly_roc_auc", "higher", "baseline/chance",
                                    ("reconstruction_error",),
                                    "inliers: the test split; outliers: Ising at T in "
                                    "[t_max + 1, t_max + 3]"),
    "resnet_ising2d": Headline("accuracy", "higher", "baseline/majority"),
    "cnn_ising2d": Headline("accuracy", "higher", "baseline/majority"),
    "cyclegan_ising2d": Headline("translation/w1/energy_a_to_b", "lower",
                                 "translation/w1_reference/energy_b",
                                 ("translation/w1/abs_magnetization_a_to_b",
                                  "translation/w1/energy_b_to_a",
                                  "translation/w1_reference/energy_a"),
                                 "computed by translation_metrics here: `hpcforge evaluate` has "
                                 "no notion of two domains"),
    "lstm_lorenz96": Headline("relative_l2", "lower", "baseline/persistence", note=NEXT_FRAME),
    "gru_lorenz96": Headline("relative_l2", "lower", "baseline/persistence", note=NEXT_FRAME),
    "transformer_lorenz96": Headline("relative_l2", "lower", "baseline/persistence",
                                     note="8 frames (0.4 time units) ahead, raw states"),
    "cnn1d_lorenz96": Headline("relative_l2", "lower", "baseline/persistence",
                               note="16 frames (0.8 time units) ahead, raw states"),
    "mlp_digits": Headline("accuracy", "higher", "baseline/majority"),
    "cnn_digits": Headline("accuracy", "higher", "baseline/majority"),
}

TRANSLATORS = {"cyclegan_ising2d"}   # scored by translation_metrics, not by sampling

# Settings of every quality run (not of the experiments themselves): no W&B (its start-up costs
# seconds per run), a fixed seed, one thread, epochs enough that only the budget stops training.
RUN_KEYS = ["train.logger.mode=disabled", "train.seed=0", "train.epochs=100000", "train.threads=1"]


@dataclass
class Row:
    experiment: str
    model: str
    source: str
    metric: str
    value: float | None
    better: str
    reference: float | None
    reference_name: str
    steps: int                    # reached within the CPU budget
    batch_size: int
    ranks: int
    seed: int
    cpu_s: float                  # CPU seconds the training used (the budget, plus the last step)
    train_s: float                # wall seconds of training
    total_s: float                # wall seconds of prepare (if run), train and evaluate
    commands: list[str]
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- subprocesses
def run_cli(args: list[str], timeout: float = 900) -> tuple[subprocess.CompletedProcess, float]:
    """`hpcforge ARGS` in a subprocess from the repository root; (result, wall seconds)."""
    t0 = time.perf_counter()
    env = {**os.environ, "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, "-m", "hpcforge", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=env)
    return r, time.perf_counter() - t0


def command(args: list[str]) -> str:
    return shlex.join(CLI + args)


def ranks(proc) -> list:
    """The training processes to signal: the ranks mpirun started (`--nproc N`: the launching
    process itself has no handler and would die), else the process itself."""
    started = [c for c in proc.children(recursive=True) if c.name().startswith("python")]
    return started or [proc]


def tree_cpu_s(proc) -> float:
    """CPU seconds (user + system) of a process and its live children (mpirun's ranks)."""
    import psutil
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


@dataclass
class BudgetRun:
    returncode: int
    output: str
    wall_s: float
    cpu_s: float
    step: int | None              # the step checkpointed at the budget (None: ran to the end)
    checkpoint: str | None


CHECKPOINTED = re.compile(r"checkpointed step (\d+) to (\S+);")


def train_within(args: list[str], cpu_s: float, timeout: float = 1800) -> BudgetRun:
    """`hpcforge ARGS` until its process tree has used `cpu_s` CPU seconds, then SIGUSR1 (the
    trainer checkpoints at the next step boundary and exits 75). Polled twice a second."""
    import psutil
    t0 = time.perf_counter()
    env = {**os.environ, "WANDB_SILENT": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "hpcforge", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ps, used, signalled = psutil.Process(proc.pid), 0.0, False
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        used = max(used, tree_cpu_s(ps))
        if used >= cpu_s and not signalled:
            for target in ranks(ps):
                target.send_signal(signal.SIGUSR1)
            signalled = True
        if time.perf_counter() - t0 > timeout:
            proc.kill()
        time.sleep(0.5)
    reader.join(10)
    output = "".join(chunks)
    found = CHECKPOINTED.search(output)
    return BudgetRun(proc.returncode, output, time.perf_counter() - t0, used,
                    int(found[1]) if found else None, found[2] if found else None)


def last_error(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"exit {r.returncode}"


# --------------------------------------------------------------------------- data
def write_ising_domains(out: str | Path = DOMAINS_DIR, n: int = 2048, lattice: int = 32,
                        seed: int = 0, burn_in: int = 300, decorrelation: int = 20,
                        chunk: int = 256) -> Path:
    """The CycleGAN's two unpaired Ising domains as .npy files for the npy importer: low.npy holds
    ordered configurations (T in [1.6, 2.0]), high.npy disordered ones (T in [2.6, 3.2]), each
    (n, 1, L, L) int8 from independent chains (different seeds). Written atomically."""
    from pipeline.sources import ising2d
    out = Path(out) if Path(out).is_absolute() else ROOT / out
    out.mkdir(parents=True, exist_ok=True)
    for k, (name, t_min, t_max) in enumerate((("low", 1.6, 2.0), ("high", 2.6, 3.2))):
        p = ising2d.Params(lattice=lattice, t_min=t_min, t_max=t_max, n_temperatures=4,
                           burn_in=burn_in, decorrelation=decorrelation)
        parts = [ising2d.generate(p, seed + k, i, start, min(chunk, n - start))["spins"]
                 for i, start in enumerate(range(0, n, chunk))]
        tmp = out / f".{name}.tmp.npy"
        np.save(tmp, np.concatenate(parts))
        os.replace(tmp, out / f"{name}.npy")
    return out


def ensure_store(experiment: str, extra: list[str]) -> tuple[list[str], float]:
    """Prepare the experiment's store unless it exists with the same data settings; return the
    commands that make it and the seconds spent."""
    from pipeline.config import load_config
    from pipeline.data.prepare import content_config
    from pipeline.data.store import open_store
    cfg = load_config(experiment, extra)
    args = ["prepare", "-e", experiment, "data.dask.progress=false", *extra]
    commands, spent = [command(args)], 0.0
    path = ROOT / cfg.data.path
    if experiment.startswith("cyclegan"):
        commands.insert(0, ".venv/bin/python -m benchmarks.quality domains")
        if not path.exists() and not (ROOT / cfg.data.params.path / "high.npy").exists():
            t0 = time.perf_counter()
            write_ising_domains(cfg.data.params.path)
            spent += time.perf_counter() - t0
    if path.exists():
        stored = open_store(path).meta.content
        if stored != content_config(cfg.data):
            raise RuntimeError(f"{cfg.data.path} holds other data settings than {experiment}'s; "
                               f"experiments sharing a data.path must agree on them")
        return commands, spent
    r, wall = run_cli(args)
    if r.returncode != 0:
        raise RuntimeError(f"prepare {experiment}: {last_error(r)}")
    return commands, spent + wall


# --------------------------------------------------------------------------- baselines
def baselines(cfg: Any, split: str) -> dict[str, float]:
    """Trivial predictors on the evaluated split, in the headline metric's units."""
    from pipeline.analysis.evaluate import relative_l2
    from pipeline.data.store import open_store
    store = open_store(ROOT / cfg.data.path)
    inputs, out = cfg.data.inputs, {"baseline/chance": 0.5}
    if "y" not in inputs:
        return out
    y = np.asarray(store.variable(split, inputs["y"])[:])
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):   # class labels: the most common class
        out["baseline/majority"] = float(np.bincount(y.astype(np.int64)).max() / len(y))
        return out
    x = np.asarray(store.variable(split, inputs["x"])[:], np.float64)
    if cfg.data.source == "lorenz96":    # persistence: the last input frame stays
        last = x[:, -1:] if cfg.data.params.mode == "windows" else x
        out["baseline/persistence"] = relative_l2(np.broadcast_to(last, y.shape), y)
    elif cfg.data.normalize == "standard":  # the mean field is 0 in standardised units
        out["baseline/mean_field"] = 1.0
    return out


# --------------------------------------------------------------------------- CycleGAN
def translation_metrics(checkpoint: Path) -> dict[str, float]:
    """1-Wasserstein distances of Ising observables between translated and real samples of the
    target domain (test split), both ways; and between two real samples (test vs train) of each
    domain, the floor a perfect translator reaches. `hpcforge evaluate` has no notion of two
    domains, so this is computed here."""
    import torch

    from pipeline import physics
    from pipeline.analysis.shared import checkpoint_config, eval_split, load_checkpoint
    from pipeline.data.store import normalization, open_store
    from pipeline.train.ema import load_weights
    from pipeline.train.trainer import build_model
    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, [])
    model = build_model(cfg)
    load_weights(model, ckpt, cfg.train.ema.weights)  # as hpcforge evaluate: the average, if saved
    model.eval()
    store = open_store(ROOT / cfg.data.path)
    split, rng, out = eval_split(store), np.random.default_rng(0), {}
    domains = {"a": cfg.data.inputs["x"], "b": cfg.data.inputs["y"]}
    real = {d: np.asarray(store.variable(split, v)[:], np.float64) for d, v in domains.items()}
    train = {d: np.asarray(store.variable("train", v)[:len(real[d])], np.float64)
             for d, v in domains.items()}
    affine = {d: normalization(store.stats("train", v), cfg.data.normalize)
              for d, v in domains.items()}
    ising = physics.ising_scalars
    for src, dst in (("a", "b"), ("b", "a")):
        (shift, scale), g = affine[src], model.generators[src + dst]
        with torch.no_grad():
            fake = g(torch.as_tensor((real[src] - shift) / scale, dtype=torch.float32)).numpy()
        fake_obs = ising(physics.to_spins(physics.denormalize(fake, affine[dst]), rng))
        real_obs, train_obs = ising(real[dst]), ising(train[dst])
        for k in ("energy", "abs_magnetization"):
            out[f"translation/w1/{k}_{src}_to_{dst}"] = physics.wasserstein1(fake_obs[k], real_obs[k])
            out[f"translation/w1_reference/{k}_{dst}"] = physics.wasserstein1(train_obs[k],
                                                                              real_obs[k])
    return out


# --------------------------------------------------------------------------- thermodynamic curves
def held_out_temperatures(t_min: float = 1.6, t_max: float = 3.2, levels: int = 16) -> np.ndarray:
    """The midpoints between the training grid's temperatures: never seen in training."""
    half = (t_max - t_min) / (levels - 1) / 2
    return np.linspace(t_min + half, t_max - half, levels - 1)


def monte_carlo(temps: np.ndarray, per_t: int, lattice: int = 32, seed: int = 7) -> dict[str, np.ndarray]:
    """`per_t` configurations at each temperature from the data's own sampler and settings
    (configs/data/ising2d.yaml: burn-in 300, 20 sweeps apart)."""
    from pipeline.sources import ising2d
    p = ising2d.Params(lattice=lattice, t_min=float(temps[0]), t_max=float(temps[-1]),
                       n_temperatures=len(temps), chains=2 * len(temps))
    out = ising2d.generate(p, seed, 0, 0, per_t * len(temps))
    return {"spins": out["spins"], "temperature": out["temperature"]}


def thermo_metrics(checkpoint: Path, per_t: int = 64, figure: Path | None = None,
                   overrides: list[str] | None = None) -> dict[str, float]:
    """A temperature-conditional generator's thermodynamic curves (pipeline/physics/thermo.py) against the
    Monte Carlo ones: on the test split's temperatures (the training grid) and on the held-out
    midpoints between them. Each generated sample is made at a real sample's temperature and
    turned into spins by the one conversion rule (thermo.spins_from_output). `overrides` as
    for `hpcforge evaluate` (e.g. model.refine_sweeps=40)."""
    import torch

    from pipeline import physics
    from pipeline.analysis.shared import checkpoint_config, eval_split, load_checkpoint
    from pipeline.data.store import normalization, open_store
    from pipeline.physics import thermo
    from pipeline.train.ema import load_weights
    from pipeline.train.trainer import build_model
    ckpt = load_checkpoint(checkpoint)
    cfg = checkpoint_config(ckpt, overrides or [])
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    store = open_store(ROOT / cfg.data.path)
    split, var = eval_split(store), cfg.data.inputs["x"]
    affine, rng = normalization(store.stats("train", var), cfg.data.normalize), np.random.default_rng(0)
    torch.manual_seed(0)
    grid = {"spins": np.asarray(store.variable(split, var)[:]),
            "temperature": np.asarray(store.variable(split, cfg.data.inputs["cond"])[:])}
    held = monte_carlo(held_out_temperatures(), per_t)
    out, curves = {}, {}
    for name, real in (("grid", grid), ("held_out", held)):
        with torch.no_grad():
            x = model.sample(len(real["temperature"]), {"cond": torch.as_tensor(real["temperature"])})
        spins = thermo.spins_from_output(physics.denormalize(x.numpy(), affine), rng)
        r, g = (thermo.curves(s, real["temperature"]) for s in (real["spins"], spins))
        out.update({f"{k}/{name}": v for k, v in thermo.curve_errors(r, g).items()})
        curves[name] = (r, g)
    if figure is not None:
        both = {k: {q: np.concatenate([curves["grid"][i][q], curves["held_out"][i][q]])
                    for q in curves["grid"][i]} for i, k in enumerate(("real", "generated"))}
        order = np.argsort(both["real"]["T"])
        fig = thermo.curve_figure(*({q: v[order] for q, v in c.items()} for c in both.values()),
                                  held_out=held_out_temperatures())
        fig.savefig(figure)
    return out


# --------------------------------------------------------------------------- budget studies
STUDY = "outputs/study"           # run directories of `study`, one per (budget, seed)


def study(experiment: str, cpu_s: float, seeds: list[int], overrides: list[str] | None = None,
          tag: str = "", wall_s: float = 1800) -> list[dict[str, Any]]:
    """One experiment at one CPU budget over seeds (issue #15: ratio vs budget, stable over
    seeds), as run_experiment runs it; quality.json and quality.md are left alone. `overrides`
    (key=value) go to every command, a variant named by `tag` in its run folder
    (outputs/study/<cpu_s>s-seed<seed>[-<tag>]). `wall_s` bounds each training's wall time: on a
    shared machine a CPU budget can take far longer than itself. Each result is printed and
    appended to outputs/study.jsonl."""
    out = []
    for seed in seeds:
        runs = f"{STUDY}/{int(cpu_s)}s-seed{seed}{'-' + tag if tag else ''}"
        row = run_experiment(experiment, HEADLINES[experiment], runs=runs, cpu_s=cpu_s,
                             extra=[f"train.seed={seed}", *(overrides or [])], wall_s=wall_s)
        result = {k: v for k, v in asdict(row).items() if k not in ("metrics",)}
        result.update(tag=tag, overrides=list(overrides or []))
        result["metrics"] = {k: v for k, v in row.metrics.items()
                             if k.startswith(("w1", "elbo", "frechet", "precise", "nll", "bins/", "bin/",
                                            "classifier/", "response_bin/"))}
        for k in ("energy", "abs_magnetization"):
            if f"w1/{k}" in row.metrics:
                result[f"ratio/{k}"] = row.metrics[f"w1/{k}"] / row.metrics[f"w1_reference/{k}"]
        print(json.dumps(result))
        with open(ROOT / "outputs/study.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        out.append(result)
    return out


# --------------------------------------------------------------------------- study summaries
PRECISE_SAMPLERS = ("model", "network_only", "control")
BIN_SAMPLERS = ("model", "untrained", "mean_shower")
BIN_OBSERVABLES = ("shower_depth", "shower_width", "total_energy")


def study_rows(experiment: str, cpu_s: float, path: Path | None = None) -> list[dict[str, Any]]:
    """The last row of each seed of one experiment at one budget in outputs/study.jsonl (no tag)."""
    rows: dict[int, dict[str, Any]] = {}
    for text in (path or ROOT / "outputs/study.jsonl").read_text().splitlines():
        r = json.loads(text)
        if r["experiment"] == experiment and not r.get("tag") and abs(r["cpu_s"] - cpu_s) < 0.2 * cpu_s:
            rows[r["seed"]] = r
    for seed, r in rows.items():      # metrics the row left out (bin edges), from its evaluation
        for f in sorted((ROOT / STUDY).glob(f"{int(cpu_s)}s-seed{seed}/{experiment}/train/"
                                            f"checkpoints/step-*.eval.json"))[-1:]:
            r["metrics"] = {**json.loads(f.read_text())["metrics"], **r["metrics"]}
    return [rows[k] for k in sorted(rows)]


def spread(values: list[float], digits: int = 2) -> str:
    """'median [min, max]' of values over seeds (NaN-free), or '—'."""
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "—"
    return f"{np.median(v):.{digits}f} [{min(v):.{digits}f}, {max(v):.{digits}f}]"


def half_width(rows: list[dict[str, Any]], key: str) -> float:
    """The median over seeds of a 95 % interval's half-width as a factor, sqrt(hi / lo)."""
    f = [np.sqrt(r["metrics"][f"{key}_hi"] / r["metrics"][f"{key}_lo"]) for r in rows
         if r["metrics"].get(f"{key}_lo", 0) > 0]
    return float(np.median(f)) if f else float("nan")


def summary(experiment: str, cpu_s: float) -> str:
    """Markdown rows over seeds: the precise protocol's samplers for an Ising generator, or the
    per-bin table with controls for a conditional calorimeter model."""
    rows = study_rows(experiment, cpu_s)
    seeds = ", ".join(str(r["seed"]) for r in rows)
    lines = [f"{experiment}, {cpu_s:.0f} CPU s, seeds {seeds}: median [min, max] over seeds"]
    m = [r["metrics"] for r in rows]
    if any("precise/model/auc" in x for x in m):
        for key in PRECISE_SAMPLERS:
            if f"precise/{key}/auc" not in m[0]:
                continue
            cells = [spread([x[f"precise/{key}/w1_ratio/{o}"] for x in m])
                     for o in ("energy", "abs_magnetization")]
            cells.append(spread([x[f"precise/{key}/auc"] for x in m], 3))
            iv = max(half_width(rows, f"precise/{key}/w1_ratio/{o}") for o in ("energy", "abs_magnetization"))
            lines.append(f"| {key} | " + " | ".join(cells) + f" | x/÷ {iv:.2f} |")
    if any("bins/model/auc" in x for x in m):
        n_bins = 1 + max(int(k.split("/")[3]) for k in m[0] if k.startswith("bins/model/w1_ratio/"))
        edges = [spread([x[f"bin/{k}/low"] for x in m], 1) + "–" + spread([x[f"bin/{k}/high"] for x in m], 1)
                 for k in range(n_bins)]
        lines.append("bins (GeV, median over seeds): " + "; ".join(
            f"{k}: {np.median([x[f'bin/{k}/low'] for x in m]):.1f}–{np.median([x[f'bin/{k}/high'] for x in m]):.1f}"
            for k in range(n_bins)))
        for key in BIN_SAMPLERS:
            for o in BIN_OBSERVABLES:
                cells = [spread([x[f"bins/{key}/w1_ratio/{k}/{o}"] for x in m]) for k in range(n_bins)]
                iv = np.median([half_width(rows, f"bins/{key}/w1_ratio/{k}/{o}") for k in range(n_bins)])
                lines.append(f"| {key} | {o} | " + " | ".join(cells) + f" | x/÷ {iv:.2f} |")
            auc = spread([x[f"bins/{key}/auc"] for x in m], 3)
            lo = spread([x[f"bins/{key}/auc_lo"] for x in m], 3)
            hi = spread([x[f"bins/{key}/auc_hi"] for x in m], 3)
            lines.append(f"| {key} | AUC {auc} (95 % lo {lo}, hi {hi}) |")
        del edges
    lines += [f"seed {r['seed']}: {r['steps']} steps, {r['cpu_s']:.0f} CPU s, train {r['train_s']:.0f} s wall, "
              f"total {r['total_s']:.0f} s wall; " + "; ".join(n for n in r["notes"] if n.startswith("verdict"))
              for r in rows]
    return "\n".join(lines)


def bins_figure(experiment: str, cpu_s: float, out: Path) -> Path:
    """W1 / floor per incident-energy bin over seeds (median, bars from min to max) for the model
    and its two no-network controls, one panel per observable: docs/img/<experiment>_bins.png."""
    from matplotlib.ticker import NullFormatter

    from pipeline.core.figures import new_figure, to_png
    rows = study_rows(experiment, cpu_s)
    m = [r["metrics"] for r in rows]
    n_bins = 1 + max(int(k.split("/")[3]) for k in m[0] if k.startswith("bins/model/w1_ratio/"))
    centres = np.array([np.sqrt(np.median([x[f"bin/{k}/low"] for x in m]) *
                                np.median([x[f"bin/{k}/high"] for x in m])) for k in range(n_bins)])
    names = {"model": "model", "untrained": "same network, untrained",
             "mean_shower": "no network: bin's mean shower x E"}
    fig, axes = new_figure(len(BIN_OBSERVABLES), width=3.4, height=2.9, ncol=len(BIN_OBSERVABLES))
    for ax, o in zip(axes, BIN_OBSERVABLES):
        for (key, label), dx in zip(names.items(), (-0.05, 0.0, 0.05)):
            v = np.array([[x[f"bins/{key}/w1_ratio/{k}/{o}"] for x in m] for k in range(n_bins)])
            med = np.median(v, axis=1)
            ax.errorbar(centres * np.exp(dx), med, yerr=[med - v.min(1), v.max(1) - med], fmt="o-",
                        ms=3, capsize=2, lw=1, label=label)
        ax.axhline(2.0, ls="--", color="grey", lw=0.8)
        ax.axhline(1.0, ls=":", color="grey", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="incident energy (GeV)", ylabel=f"W1({o}) / floor")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{o}: median, range over seeds {', '.join(str(r['seed']) for r in rows)}", fontsize=7)
    axes[0].legend(fontsize=6)
    out.write_bytes(to_png(fig))
    return out


# --------------------------------------------------------------------------- one experiment
def run_experiment(experiment: str, headline: Headline, nproc: int = 1, runs: str = RUNS,
                   cpu_s: float = CPU_BUDGET_S, extra: list[str] | None = None, log=print,
                   wall_s: float = 1800) -> Row:
    """Prepare, train within `cpu_s` CPU seconds and evaluate one experiment into
    `runs`/<experiment>; a failure becomes a row with a note. `extra` overrides go to every
    command (e.g. a smaller dataset)."""
    from pipeline.config import load_config
    extra = list(extra or [])
    out_dir = f"{runs}/{experiment}"
    backend = "train.dist.backend=none" if nproc == 1 else "train.dist.backend=horovod"
    common = ["train", "-e", experiment, *(["--nproc", str(nproc)] if nproc > 1 else []),
              f"output_dir={out_dir}", *RUN_KEYS, backend, *extra]
    cfg = load_config(experiment, [f"output_dir={out_dir}", *RUN_KEYS, *extra])
    shutil.rmtree(ROOT / out_dir, ignore_errors=True)  # a fresh run, never a resumed one
    source = "ising2d (2 domains)" if cfg.data.source == "npy" else cfg.data.source
    row = Row(experiment, cfg.model.name, source, headline.metric, None, headline.better, None,
              headline.reference, 0, cfg.train.batch_size, nproc, cfg.train.seed, 0.0, 0.0, 0.0, [])
    t0 = time.perf_counter()
    try:
        row.commands, _ = ensure_store(experiment, extra)
        run = train_within([*common, f"train.max_steps={STEP_CAP}"], cpu_s, timeout=wall_s)
        row.train_s, row.cpu_s = run.wall_s, run.cpu_s
        if run.checkpoint is None:
            raise RuntimeError(f"train exited {run.returncode} without a budget checkpoint: "
                               f"{run.output.strip().splitlines()[-1][:300] if run.output.strip() else ''}")
        row.steps = run.step
        row.commands.append(command([*common, f"train.max_steps={run.step}"]))
        evaluate_into(row, cfg, run.checkpoint, headline)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        row.notes.append(f"FAILED {e}")
    row.total_s = time.perf_counter() - t0
    log(f"[quality] {experiment}: {row.metric} = {row.value} (reference {row.reference}), "
        f"{row.steps} steps in {row.cpu_s:.0f} CPU s / {row.train_s:.0f} s wall; "
        f"total {row.total_s:.0f} s {'; '.join(row.notes)}")
    return row


def evaluate_into(row: Row, cfg: Any, ckpt: str, headline: Headline) -> None:
    """Run `hpcforge evaluate` on the budget's checkpoint; the command names final.pt, which the
    row's fixed-step train command writes."""
    r, _ = run_cli(["evaluate", ckpt])
    final = f"{Path(ckpt).parent}/final.pt"
    row.commands.append(command(["evaluate", final]))
    if r.returncode != 0:
        row.notes.append(f"hpcforge evaluate failed: {last_error(r)}")
    else:
        result = json.loads((ROOT / ckpt).with_name(Path(ckpt).stem + ".eval.json").read_text())
        row.metrics.update(result["metrics"])
        row.notes += [n for n in result["notes"] if not n.startswith("no W&B run")]  # by design
        split = result["split"]
        row.metrics.update(baselines(cfg, split))
    if row.experiment in TRANSLATORS:
        row.metrics.update(translation_metrics(ROOT / ckpt))
        row.commands.append(f".venv/bin/python -c 'from benchmarks.quality import translation_metrics"
                            f" as t; print(t(\"{final}\"))'")
    row.value = row.metrics.get(headline.metric)
    row.reference = row.metrics.get(headline.reference) if headline.reference else None
    for k in headline.extra:
        if k in row.metrics:
            row.notes.append(f"{k} = {row.metrics[k]:.4g}")


# --------------------------------------------------------------------------- output
def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.4g}"


def verdict(r: Row) -> str:
    """The value against its reference, in words: a baseline beaten or not, or how many times
    the real-vs-real floor a distance is (within 2x of it is good; beyond 10x, poor)."""
    if r.value is None or r.reference is None:
        return ""
    if r.reference_name.startswith("baseline/"):
        beats = r.value > r.reference if r.better == "higher" else r.value < r.reference
        return "beats the baseline" if beats else "POOR: no better than the baseline"
    ratio = r.value / max(r.reference, 1e-12)
    word = "good" if ratio <= 2 else "fair" if ratio <= 10 else "POOR"
    return f"{word}: {ratio:.3g}x the real-vs-real floor"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    head = ["experiment", "model", "data", "metric", "value", "reference", "steps × batch",
            "CPU s", "wall s", "seed", "notes"]
    lines = ["# Quality after a fixed CPU budget", "",
             f"Measured {meta['date']} on {meta['machine']}; {meta['versions']}. Each row: "
             f"`hpcforge prepare`, `hpcforge train` on 1 rank with 1 thread until the training "
             f"process has used {meta['cpu_budget_s']:.0f} CPU seconds (start-up included; "
             f"`benchmarks/quality.py`), `hpcforge evaluate` on the test split. \"steps\" is "
             f"where the budget stopped training; the commands below train exactly that many. "
             f"\"wall s\" is the training's wall time on the shared machine. The reference is a "
             f"trivial baseline or the same distance between two real samples (the floor a "
             f"perfect model reaches).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        metric = f"{r.metric} ({r.better} is better)"
        ref = f"{fmt(r.reference)} ({r.reference_name.split('/')[-1]})" if r.reference_name else "—"
        about = HEADLINES[r.experiment].note if r.experiment in HEADLINES else ""
        notes = "; ".join(n for n in [verdict(r), about, *r.notes] if n).replace("|", "\\|")
        lines.append(f"| {r.experiment} | {r.model} | {r.source} | {metric} | {fmt(r.value)} | "
                     f"{ref} | {r.steps} × {r.batch_size} | {r.cpu_s:.0f} | {r.train_s:.0f} | "
                     f"{r.seed} | {notes} |")
    lines += ["", "## Commands that reproduce each row", ""]
    for r in rows:
        lines += [f"**{r.experiment}**", "```bash", *r.commands, "```", ""]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    import platform

    import torch
    return {"date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
                       f"shared with other work",
            "versions": f"Python {platform.python_version()}, torch {torch.__version__}",
            "cpu_budget_s": CPU_BUDGET_S}


STUDIES_MARK = "<!-- budget studies (benchmarks.quality study): kept when the table is rewritten -->"


def write(rows: list[Row], meta: dict[str, Any]) -> None:
    """quality.json and quality.md; a section of quality.md after STUDIES_MARK is kept."""
    OUT.joinpath("quality.json").write_text(json.dumps(
        {**meta, "rows": [asdict(r) for r in rows]}, indent=1))
    md = OUT / "quality.md"
    old = md.read_text() if md.exists() else ""
    kept = old[old.index(STUDIES_MARK):] if STUDIES_MARK in old else ""
    md.write_text(markdown(rows, meta) + "\n" + ("\n" + kept if kept else ""))


def merge(rows: list[Row]) -> list[Row]:
    """These rows, replacing same-named rows of an existing quality.json (for --only reruns)."""
    path = OUT / "quality.json"
    old = {r["experiment"]: Row(**r) for r in json.loads(path.read_text())["rows"]} if path.exists() else {}
    old.update({r.experiment: r for r in rows})
    return [old[k] for k in HEADLINES if k in old]


def rescore(row: Row, runs: str = RUNS) -> Row:
    """Evaluate a row's budget checkpoint again (no training): for rows whose evaluation failed."""
    from pipeline.config import load_config
    cfg = load_config(row.experiment, [f"output_dir={runs}/{row.experiment}", *RUN_KEYS])
    ckpt = f"{runs}/{row.experiment}/train/checkpoints/step-{row.steps:08d}.pt"
    row.notes = [n for n in row.notes if not n.startswith("hpcforge evaluate failed")]
    row.commands = [c for c in row.commands if " evaluate " not in c and "python -c" not in c]
    row.metrics = {}
    evaluate_into(row, cfg, ckpt, HEADLINES[row.experiment])
    print(f"[quality] {row.experiment} rescored: {row.metric} = {row.value}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.quality", description=__doc__.split("\n")[0])
    p.add_argument("what", nargs="?", choices=["all", "domains", "thermo", "study", "summary"],
                   default="all", help="summary: --only's study rows at --cpu-s over seeds, as "
                   "markdown, and a calorimeter model's per-bin figure (docs/img/<exp>_bins.png)")
    p.add_argument("--cpu-s", type=float, default=CPU_BUDGET_S, help="study: the CPU budget")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="study: train.seed values")
    p.add_argument("--checkpoint", type=Path, help="thermo: a temperature-conditional Ising "
                   "generator's checkpoint; its curves go to <checkpoint>.thermo.png")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="thermo: overrides of the checkpoint's config, as for hpcforge evaluate; "
                   "study: overrides of the experiment for every command (a variant)")
    p.add_argument("--wall-s", type=float, default=1800, help="study: the most wall seconds a "
                   "training may take before it is killed (raise it on a loaded machine)")
    p.add_argument("--tag", default="", help="study: a name for the variant --set makes, in its "
                   "run folder and outputs/study.jsonl")
    p.add_argument("--only", nargs="+", choices=sorted(HEADLINES), help="run these experiments")
    p.add_argument("--nproc", type=int, default=1, help="Horovod ranks per training run")
    p.add_argument("--rescore", action="store_true",
                   help="evaluate the rows of quality.json without a value again, no training")
    args = p.parse_args(argv)
    if args.rescore:
        rows = [rescore(r) if r.value is None and r.steps else r for r in merge([])]
        write(rows, machine())
        return 0 if all(r.value is not None for r in rows) else 1
    if args.what == "summary":
        for name in args.only or []:
            print(summary(name, args.cpu_s))
            if any(k.startswith("bins/") for r in study_rows(name, args.cpu_s) for k in r["metrics"]):
                print(bins_figure(name, args.cpu_s, ROOT / "docs/img" / f"{name}_bins.png"))
        return 0
    if args.what == "study":
        for name in args.only or []:
            study(name, args.cpu_s, args.seeds, args.set, args.tag, args.wall_s)
        return 0
    if args.what == "thermo":
        print(json.dumps(thermo_metrics(args.checkpoint, figure=args.checkpoint.with_suffix(
            ".thermo.png"), overrides=args.set), indent=1))
        return 0
    if args.what == "domains":
        print(f"[quality] domains: {write_ising_domains()}")
        return 0
    missing = sorted(set(q.stem for q in (ROOT / "configs/experiment").glob("*.yaml"))
                     - set(HEADLINES) - {"demo"})
    if missing:
        print(f"[quality] no headline metric for {', '.join(missing)}; add them to HEADLINES",
              file=sys.stderr)
        return 2
    rows = []
    for name in args.only or HEADLINES:
        rows.append(run_experiment(name, HEADLINES[name], args.nproc))
        write(merge(rows), machine())   # after each row: a partial run still leaves a table
    return 0 if all(r.value is not None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
