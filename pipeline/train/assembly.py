"""`build(cfg, dist) -> Run`: everything a training run is made of, assembled once.

The loop (pipeline.train.loop) only reads and steps these parts; all set-up lives here, in the order
it must happen: seeds and threads, the store and its loaders, the model and one optimizer phase per
network, checkpoints (and resume from one, pipeline.train.state), the tracker, the preemption vote,
the image hooks. What a run is (`Run`, `Phase`, `Progress`) lives in pipeline.train.run, below this
module and pipeline.train.state.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from models import build as build_family
from models.base import Batch, Trainable
from models.objectives import Supervised
from pipeline.config import Config, TrainConfig
from pipeline.core.checkpoint import Checkpoints
from pipeline.core.errors import UserError
from pipeline.core.provenance import git_revision, versions
from pipeline.data.loader import ShardedLoader
from pipeline.data.store import Store, normalization, open_store
from pipeline.runtime.dist import Dist, node_name
from pipeline.runtime.preemption import Preemption, PreemptionFlag
from pipeline.runtime.tracking import Tracker
from pipeline.runtime.watchdog import Heartbeat, NoHeartbeat
from pipeline.train.ema import build as build_ema
from pipeline.train.image_hooks import ImageHook, image_hooks
from pipeline.train.optim import build_optimizer, build_scheduler, rank_scale
from pipeline.train.run import BufferGuard, Phase, Run, seed_for
from pipeline.train.shapes import fill_from_store
from pipeline.train.transfer import freeze, init_from, lr_groups


def build_model(cfg: Config) -> Trainable:
    return build_family(cfg.model.name, cfg.model.params)


def build(cfg: Config, dist: Dist, heartbeat: Heartbeat | None = None,
          flag: PreemptionFlag | None = None) -> Run:
    """Assemble a run on this rank, resumed as train.resume asks. `flag` catches preemption signals
    from before the build (pipeline.train.trainer.train); without one, fit() installs its own."""
    heartbeat = heartbeat or NoHeartbeat()  # for the watchdog (pipeline.runtime.watchdog)
    heartbeat.beat("setup")
    _check_train_config(cfg.train, dist)
    _seed_and_threads(cfg.train, dist)
    store = open_store(cfg.data.path)
    # shape keys left unset (pipeline.train.trainer said which, on rank 0)
    fill_from_store(cfg, store)
    loader, val_loader = _loader(cfg, dist, store, "train"), _val_loader(cfg, dist, store)
    model = dist.sync_batchnorm(build_model(cfg).to(dist.device))
    _check_adversarial(cfg, model)
    freeze(model, cfg.train.freeze)  # before the optimizers: frozen parameters stay out of them
    run = Run(cfg=cfg, dist=dist, heartbeat=heartbeat, model=model,
              compiled_losses=compiled_losses(model, cfg.train.compile), phases=[], loader=loader,
              val_loader=val_loader, checkpoints=_checkpoints(cfg), hooks=_hooks(cfg, model, store),
              preemption=Preemption(flag or PreemptionFlag(), dist.begin_sum, dist.is_main,
                                    cfg.train.dist.signal_check_s),
              store_meta=store.meta.provenance(),
              provenance={"versions": versions(), "code_version": git_revision()},
              buffer_guard=BufferGuard(model),
              scaler=torch.amp.GradScaler("cuda") if cfg.train.precision == "fp16" else None)
    run.draws = max(model.schedule.values())
    _check_draws_fit_the_split(cfg, run.draws, len(loader))
    run.phases = build_phases(model, cfg, dist, run.steps_per_epoch)
    run.ema = build_ema(model, cfg.train.ema.decay, cfg.train.ema.start)
    resumed_run_id = _start(run)
    run.tracker = Tracker(cfg.train.logger, run.run_dir,
                          {**cfg.to_dict(), "dataset": run.store_meta, **run.provenance},
                          active=dist.is_main, run_id=resumed_run_id)
    # the rows of the steps a resume discards go; a fresh start (resume=auto with no checkpoint
    # that reads) drops the rows a failed first attempt left: one record, one row per step
    run.tracker.drop_after(run.progress.step)
    if run.transfer is not None:
        run.tracker.log(run.transfer.counts(), 0)
    announce_ranks(dist, run.run_dir)
    return run


def _start(run: Run) -> str | None:
    """Resume as train.resume asks (a resumed fine-tune goes on from its own checkpoint); else
    load train.init_from's weights, if set, and give every rank rank 0's weights. Returns the
    resumed W&B run id."""
    from pipeline.train.state import resume
    resumed_run_id = resume(run)
    if run.resumed_from is None:
        if run.cfg.train.init_from:
            run.transfer = init_from(run.model, run.cfg.train.init_from, run.cfg.model.name)
            run.print(run.transfer.describe(run.cfg.train.init_from))
        run.dist.broadcast(run.model, *(p.optimizer for p in run.phases))
        if run.ema is not None:  # from the broadcast weights: the same average on every rank
            run.ema.reset()
    return resumed_run_id


CLASS_COUNT_KEYS = ("out_features", "n_outputs", "n_classes", "out_channels")  # models/ spell it so


def check_class_count(cfg: Config, classes: dict[str, int] | None) -> None:
    """A classifier's output count against the store's class table (data.params.label_from),
    before any rank starts: 10 outputs on a 3-class store trained without a word (issue 24)."""
    params, y = cfg.model.params, cfg.data.inputs.get("y")
    if not classes or y != "label" or getattr(params, "loss", None) not in ("ce", "hinge"):
        return
    key = next((k for k in CLASS_COUNT_KEYS if hasattr(params, k)), None)
    if key is not None and getattr(params, key) != len(classes):
        names = ", ".join(sorted(classes, key=classes.get))
        raise UserError(f"model.{key}={getattr(params, key)}, but the store at data.path="
                        f"{cfg.data.path} holds {len(classes)} classes in data.inputs.y=label "
                        f"({names}); set model.{key}={len(classes)}")


def _check_adversarial(cfg: Config, model: Trainable) -> None:
    """Adversarial examples raise a supervised loss; a generative model's has no label to flip."""
    if cfg.train.adversarial.eps > 0 and not isinstance(model, Supervised):
        raise UserError(f"train.adversarial.eps={cfg.train.adversarial.eps}: adversarial training "
                        f"needs a supervised model (x -> prediction, e.g. cnn, resnet, mlp), but "
                        f"{cfg.model.name} is generative; set train.adversarial.eps=0")


