"""Configuration: YAML groups composed into typed dataclasses, once, at the entry point.

    configs/experiment/<name>.yaml  picks one file per group under `defaults:` and overrides keys;
    configs/<group>/<name>.yaml     one group each for data, model, train, cluster;
    command line                    `group=name` swaps a group file, `a.b=value` sets a key.

Below `load_config` nothing reads dicts of settings. A wrong key, type or missing value raises
ConfigError naming the key, the expected type and the valid keys.

Why hand-written and not OmegaConf structured configs (issue #17). Tried side by side, OmegaConf
2.4.0 loading these same dataclasses (`OmegaConf.merge(OmegaConf.structured(Config), dotlist)`):

    input                   OmegaConf                                  here
    train.epoch=3           Key 'epoch' not in 'Train'. Did you mean:  unknown key train.epoch; valid
                            'epochs'? + full_key/reference_type/       keys under train: accumulate,
                            object_type lines                          batch_size, ... (all of them)
    train.epochs=true       Value 'True' of type 'bool' could not be   train.epochs: expected int, got
                            converted to Integer (+ 3 lines)           True (bool); fix the YAML or ...
    data.params.lattce=3    accepted: `params` is typed by data.source unknown key data.params.lattce;
                            in the same file, a static schema sees Any  valid keys under data.params: ...
    train.lr=0              accepted (no value ranges)                 train.lr=0.0: expected more than 0

Type errors are as good in both (OmegaConf also knows Literal); but the params chosen by another
key (data.source, model.name: the registries' dataclasses), the ranges and the one-line messages
would all still be code of ours around OmegaConf, and group composition (`model=dcgan`) would be
Hydra's on top. ~200 lines of our own stay shorter than that wrapping.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.core.errors import ConfigError


def _config_dir() -> Path:
    """$HPCFORGE_CONFIG_DIR, else the checkout's configs/ (editable install or run in place),
    else the copy a non-editable install ships as package data, `hpcforge/configs` (pyproject.toml
    maps the checkout's configs/ there). Read as files, not imported: `hpcforge` is the layer above,
    and its __init__ holds no code."""
    if os.environ.get("HPCFORGE_CONFIG_DIR"):
        return Path(os.environ["HPCFORGE_CONFIG_DIR"])
    beside = Path(__file__).resolve().parents[2] / "configs"  # pipeline/config/ -> checkout
    if beside.is_dir():
        return beside
    return Path(str(resources.files("hpcforge") / "configs"))


CONFIG_DIR = _config_dir()
GROUPS = ("data", "model", "train", "cluster")


# --------------------------------------------------------------------------- schema
@dataclass
class SlurmDaskConfig:
    """dask-jobqueue SLURMCluster settings (`data.dask.cluster=slurm`): one Slurm job per `jobs`."""
    jobs: int = 1                  # Slurm jobs started; each runs `processes` Dask workers
    queue: str | None = None       # Slurm partition (-p)
    account: str | None = None     # -A
    walltime: str = "01:00:00"     # -t
    cores: int = 4                 # CPUs per job, shared by its worker processes
    memory: str = "16GiB"          # per job
    processes: int = 1             # Dask worker processes per job
    interface: str | None = None   # network interface the workers talk on (e.g. ib0)
    local_directory: str | None = None   # worker spill directory on the node (e.g. $TMPDIR)
    log_directory: str | None = None     # where the Slurm jobs' stdout/stderr go
    job_extra_directives: list[str] = field(default_factory=list)  # extra #SBATCH lines
    job_script_prologue: list[str] = field(default_factory=list)   # e.g. module load, venv
    wait_s: float = 300.0          # how long to wait for the first worker before giving up


@dataclass
class DaskConfig:
    cluster: Literal["local", "slurm", "address"] = "local"
    scheduler: str | None = None   # address of a running scheduler (cluster=address; also implied)
    n_workers: int = 2
    threads_per_worker: int = 1
    memory_limit: str = "4GiB"     # per worker
    processes: bool = True         # LocalCluster workers as processes (False: threads, one process)
    progress: bool = True          # Dask progress bar on the console
    slurm: SlurmDaskConfig = field(default_factory=SlurmDaskConfig)


@dataclass
class DataConfig:
    source: str = "ising2d"        # a name in pipeline.sources.SOURCES
    params: Any = None             # the source's Params dataclass (fields depend on `source`)
    path: str = ""                 # Zarr store; "" means <output_dir>/data/<source>.zarr
    n_samples: int = 4096          # importers: 0 takes every sample the files hold
    chunk_size: int = 256          # samples generated (or read) per Dask task
    shard_size: int = 0            # samples per output shard (one write task, one checksum); 0: from the budget
    memory_budget: str = "2GiB"    # peak memory of all Dask workers together; sizes shards
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0                  # generation, split and shuffle are pure functions of it
    overwrite: bool = False        # replace an existing store (never silently)
    invalid: Literal["fail", "drop", "fill"] = "fail"   # samples holding NaN/Inf
    fill_value: float = 0.0        # what NaN/Inf become with invalid=fill
    # batch key -> variable, or a list of variables: each normalised, flattened and joined (B, F)
    inputs: dict[str, str | list[str]] = field(default_factory=lambda: {"x": "spins"})
    normalize: Literal["minmax", "standard", "none"] = "minmax"  # from the stored statistics
    dask: DaskConfig = field(default_factory=DaskConfig)


@dataclass
class ModelSection:
    name: str = "vae"              # a name in models.MODELS
    params: Any = None             # the family's config dataclass
    # the family's keys this config sets; shape keys it leaves unset are taken from the store
    # (pipeline.train.shapes, issue 24). Not a setting: never written, a stored config sets them all.
    given: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)


@dataclass
class DistConfig:
    backend: Literal["horovod", "ddp", "none"] = "horovod"
    nproc: int = 1                 # ranks `hpcforge train` launches on this machine
    # who starts the `nproc` ranks: hpcforge itself (nothing listens on a network address; Horovod
    # on its Gloo controller), mpirun (Horovod on MPI; mpirun listens on 0.0.0.0 and ::), or
    # horovodrun --gloo (its rendezvous listens on 0.0.0.0); docs/security.md. Under srun on
    # several nodes, mpirun keeps Horovod on MPI, whose TCP transport listens on every address.
    launcher: Literal["hpcforge", "mpirun", "horovodrun"] = "hpcforge"
    fp16_allreduce: bool = False   # Horovod: compress gradients to fp16 on the wire
    bucket_mb: float = 25.0        # ddp: gradients all-reduced during backward in buckets this big
    timeout_s: int = 300           # a silent rank ends the job after this long, not never
    signal_check_s: float = 1.0    # ranks agree on a preemption signal this often (0: each step)
    sync_batchnorm: bool = False   # GPUs: batch norm over the global batch (SyncBatchNorm)
    # Where ranks on several nodes meet and talk (issue 25): the network interface (e.g. ib0,
    # eth1) and the rendezvous port of rank 0; None/0: MASTER_ADDR's address and a free port.
    # Ranks on one node always use loopback (or a file) and open nothing on the network.
    interface: str | None = None
    port: int = 0


@dataclass
class LoggerConfig:
    mode: Literal["auto", "offline", "online", "disabled"] = "auto"  # auto: online iff WANDB_API_KEY
    project: str = "hpcforge"
    entity: str | None = None
    group: str | None = None       # runs of one sweep or chain share a group
    tags: list[str] = field(default_factory=list)
    job_type: str = "train"
    log_every: int = 10            # steps between scalar logs
    images_every: int = 100        # steps between sample images (and at the end)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9          # sgd only; adam-style betas come from the model's spec
    impl: Literal["auto", "fused", "foreach", "for-loop"] = "auto"  # torch's update kernels
    # lr scale per parameter-name prefix (issue #16), e.g. {features: 0.1}: the backbone at 0.1x lr;
    # the schedule and rank scaling apply on top; the longest matching prefix wins
    groups: dict[str, float] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    name: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0          # linear warm-up from lr / ranks (Goyal et al. 2017)
    step_size: int = 1000          # "step": optimizer steps between decays
    gamma: float = 0.1             # "step": decay factor
    min_lr_ratio: float = 0.0      # "cosine": final lr as a fraction of the peak


@dataclass
class CheckpointConfig:
    every_steps: int = 0           # also checkpoint every N steps (0: at epoch ends only)
    keep: int = 3                  # newest step checkpoints kept (plus best.pt and last.pt)
    best_metric: str = "val/loss"  # picks best.pt; "" keeps no best
    best_mode: Literal["min", "max"] = "min"
    background: bool = True        # write on a thread; the step pays only for a copy in memory


@dataclass
class EarlyStopConfig:
    metric: str = ""               # e.g. "val/loss"; "" turns early stopping off
    patience: int = 3              # validations without improvement before stopping
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0


@dataclass
class AdversarialConfig:
    """Adversarial training (issue #16): part of each batch replaced by FGSM/PGD examples made
    against the model's own loss, on the fly (pipeline.analysis.attack.perturb)."""
    eps: float = 0.0               # L-inf radius in normalised input units; 0: off
    method: Literal["fgsm", "pgd"] = "fgsm"
    steps: int = 3                 # pgd: signed-gradient steps
    fraction: float = 0.5          # share of each batch replaced by adversarial examples


@dataclass
class EMAConfig:
    """An average of the generating network's weights for sampling (issue #15; pipeline/train/ema.py)."""
    decay: float = 0.0             # ema <- decay * ema + (1 - decay) * w per step; 0: off
    start: int = 0                 # updates before averaging begins (the average is w until then)
    weights: Literal["ema", "raw"] = "ema"  # what evaluate/explain/attack/thermo load, if saved


@dataclass
class TrainConfig:
    epochs: int = 5
    max_steps: int = 0             # stop after this many steps (0: run all epochs)
    batch_size: int = 64           # per rank; the global batch is batch_size * ranks * accumulate
    lr: float = 1e-3
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # multiply lr by ranks (or sqrt)
    accumulate: int = 1            # batches whose gradients are summed before each step
    grad_clip: float = 0.0         # max global gradient norm (0: no clipping)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 needs a GPU (gradient scaler)
    seed: int = 0
    deterministic: bool = False    # torch deterministic algorithms (slower)
    # torch.compile the model's losses. Off: on CPU (`hpcforge bench --only compile`) a compiled
    # Ising VAE / ResNet / DCGAN step ran at 0.71x / 1.84x / 0.85x eager, and their own runs
    # (510-1530 steps) took longer with the 94-338 s of compiling than eager (0.52x-0.87x).
    compile: bool = False
    threads: int = 0               # torch threads per rank; 0: cores / ranks on this node
    prefetch: int = 2              # batches read ahead by the loader's thread
    val_every: int = 0             # validate every N steps (0: at each epoch end)
    resume: str = "never"          # "auto": newest valid checkpoint in the run dir; or a path.
                                   # never: a new run, refused where output_dir holds one (rundir.py)
    nonfinite: Literal["skip", "fail"] = "skip"  # a step with a NaN/Inf loss or gradient
    max_nonfinite: int = 5         # stop after this many non-finite steps in a row
    inject_nan_at: list[int] = field(default_factory=list)  # fault injection: NaN batch at steps
    # where step time goes (issue 28, pipeline/train/profile.py): "steps" logs each rank's share of step
    # time in data wait, forward, backward, all-reduce wait, optimizer and logging; "trace" also
    # writes a torch.profiler trace of profile_steps ([first step, count]) for Perfetto/Chrome
    profile: Literal["off", "steps", "trace"] = "off"
    profile_steps: list[int] = field(default_factory=lambda: [10, 3])  # trace: [first step, count]
    init_from: str = ""            # a checkpoint whose model weights start this run (issue #16)
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept fixed
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    early_stopping: EarlyStopConfig = field(default_factory=EarlyStopConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class ClusterConfig:
    """Where and how `hpcforge submit`/`sweep` run a job (read only by jobs/)."""
    executor: Literal["auto", "slurm", "local", "debug"] = "auto"  # auto: slurm if sbatch is on PATH
    partition: str | None = None   # None: the cluster's default partition
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 0        # ranks per node; 0: one per GPU (one on CPU-only nodes)
    cpus_per_task: int = 1
    mem_gb: int = 0                # per node; 0: the partition's default
    timeout_min: int = 60          # the job's time limit
    signal_delay_s: int = 120      # the checkpoint signal comes this long before the time limit
    max_requeues: int = 3          # preemptions/timeouts survived by requeueing, then the job fails
    constraint: str | None = None
    mpi: str | None = "pmix"       # srun --mpi=<this> (pmix, pmi2, ...); None: the site's MpiDefault
    setup: list[str] = field(default_factory=list)         # shell lines before srun (module load ...)
    sbatch_extra: dict[str, str] = field(default_factory=dict)  # more #SBATCH --key=value options
    container: str | None = None   # Apptainer image: ranks run in `apptainer exec --nv <image>`
    binds: list[str] = field(default_factory=list)         # more container binds (data/outputs automatic)
    array_parallelism: int = 4     # sweep tasks running at once
    jobs_dir: str = "outputs/jobs" # per-job records and logs: <jobs_dir>/<job id>/


@dataclass
class Config:
    experiment: str = "demo"
    output_dir: str = ""           # "" means outputs/<experiment>
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (stored with every output)."""
        return _plain(self)


# --------------------------------------------------------------------------- composition
def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _read_yaml(group: str, name: str) -> dict[str, Any]:
    path = CONFIG_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{group}={name}: no file {path.relative_to(CONFIG_DIR.parent)}; "
                          f"available: {', '.join(available(group)) or '(none)'}")
    try:
        body = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__}: {e})") from None
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: expected a mapping at the top, got {type(body).__name__}")
    return body


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: '{p}' is a value, not a section")
    node[leaf] = value


def parse_overrides(args: list[str]) -> tuple[dict[str, str], list[tuple[str, Any]]]:
    """Split `group=name` choices from `a.b=value` overrides; values are parsed as YAML."""
    groups: dict[str, str] = {}
    keys: list[tuple[str, Any]] = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override {arg!r}: expected key=value (e.g. train.epochs=3) "
                              f"or group=name (groups: experiment, {', '.join(GROUPS)})")
        key, text = arg.split("=", 1)
        if not key or "" in key.split("."):
            raise ConfigError(f"override {arg!r}: {key!r} is not a key; expected key=value with a "
                              f"dotted key such as train.epochs=3")
        if key in GROUPS + ("experiment",) and "." not in key:
            groups[key] = text
        else:
            keys.append((key, _yaml_value(arg, key, text)))
    return groups, keys


def _yaml_value(arg: str, key: str, text: str) -> Any:
    """An override's value, parsed as YAML; a malformed one is named with the forms that work."""
    if not text:
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"override {arg!r}: {text!r} is not a YAML value ({problem}); expected "
                          f"{key}=<YAML value>: a number (3), a list ([1, 2]), a mapping ({{a: 1}}) "
                          f"or text; quote the whole override for your shell") from None


def compose(experiment: str = "demo", overrides: list[str] | None = None) -> dict[str, Any]:
    """The raw merged dict: group files, then the experiment's own keys, then overrides."""
    groups, keys = parse_overrides(overrides or [])
    experiment = groups.pop("experiment", experiment)
    exp = _read_yaml("experiment", experiment)
    defaults = exp.pop("defaults", {}) or {}
    unknown = set(defaults) - set(GROUPS)
    if unknown:
        raise ConfigError(f"experiment {experiment}: unknown group(s) {sorted(unknown)} under "
                          f"defaults; valid groups: {', '.join(GROUPS)}")
    raw: dict[str, Any] = {"experiment": experiment}
    for group in GROUPS:
        name = groups.get(group, defaults.get(group))
        if name is not None:
            raw[group] = _read_yaml(group, str(name))
    raw = _merge(raw, exp)
    for key, value in keys:
        _set_dotted(raw, key, value)
    return raw


# The batch keys the model families read (models/: batch["x"], batch["y"], batch["cond"]).
BATCH_KEYS = {"x": "the model's input", "y": "its target", "cond": "a conditioning value"}


def check_inputs(inputs: dict[str, str | list[str]]) -> None:
    """data.inputs maps batch keys to store variables; a key no model reads would be loaded and
    silently ignored (issue 24: `x1: layer_1`), so it is refused, naming the valid ones."""
    empty = [k for k, v in inputs.items() if not v]
    if empty:
        raise ConfigError(f"data.inputs.{empty[0]}: no variable; expected a store variable or a "
                          f"list of them, e.g. data.inputs.{empty[0]}=[layer_0,layer_1]")
    unknown = sorted(set(inputs) - set(BATCH_KEYS))
    if unknown:
        valid = ", ".join(f"{k} ({what})" for k, what in BATCH_KEYS.items())
        raise ConfigError(f"data.inputs.{unknown[0]}={inputs[unknown[0]]}: unknown batch key "
                          f"{unknown[0]!r}; valid keys: {valid}; e.g. data.inputs="
                          f"{{x: {inputs[unknown[0]]}}}")


def load_config(experiment: str = "demo", overrides: list[str] | None = None) -> Config:
    """Compose and type the config; the only entry from YAML into the code."""
    cfg = build(Config, compose(experiment, overrides), "")
    check_ranges(cfg)
    check_inputs(cfg.data.inputs)
    if not cfg.output_dir:
        cfg.output_dir = f"outputs/{cfg.experiment}"
    if not cfg.data.path:
        cfg.data.path = f"{cfg.output_dir}/data/{cfg.data.source}.zarr"
    return cfg


def config_from_dict(resolved: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """A stored resolved config (checkpoint, store attributes) with `key=value` overrides."""
    groups, keys = parse_overrides(overrides or [])
    if groups:
        raise ConfigError(f"a stored config takes key=value overrides, not group files "
                          f"({', '.join(f'{g}={n}' for g, n in groups.items())}); set keys such "
                          f"as data.path=... instead")
    raw = json.loads(json.dumps(resolved))  # a private copy
    for key, value in keys:
        _set_dotted(raw, key, value)
    cfg = build(Config, raw, "")
    check_ranges(cfg)
    return cfg


# --------------------------------------------------------------------------- value ranges
@dataclass(frozen=True)
class Range:
    """A numeric setting's valid interval (finite numbers only); `unit` words the message."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False          # lo itself is not allowed (lr > 0)
    hi_open: bool = False          # hi itself is not allowed (a split's fraction < 1)
    unit: str = ""

    def holds(self, v: float) -> bool:
        above = self.lo is None or v > self.lo or (v == self.lo and not self.lo_open)
        below = self.hi is None or v < self.hi or (v == self.hi and not self.hi_open)
        return math.isfinite(v) and above and below

    def expected(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.lo is None:
            return "a finite number"
        if self.hi is not None:
            return (f"a number in {'(' if self.lo_open else '['}{self.lo}, {self.hi}"
                    f"{')' if self.hi_open else ']'}{unit}")
        return f"more than {self.lo}{unit}" if self.lo_open else f"at least {self.lo}{unit}"

    def fix(self, key: str) -> str:
        if self.lo is not None and self.hi is None and not self.lo_open:
            return f"set {key}={self.lo} or more"
        return f"pass {key}=<value> with a value in that range"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, lo_open=True)
UNIT_INTERVAL = Range(0, 1)
FRACTION = Range(0, 1, hi_open=True)   # a split's share of the samples: train keeps some
# Every int and float setting of the schema above, with its valid range (a test keeps this table
# complete). Checked once by `check_ranges` when a config is loaded: a bad value is refused before
# any Dask worker, rank or Slurm job starts, with one line that names it. The variant params
# (data.params, model.params) are checked by their own sources and models.
RANGES: dict[str, Range] = {
    "data.n_samples": AT_LEAST_0,          # 0: importers take every sample
    "data.chunk_size": AT_LEAST_1,
    "data.shard_size": AT_LEAST_0,         # 0: from data.memory_budget
    "data.val_fraction": FRACTION,
    "data.test_fraction": FRACTION,
    "data.seed": AT_LEAST_0,               # numpy seeds are non-negative
    "data.fill_value": Range(),
    "data.dask.n_workers": Range(1, unit="worker"),
    "data.dask.threads_per_worker": AT_LEAST_1,
    "data.dask.slurm.jobs": AT_LEAST_1,
    "data.dask.slurm.cores": AT_LEAST_1,
    "data.dask.slurm.processes": AT_LEAST_1,
    "data.dask.slurm.wait_s": POSITIVE,
    "train.epochs": AT_LEAST_1,
    "train.max_steps": AT_LEAST_0,         # 0: all epochs
    "train.batch_size": Range(1, unit="sample per rank"),
    "train.lr": POSITIVE,
    "train.accumulate": AT_LEAST_1,
    "train.grad_clip": AT_LEAST_0,         # 0: no clipping
    "train.seed": AT_LEAST_0,
    "train.threads": AT_LEAST_0,           # 0: cores / ranks
    "train.prefetch": AT_LEAST_1,
    "train.val_every": AT_LEAST_0,         # 0: at epoch ends
    "train.max_nonfinite": AT_LEAST_1,
    "train.inject_nan_at": AT_LEAST_1,     # each item: a step, counted from 1
    "train.profile_steps": AT_LEAST_1,     # [first step (from 1), count]
    "train.optim.weight_decay": AT_LEAST_0,
    "train.adversarial.eps": AT_LEAST_0,          # 0: off
    "train.adversarial.steps": AT_LEAST_1,
    "train.adversarial.fraction": Range(0, 1, lo_open=True),
    "train.ema.decay": Range(0, 1, hi_open=True),  # 0: off; 1 would never move
    "train.ema.start": AT_LEAST_0,
    "train.optim.momentum": UNIT_INTERVAL,
    "train.schedule.warmup_steps": AT_LEAST_0,
    "train.schedule.step_size": AT_LEAST_1,
    "train.schedule.gamma": POSITIVE,
    "train.schedule.min_lr_ratio": UNIT_INTERVAL,
    "train.checkpoint.every_steps": AT_LEAST_0,   # 0: at epoch ends only
    "train.checkpoint.keep": AT_LEAST_1,
    "train.early_stopping.patience": AT_LEAST_1,
    "train.early_stopping.min_delta": AT_LEAST_0,
    "train.dist.nproc": Range(1, unit="rank"),
    "train.dist.bucket_mb": POSITIVE,
    "train.dist.timeout_s": AT_LEAST_1,
    "train.dist.port": Range(0, 65535, unit="port"),
    "train.dist.signal_check_s": AT_LEAST_0,      # 0: every step
    "train.logger.log_every": AT_LEAST_1,
    "train.logger.images_every": AT_LEAST_0,      # 0: no images
    "cluster.nodes": Range(1, unit="node"),
    "cluster.gpus_per_node": AT_LEAST_0,
    "cluster.tasks_per_node": AT_LEAST_0,         # 0: one per GPU
    "cluster.cpus_per_task": AT_LEAST_1,
    "cluster.mem_gb": AT_LEAST_0,                 # 0: the partition's default
    "cluster.timeout_min": AT_LEAST_1,
    "cluster.signal_delay_s": AT_LEAST_0,
    "cluster.max_requeues": AT_LEAST_0,
    "cluster.array_parallelism": AT_LEAST_1,
}


def check_ranges(cfg: Config) -> None:
    """Refuse the first value outside its RANGES entry, naming it, the range and the fix."""
    for key, rng in RANGES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            if not rng.holds(v):
                name = key if i is None else f"{key}[{i}]"
                raise ConfigError(f"{name}={v}: expected {rng.expected()}; {rng.fix(name)}")
    if len(cfg.train.profile_steps) != 2:
        raise ConfigError(f"train.profile_steps={cfg.train.profile_steps}: expected two numbers, "
                          f"[first step, count]; e.g. train.profile_steps=[10,3]")


# --------------------------------------------------------------------------- typing
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _params_class(cls: type, raw: dict[str, Any], key: str) -> type:
    """The dataclass that types `data.params` (chosen by data.source) or `model.params` (by
    model.name). The registries own their names and dataclasses and refuse an unknown name with
    the valid ones (pipeline.sources.params_class, models.config_class); this module only
    adds the key and types the fields. Imported here, when a config is built, so that `hpcforge
    --help` does not import every model and source."""
    if cls is DataConfig:
        from pipeline.sources import params_class
        selector = "source"
    else:
        from models import config_class as params_class
        selector = "name"
    try:
        return params_class(raw.get(selector, getattr(cls, selector)))
    except LookupError as e:
        raise ConfigError(f"{key}.{selector}: {e.args[0]}") from None


def build(cls: type, raw: Any, key: str) -> Any:
    """Build dataclass `cls` from `raw`, checking every key and type on the way."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{key or 'config'}: expected a mapping of {cls.__name__} fields, "
                          f"got {raw!r}")
    if cls is ModelSection:  # model files hold `name` plus the family's fields, flat
        raw = {"name": raw.get("name", ModelSection.name),
               "params": {k: v for k, v in raw.items() if k != "name"}}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _refuse_unknown_keys(raw, fields, key)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in raw:
            kwargs[name] = _field(cls, name, raw, hints[name], key)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"missing required value {sub} ({_type_name(hints[name])})")
    if cls in (DataConfig, ModelSection) and "params" not in kwargs:
        kwargs["params"] = build(_params_class(cls, raw, key), {}, f"{key}.params")
    built = cls(**kwargs)
    if cls is ModelSection:
        built.given = frozenset(raw["params"] or {})
    return built


def _refuse_unknown_keys(raw: dict[str, Any], fields: dict[str, Any], key: str) -> None:
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        bad = ", ".join(f"{key + '.' if key else ''}{u}" for u in unknown)
        raise ConfigError(f"unknown key {bad}; valid keys{' under ' + key if key else ''}: "
                          f"{', '.join(sorted(fields))}")


def _field(cls: type, name: str, raw: dict[str, Any], tp: Any, key: str) -> Any:
    """Field `name` of `cls` typed from `raw[name]`; `params` by the registry's dataclass."""
    sub = f"{key}.{name}" if key else name
    if name == "params" and cls in (DataConfig, ModelSection):
        # model fields are flat in YAML (model.latent_dim), data's are nested (data.params.L)
        where = key if cls is ModelSection else sub
        return build(_params_class(cls, raw, key), raw[name] or {}, where)
    return _coerce(raw[name], tp, sub)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp` (YAML's scalars, lists, mappings, nested dataclasses), else a
    ConfigError naming `key`, the expected type and the value."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _type_error(key, tp, value)
    if origin in (list, tuple, dict):
        return _coerce_container(value, tp, key)
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    """The first member of `X | Y | None` that takes `value`."""
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in (a for a in args if a is not type(None)):
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            continue
    raise _type_error(key, tp, value)


def _coerce_container(value: Any, tp: Any, key: str) -> Any:
    """A list, tuple or dict, each item typed and named by its index or key."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        raise _type_error(key, tp, value)
    inner = args[0] if args else Any
    items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    """int, float, str, bool: an int widens to float, YAML 1.1's `1e-3` (read as text) becomes a
    float, and a bool is never taken for a number."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise _type_error(key, tp, value) from None
    if tp in (int, float) and isinstance(value, bool):
        raise _type_error(key, tp, value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _type_error(key, tp, value)


def _type_error(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} "
                       f"({type(value).__name__}); fix the YAML or pass {key}=<value>")


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        if isinstance(obj, ModelSection):
            return {"name": obj.name, **_plain(obj.params)}
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