def _check_train_config(train_cfg: TrainConfig, dist: Dist) -> None:
    if train_cfg.precision == "fp16" and dist.device.type != "cuda":
        raise UserError("train.precision=fp16 needs a GPU (it trains with a gradient scaler); "
                        "use train.precision=bf16 on CPU")
    if train_cfg.accumulate < 1:
        raise UserError(f"train.accumulate={train_cfg.accumulate}: expected an integer >= 1")


def _seed_and_threads(train_cfg: TrainConfig, dist: Dist) -> None:
    torch.manual_seed(seed_for(train_cfg.seed, dist.rank))
    torch.set_num_threads(train_cfg.threads or max(1, (os.cpu_count() or 1) // dist.local_size))
    if train_cfg.deterministic:
        torch.use_deterministic_algorithms(True)


def _loader(cfg: Config, dist: Dist, store: Store, split: str, **extra: Any) -> ShardedLoader:
    return ShardedLoader(store, split, inputs=cfg.data.inputs, batch_size=cfg.train.batch_size,
                         rank=dist.rank, world_size=dist.world_size, seed=cfg.train.seed,
                         normalize=cfg.data.normalize, prefetch=cfg.train.prefetch, **extra)


def _val_loader(cfg: Config, dist: Dist, store: Store) -> ShardedLoader | None:
    """Validation reads epoch 0 every time; none when the split cannot fill one batch per rank,
    said on rank 0 (issue 24: it went without a word, and with it val/loss and best.pt)."""
    n, need = store.meta.splits["val"], dist.world_size * cfg.train.batch_size
    if n < need:
        if n and dist.is_main:
            print(f"[hpcforge] no validation: the val split's {n} samples fill no batch of "
                  f"{cfg.train.batch_size} on each of {dist.world_size} ranks (no val/ metrics, no "
                  f"best.pt); lower train.batch_size to {max(1, n // dist.world_size)} or raise "
                  f"data.val_fraction and prepare again", flush=True)
        return None
    return _loader(cfg, dist, store, "val", read_ahead=False)


def _checkpoints(cfg: Config) -> Checkpoints:
    ck = cfg.train.checkpoint
    return Checkpoints(Path(cfg.output_dir) / "train" / "checkpoints", ck.keep, ck.best_metric,
                       ck.best_mode, background=ck.background)


def _hooks(cfg: Config, model: Trainable, store: Store) -> list[ImageHook]:
    x_var = cfg.data.inputs.get("x")
    single = isinstance(x_var, str) and x_var in store.meta.stats["train"]  # (not a joined input)
    stats = store.stats("train", x_var) if single else None
    affine = normalization(stats, cfg.data.normalize) if stats else None
    return image_hooks(model, cfg.data.source, "x" in cfg.data.inputs, affine)


def compiled_losses(model: Trainable, compile: bool) -> Any:
    """`model.losses`, through torch.compile with train.compile=true. The method is compiled, not
    the module: the module stays the raw one, so checkpoints keep its state_dict's own keys.
    Inductor compiles at the first call; a machine where it cannot (no C++ compiler, say) gets
    one line naming the cause and the fix instead of a compiler traceback."""
    if not compile:
        return None
    compiled = torch.compile(model.losses)

    def losses(batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        try:
            return compiled(batch, phase)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            cause = (str(e).strip().splitlines() or ["unknown"])[0]
            raise UserError(f"train.compile=true: torch.compile could not compile "
                            f"{type(model).__name__}.losses here ({cause}); set "
                            f"train.compile=false") from None
    return losses


def build_phases(model: Trainable, cfg: Config, dist: Dist, steps_per_epoch: int) -> list[Phase]:
    """One phase per optimizer `model` declares, in its order; each network in exactly one. The
    lr schedules span train.max_steps, or train.epochs of `steps_per_epoch`."""
    train_cfg = cfg.train
    specs = model.optimizers()
    _check_disjoint(cfg.model.name, specs)
    scale = rank_scale(train_cfg.lr_scaling, dist.world_size)
    total = train_cfg.max_steps or train_cfg.epochs * steps_per_epoch
    phases = []
    for spec in specs:
        params = _trainable(spec, train_cfg.freeze, cfg.model.name)
        opt = dist.optimizer(build_optimizer(spec, train_cfg.optim, train_cfg.lr * scale,
                                             lr_groups(model, params, train_cfg.optim.groups)),
                             spec.module, prefix=spec.name, accumulate=train_cfg.accumulate)
        # parameters looked up once: walking the module tree every step costs more than the
        # small models' math
        repeats = model.schedule[spec.name]  # its scheduler counts updates: `repeats` a step
        phases.append(Phase(spec.name, params, opt,
                            build_scheduler(opt, train_cfg.schedule, total * repeats, scale),
                            repeats))
    return phases


def _trainable(spec: Any, freeze: list[str], model_name: str) -> list[torch.nn.Parameter]:
    """`spec`'s parameters that train.freeze (`freeze`) left trainable; refused if none are."""
    params = [p for p in spec.module.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"train.freeze={freeze} freezes every parameter of "
                        f"{model_name}'s {spec.name!r} network, which would train nothing; "
                        f"freeze fewer prefixes")
    return params


def _check_draws_fit_the_split(cfg: Config, draws: int, batches: int) -> None:
    """The CLI refuses a store too small for `accumulate` batches; a model whose phase repeats
    (WGAN-GP's n_critic) draws a batch group per repetition (`draws` a step), which only the
    model knows. `batches`: each rank's batches in the train split."""
    train_cfg = cfg.train
    if batches < train_cfg.accumulate * draws:  # (Run.steps_per_epoch would be 0)
        raise UserError(f"model {cfg.model.name} draws {train_cfg.accumulate * draws} batches of "
                        f"{train_cfg.batch_size} per step ({draws} updates x train.accumulate="
                        f"{train_cfg.accumulate}), but each rank's train split gives "
                        f"{batches}; lower train.batch_size, or prepare more samples "
                        f"(data.n_samples)")


def _check_disjoint(model_name: str, specs: list) -> None:
    seen: dict[int, str] = {}
    for spec in specs:
        for p in spec.module.parameters():
            if id(p) in seen:
                raise UserError(f"model {model_name}: optimizers {seen[id(p)]!r} and "
                                f"{spec.name!r} share parameters; each network must belong to "
                                f"one optimizer for data-parallel training")
            seen[id(p)] = spec.name


def announce_ranks(dist: Dist, run_dir: Path) -> None:
    """Rank/host/device map, printed once by rank 0 and kept in `run_dir`/ranks.json."""
    me = {"rank": dist.rank, "local_rank": dist.local_rank, "pid": os.getpid(),
          "host": node_name(),  # Slurm's name tells fake nodes on one host apart (as squeue)
          "device": str(dist.device)}
    ranks = dist.gather_object(me)
    if dist.is_main:  # (rank 0 owns the terminal)
        print(f"[hpcforge] {dist.describe()}", flush=True)
        for r in ranks:
            print(f"[hpcforge]   rank {r['rank']} on {r['host']} (local {r['local_rank']}, "
                  f"pid {r['pid']}, {r['device']})", flush=True)
        (run_dir / "ranks.json").write_text(json.dumps(ranks, indent=1))
