"""`hpcforge train`: the data-parallel training loop, the same for every model family.

Per step, for each optimizer the model declares (in order, `schedule` times), the loop lets only that
network make gradients, sums `accumulate` batches of the phase's "loss", waits for the gradients to
be averaged over ranks, clips them, skips the step if they are not finite, and steps. Rank 0 logs
rank-averaged metrics and images and writes checkpoints; every rank computes, no other rank writes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models import MODELS
from models.base import Trainable, sampler
from pipeline.checkpoint import Checkpoints, check_compatible, link_atomic, load
from pipeline.config import Config
from pipeline.data.loader import ShardedLoader
from pipeline.data.store import normalization, open_store
from pipeline.dist import Dist, detect_launcher, init_distributed, only_grads_of
from pipeline.errors import UserError
from pipeline.launch import REQUEUE_EXIT_CODE  # 75 (EX_TEMPFAIL): "checkpointed, run me again"
from pipeline.provenance import git_revision, versions
from pipeline.optim import build_optimizer, build_scheduler, load_optimizer_state, rank_scale
from pipeline.redaction import redact
from pipeline.tracking import Tracker
from pipeline.watchdog import Heartbeat, NoHeartbeat



class Preempted(Exception):
    """Raised on every rank after a preemption signal, once rank 0's checkpoint is on disk."""

    def __init__(self, signum: int, checkpoint: str | None):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint {checkpoint}; "
                         f"rerun with train.resume=auto to continue")
        self.signum, self.checkpoint = signum, checkpoint


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps (or one, with train.nonfinite=fail)."""


def seed_for(seed: int, rank: int, epoch: int = 0) -> int:
    """The one place seeds come from: distinct per (seed, rank, epoch), stable across runs."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0])


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, in name order: equal digests, equal weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_model(cfg: Config) -> Trainable:
    _, build = MODELS[cfg.model.name]
    return build(cfg.model.params)


class PreemptionFlag:
    """SIGUSR1/SIGUSR2/SIGTERM/SIGINT set a flag; the loop acts on it at the next step boundary
    (the whole contract: pipeline.launch.relaunch). A second SIGINT interrupts at once, as
    Ctrl-C does elsewhere, for whoever does not want to wait for the checkpoint."""
    SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._set)
        return self

    def _set(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class Trainer:
    def __init__(self, cfg: Config, dist: Dist, heartbeat: Heartbeat | None = None):
        self.cfg, self.dist = cfg, dist
        self.heartbeat = heartbeat or NoHeartbeat()  # for the watchdog (pipeline.watchdog)
        self.heartbeat.beat("setup")
        t = cfg.train
        if t.precision == "fp16" and dist.device.type != "cuda":
            raise UserError("train.precision=fp16 needs a GPU (it trains with a gradient scaler); "
                            "use train.precision=bf16 on CPU")
        if t.accumulate < 1:
            raise UserError(f"train.accumulate={t.accumulate}: expected an integer >= 1")
        torch.manual_seed(seed_for(t.seed, dist.rank))
        torch.set_num_threads(t.threads or max(1, (os.cpu_count() or 1) // dist.local_size))
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        store = open_store(cfg.data.path)
        loader_args = dict(inputs=cfg.data.inputs, batch_size=t.batch_size, rank=dist.rank,
                           world=dist.size, seed=t.seed, normalize=cfg.data.normalize,
                           prefetch=t.prefetch)
        self.loader = ShardedLoader(store, "train", **loader_args)
        self.val_loader = (ShardedLoader(store, "val", **loader_args, read_ahead=False)  # epoch 0
                           if store.meta["splits"]["val"] >= dist.size * t.batch_size else None)
        self.store_meta = {k: store.meta[k] for k in ("source", "splits", "checksums", "shuffle")}
        # asked once per run (a git subprocess), not at every checkpoint
        self.provenance = {"versions": versions(), "code_version": git_revision()}
        x_var = cfg.data.inputs.get("x")
        self.store_stats = store.stats("train", x_var) if x_var in store.meta["stats"]["train"] else None
        self.model = dist.sync_batchnorm(build_model(cfg).to(dist.device))
        self.specs = self.model.optimizers()
        self._check_disjoint()
        # looked up once: walking the module tree every step costs more than the small models' math
        self._params = {s.name: list(s.module.parameters()) for s in self.specs}
        self._buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        self._saved_buffers = [b.clone() for b in self._buffers]
        # each optimizer's phase, `schedule` times, in the model's order (e.g. critic x5, generator)
        self._phases = [s.name for s in self.specs for _ in range(self.model.schedule[s.name])]
        self._flag: PreemptionFlag | None = None  # set by fit(); read when the ranks agree
        self.preempt = False
        # Ranks agree on a preemption signal at step `_agree_at` (a step count), then every ~
        # dist.signal_check_s: rank 0 proposes the interval in steps from its step time.
        self._agree_at, self._agree_mark = 0, (0, 0.0)
        scale = rank_scale(t.lr_scaling, dist.size)
        self.steps_per_epoch = len(self.loader) // t.accumulate
        total = t.max_steps or t.epochs * self.steps_per_epoch
        self.optimizers = {s.name: dist.optimizer(build_optimizer(s, t.optim, t.lr * scale),
                                                  s.module, prefix=s.name, accumulate=t.accumulate)
                           for s in self.specs}
        self.schedulers = {n: build_scheduler(o, t.schedule, total, scale)
                           for n, o in self.optimizers.items()}
        self.scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
        self.run_dir = Path(cfg.output_dir) / "train"
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", t.checkpoint.keep,
                                       t.checkpoint.best_metric, t.checkpoint.best_mode,
                                       background=t.checkpoint.background)
        self.step, self.epoch, self.nonfinite_total, self.nonfinite_run = 0, 0, 0, 0
        self.history: list[dict[str, float]] = []
        self.stop_best: float | None = None
        self.stop_bad = 0
        resumed = self._resume()
        if resumed is None:
            dist.broadcast(self.model, *self.optimizers.values())
        self.tracker = Tracker(t.logger, self.run_dir, {**cfg.to_dict(), "dataset": self.store_meta,
                                                         **self.provenance},
                               active=dist.is_main, run_id=resumed)
        self._announce()

    # ------------------------------------------------------------------ setup
    def _check_disjoint(self) -> None:
        seen: dict[int, str] = {}
        for spec in self.specs:
            for p in spec.module.parameters():
                if id(p) in seen:
                    raise UserError(f"model {self.cfg.model.name}: optimizers {seen[id(p)]!r} and "
                                    f"{spec.name!r} share parameters; each network must belong to "
                                    f"one optimizer for data-parallel training")
                seen[id(p)] = spec.name

    def _announce(self) -> None:
        """Rank/host/device map, printed once by rank 0 and kept in ranks.json."""
        me = {"rank": self.dist.rank, "local_rank": self.dist.local_rank, "pid": os.getpid(),
              # Slurm's node name tells fake nodes on one host apart (and matches squeue)
              "host": os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
              "device": str(self.dist.device)}
        ranks = self.dist.gather_object(me)
        if self.dist.is_main:
            print(f"[hpcforge] {self.dist.describe()}", flush=True)
            for r in ranks:
                print(f"[hpcforge]   rank {r['rank']} on {r['host']} (local {r['local_rank']}, "
                      f"pid {r['pid']}, {r['device']})", flush=True)
            (self.run_dir / "ranks.json").write_text(json.dumps(ranks, indent=1))

    def _resume(self) -> str | None:
        """Load the checkpoint `train.resume` asks for on every rank; return its W&B run id."""
        how = self.cfg.train.resume
        if how == "never":
            return None
        if how == "auto":
            found = self.checkpoints.latest_valid(log=self._print)
            if found is None:
                self._print(f"[hpcforge] resume=auto: no checkpoint in {self.checkpoints.folder}, "
                            f"starting fresh")
                return None
            path, ckpt = found
        else:
            path = Path(how)
            if not path.is_file():
                raise UserError(f"train.resume={how}: no such checkpoint file; use auto, never, "
                                f"or a path to a .pt file")
            ckpt = load(path)
        self.heartbeat.beat("setup")  # (loading a large checkpoint takes a while)
        check_compatible(ckpt, redact(self.cfg.to_dict()), path)  # as saved: redacted
        self.model.load_state_dict(ckpt["model"])
        for name, opt in self.optimizers.items():
            load_optimizer_state(opt, ckpt["optimizers"][name])
            self.schedulers[name].load_state_dict(ckpt["schedulers"][name])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.history = ckpt["step"], ckpt["history"]
        self.nonfinite_total, self.nonfinite_run = ckpt["nonfinite"]
        self.stop_best, self.stop_bad = ckpt["early_stop"]
        self.checkpoints.best_value = ckpt.get("best_value")
        if ckpt["ranks"] == self.dist.size:
            self.loader.load_state_dict(ckpt["loader"])
            torch.set_rng_state(ckpt["rng"][self.dist.rank])
            own = ckpt.get("rank_buffers") or [[]] * self.dist.size  # (older ones: the mean)
            for b, mine in zip(self._buffers, own[self.dist.rank]):
                b.copy_(mine)  # this rank's own statistics: it goes on as if never stopped
        else:  # another world size: the per-rank split of the epoch differs, restart that epoch
            self.loader.load_state_dict({"epoch": ckpt["loader"]["epoch"], "batch": 0})
            self._print(f"[hpcforge] checkpoint has {ckpt['ranks']} ranks, this run "
                        f"{self.dist.size}: restarting epoch {ckpt['loader']['epoch']}")
        self.epoch = self.loader.epoch
        self._print(f"[hpcforge] resumed from {path} at step {self.step}")
        return ckpt.get("wandb_run_id")

    def _print(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        p = self.cfg.train.precision
        if p == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(self.dist.device.type, dtype=dtype)

    def _gradients(self, name: str, batches: list[dict],
                   after_forward: Callable[[], None] | None = None) -> dict[str, float]:
        """One optimizer's gradients over `accumulate` batches, averaged over ranks and clipped;
        returns its named losses, gradient norm and lr, and "nonfinite" when the step must be
        skipped (decided on averaged gradients: every rank decides the same). `after_forward` runs
        between the last batch's forward and its backward."""
        opt, params = self.optimizers[name], self._params[name]
        sums: dict[str, float] = defaultdict(float)
        opt.zero_grad()
        # one network among several: freeze the others (a lone network needs no toggling)
        scope = only_grads_of(self.model, params) if len(self.specs) > 1 else nullcontext()
        with scope:
            for i, batch in enumerate(batches):
                with self._autocast():
                    losses = self.model.losses(batch, name)
                if after_forward is not None and i == len(batches) - 1:
                    after_forward()
                loss = losses["loss"].float()
                if len(batches) > 1:  # accumulation: the mean over the group's batches
                    loss = loss / len(batches)
                (self.scaler.scale(loss) if self.scaler else loss).backward()
                for k, v in losses.items():
                    sums[k] += v.item() / len(batches)
        self.dist.synchronize(opt)  # gradients now averaged over ranks: the same on every rank
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else None
        norm = float(total) if total is not None else 0.0
        if self.cfg.train.grad_clip and grads and math.isfinite(norm):  # (the norm, not again)
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.train.grad_clip, total)
        out = {f"{name}/{k}": v for k, v in sums.items()}
        out[f"opt/{name}/grad_norm"] = norm
        out[f"opt/{name}/lr"] = opt.param_groups[0]["lr"]
        if not math.isfinite(norm):
            out["nonfinite"] = 1.0
        return out

    def _apply(self, name: str, finite: bool) -> None:
        opt = self.optimizers[name]
        if not finite:
            opt.zero_grad()
            return
        self.dist.step(opt, self.scaler)
        self.schedulers[name].step()

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        """One step of every optimizer, in the model's order; sets `self.preempt` when any rank has
        seen a preemption signal (agreed every ~dist.signal_check_s, see `_begin_agreement`)."""
        if not self.model.training:  # walking the module tree costs ~0.2 ms: only after eval
            self.model.train()
        # A non-finite batch also poisons batch-norm running statistics: keep a copy to restore.
        buffers, saved = self._buffers, self._saved_buffers
        if buffers:
            torch._foreach_copy_(saved, buffers)  # one batched copy, into the same memory
        out: dict[str, float] = {}
        phases, bad, pending = self._phases, False, []
        # Agreeing during the last backward costs no sync point of its own: the collective
        # completes while the gradients are reduced (a blocking one after the step cost 2 ranks
        # ~10 % of their steps/s; one every step, even overlapped, ~3 %).
        agree = ((lambda: pending.append(self._begin_agreement()))
                 if self.step + 1 >= self._agree_at else None)
        for i, name in enumerate(phases):
            last = i == len(phases) - 1
            metrics = self._gradients(name, batches, agree if last else None)
            finite = metrics.pop("nonfinite", 0.0) == 0.0
            out.update(metrics)
            bad |= not finite
            if last and pending:
                self._end_agreement(pending[0]())
            if last and bad:  # this step's batch-norm updates are undone with it
                for b, old in zip(buffers, saved):
                    b.copy_(old)
            self._apply(name, finite)
        if self.scaler is not None:
            self.scaler.update()
        self.nonfinite_total += bad
        self.nonfinite_run = self.nonfinite_run + 1 if bad else 0
        t = self.cfg.train
        if bad and (t.nonfinite == "fail" or self.nonfinite_run >= t.max_nonfinite):
            raise NonFiniteError(f"{self.nonfinite_run} non-finite step(s) in a row at step "
                                 f"{self.step + 1} (train.nonfinite={t.nonfinite}, "
                                 f"train.max_nonfinite={t.max_nonfinite}); the last good checkpoint "
                                 f"is in {self.checkpoints.folder}. Lower train.lr or set "
                                 f"train.grad_clip")
        return out

    def _begin_agreement(self) -> Callable[[], list[float]]:
        """Start the sum over ranks of (signal seen, rank 0's proposed interval in steps)."""
        signalled = float(self._flag is not None and self._flag.signum is not None)
        every = 0.0  # other ranks add nothing to rank 0's proposal
        if self.dist.is_main:  # the steps that take about signal_check_s on rank 0's clock
            (step0, t0), now = self._agree_mark, time.perf_counter()
            self._agree_mark = (self.step, now)
            target, every = self.cfg.train.dist.signal_check_s, 1.0
            if target > 0 and t0 and self.step > step0:
                every = float(min(10_000, max(1, int(target * (self.step - step0) / (now - t0)))))
        return self.dist.begin_sum([signalled, every])

    def _end_agreement(self, sums: list[float]) -> None:
        signalled, every = sums
        self.preempt = signalled > 0
        self._agree_at = self.step + 1 + max(1, int(every))

    def _inject(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Fault injection (train.inject_nan_at): rank 0's first float input becomes NaN."""
        if self.step + 1 in self.cfg.train.inject_nan_at and self.dist.is_main:
            for k, v in batches[0].items():
                if v.is_floating_point():
                    batches[0][k] = torch.full_like(v, float("nan"))
                    break

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        with torch.no_grad(), torch.random.fork_rng(devices=[]), self._averaged_buffers():
            return self._validate()  # (fork_rng: training's RNG stays untouched)

    def _validate(self) -> dict[str, float]:
        self.model.eval()
        sums: dict[str, float] = defaultdict(float)
        phase = self.specs[0].name
        self.val_loader.set_epoch(0)
        n = 0
        for n, batch in enumerate(self.val_loader, 1):
            self.heartbeat.beat("validation")
            batch = {k: v.to(self.dist.device) for k, v in batch.items()}
            with self._autocast():
                for k, v in self.model.losses(batch, phase).items():
                    sums[k] += v.item()
        return self.dist.mean({f"val/{k}": v / max(n, 1) for k, v in sums.items()})

    def _early_stop(self, metrics: dict[str, float]) -> bool:
        es = self.cfg.train.early_stopping
        if not es.metric or es.metric not in metrics:
            return False
        value = metrics[es.metric]
        better = (self.stop_best is None or
                  (value < self.stop_best - es.min_delta if es.mode == "min"
                   else value > self.stop_best + es.min_delta))
        self.stop_best, self.stop_bad = (value, 0) if better else (self.stop_best, self.stop_bad + 1)
        return self.stop_bad >= es.patience

    # ------------------------------------------------------------------ loop
    def fit(self, flag: PreemptionFlag | None = None) -> dict[str, Any]:
        if flag is not None:
            return self._fit(flag)
        with PreemptionFlag() as flag:
            return self._fit(flag)

    def _fit(self, flag: PreemptionFlag) -> dict[str, Any]:
        self._flag = flag
        try:
            return self._train(flag)
        finally:  # whatever ends the run, the last checkpoint handed to the writer is on disk
            self.checkpoints.wait()

    def _train(self, flag: PreemptionFlag) -> dict[str, Any]:
        t, dist = self.cfg.train, self.dist
        window: dict[str, list[float]] = defaultdict(list)
        t_log, samples, wait0 = time.perf_counter(), 0, self.loader.wait_s
        stop, last = False, None
        while self.epoch < t.epochs and not stop:
            epoch = self.epoch
            if self.loader.epoch != epoch:
                self.loader.set_epoch(epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=self.loader.start_batch // t.accumulate,
                       desc=f"epoch {epoch + 1}/{t.epochs}", disable=not dist.is_main,
                       dynamic_ncols=True, mininterval=1.0)  # redrawn once a second at most
            self.model.reset_state()  # stateful RNNs start each epoch from a zero state
            group: list[dict[str, torch.Tensor]] = []
            epoch_losses: dict[str, list[float]] = defaultdict(list)
            for batch in self.loader:
                self.heartbeat.beat("training", self.step)
                group.append({k: v.to(dist.device, non_blocking=True) for k, v in batch.items()})
                if len(group) < t.accumulate:
                    continue
                self._inject(group)
                last, losses = group, self.train_step(group)
                group = []
                self.step += 1
                bar.update(1)
                samples += t.batch_size * t.accumulate * dist.size
                for k, v in losses.items():
                    window[k].append(v)
                    epoch_losses[k].append(v)
                if self.step % t.logger.log_every == 0:
                    self._log_window(window, time.perf_counter() - t_log, samples,
                                     self.loader.wait_s - wait0, bar)
                    t_log, samples, wait0 = time.perf_counter(), 0, self.loader.wait_s
                if t.logger.images_every and self.step % t.logger.images_every == 0:
                    self._log_images(last)
                if t.val_every and self.step % t.val_every == 0:
                    stop |= self._after_validation(self.validate())
                if t.checkpoint.every_steps and self.step % t.checkpoint.every_steps == 0:
                    self.save()
                if self.preempt:  # agreed by every rank at the end of train_step
                    self._preempted(flag)
                if stop or (t.max_steps and self.step >= t.max_steps):
                    stop = True
                    break
            bar.close()
            if not stop:
                self.epoch = epoch + 1
                means = dist.mean({f"train/{k}": float(np.mean(v)) for k, v in epoch_losses.items()
                                   if not k.startswith("opt/")})
                val = self.validate() if not t.val_every else {}
                stop |= self._after_validation({"epoch": float(epoch), **means, **val})
                self.save()
        every = t.logger.images_every
        if last is not None and not (every and self.step % every == 0):
            self._log_images(last)  # the final state, unless just logged
        return self._finish()

    def _after_validation(self, metrics: dict[str, float]) -> bool:
        metrics = {**metrics, "step": float(self.step)}
        self.history.append(metrics)
        self.tracker.log(metrics, self.step)
        return self._early_stop(metrics)

    def _log_window(self, window, elapsed: float, samples: int, wait: float, bar) -> None:
        t, dist = self.cfg.train, self.dist
        metrics = dist.mean({f"train/{k}" if "/" in k and not k.startswith("opt/") else k:
                             float(np.mean(v)) for k, v in window.items()})
        metrics.update({"perf/samples_per_s": samples / elapsed,
                        "perf/step_time_s": elapsed / t.logger.log_every,
                        "perf/data_wait_fraction": wait / elapsed,
                        "train/nonfinite_steps": float(self.nonfinite_total),
                        "dist/ranks": float(dist.size),
                        "dist/nodes": float(max(1, dist.size // dist.local_size)),
                        "epoch": float(self.epoch)})
        if dist.device.type == "cuda":
            metrics["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(dist.device) / 2 ** 30
        self.tracker.log(metrics, self.step)
        key = f"train/{self.specs[0].name}/loss"
        if key in metrics:
            bar.set_postfix(loss=f"{metrics[key]:.4g}")
        window.clear()

    def _log_images(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Rank 0: the model's figures, and for generative models physics plots of generated vs
        real samples with the 1-Wasserstein distance of each observable."""
        if not (self.dist.is_main and self.tracker.records_images):
            return
        self.heartbeat.beat("images")
        self.model.eval()
        with torch.random.fork_rng(devices=[]):  # figures must not shift training's RNG
            images: dict[str, Any] = dict(self.model.figures(batches[0]))
            physics_images, distances = self._physics(batches[0])
        self.tracker.images({**images, **physics_images}, self.step)
        if distances:
            self.tracker.log({f"physics/{k}": v for k, v in distances.items()}, self.step)

    def _physics(self, batch: dict[str, torch.Tensor]) -> tuple[dict, dict[str, float]]:
        from pipeline import figures, physics
        sample = sampler(self.model)
        source = self.cfg.data.source
        if sample is None or source not in physics.OBSERVABLES or "x" not in batch:
            return {}, {}
        generated = sample(batch["x"].shape[0], batch).float().cpu().numpy()
        stats = self.store_stats
        affine = normalization(stats, self.cfg.data.normalize) if stats else None
        return figures.physics_figures(source, {"x": batch["x"].float().cpu().numpy()}, generated,
                                       affine)

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "step": self.step, "epoch": self.epoch, "ranks": self.dist.size,
                "loader": self.loader.state_dict(), "history": self.history,
                "nonfinite": [self.nonfinite_total, self.nonfinite_run],
                "early_stop": [self.stop_best, self.stop_bad],
                "best_value": self.checkpoints.best_value,
                "model_name": self.cfg.model.name, "config": redact(self.cfg.to_dict()),
                "dataset": self.store_meta, "wandb_run_id": self.tracker.run_id,
                **self.provenance}

    def save(self) -> str | None:
        """Checkpoint on rank 0; never non-finite weights. The model holds the ranks' mean
        batch-norm statistics; each rank's own, and its RNG state, are kept for an exact resume."""
        self.heartbeat.beat("checkpoint", self.step)
        with self._averaged_buffers() as own:
            rng, buffers = zip(*self.dist.gather_object((torch.get_rng_state(), own)))
            path = None
            if self.dist.is_main:
                if not _finite(self.model.state_dict().values()):
                    self._print(f"[hpcforge] step {self.step}: weights are not finite, checkpoint "
                                f"skipped; the last good one stays in {self.checkpoints.folder}")
                else:
                    state = {**self._state(), "rng": list(rng), "rank_buffers": list(buffers)}
                    metrics = self.history[-1] if self.history else {}
                    path = str(self.checkpoints.save(state, self.step, metrics))
        return self.dist.broadcast_object(path)

    @contextmanager
    def _averaged_buffers(self) -> Iterator[list[torch.Tensor]]:
        """The ranks' mean batch-norm statistics in the model for the block (validation, a
        checkpoint); yields this rank's own (on the CPU), which it gets back afterwards. Training
        goes on from each rank's own, whether or not a checkpoint was written: that is what keeps
        resume exact. (Their updates are linear, so the mean at any step equals what averaging
        after every step would give, without a collective per step.)"""
        own = [b.detach().to("cpu", copy=True) for b in self._buffers]
        self.dist.average_buffers(self.model)
        try:
            yield own
        finally:
            for b, mine in zip(self._buffers, own):
                b.copy_(mine)

    def _preempted(self, flag: PreemptionFlag) -> None:
        path = self.save()
        self.checkpoints.wait()  # on disk before anyone hears "requeue me"
        signum = flag.signum or signal.SIGUSR1
        self._print(f"[hpcforge] {signal.Signals(signum).name}: checkpointed step {self.step} to "
                    f"{path}; exit {REQUEUE_EXIT_CODE} (requeue me)")
        self.tracker.finish({"preempted_at_step": self.step}, exit_code=REQUEUE_EXIT_CODE)
        self.dist.barrier()  # rank 0's files are complete before any rank exits
        self.heartbeat.beat("preempted")  # the launcher's cue for 75 (pipeline.launch.relaunch)
        raise Preempted(signum, path)

    def _finish(self) -> dict[str, Any]:
        final = self.save()
        self.dist.average_buffers(self.model)  # training is over: every rank ends with the mean
        digests = self.dist.gather_object(weights_digest(self.model))
        summary: dict[str, Any] = {"steps": self.step, "ranks": self.dist.size,
                                   "launcher": self.dist.place.launcher,
                                   "nonfinite_steps": self.nonfinite_total,
                                   "weights_sha256_per_rank": digests, "history": self.history}
        self.checkpoints.wait()
        if self.dist.is_main:
            ckpt = self.checkpoints.folder / "final.pt"
            if final:
                link_atomic(Path(final), ckpt)
            summary.update(checkpoint=str(ckpt), metrics=str(self.tracker.metrics_path),
                           wandb_run=self.tracker.run_path)
            self.tracker.finish(dict(self.history[-1]) if self.history else {})
            self.tracker.write_json(self.run_dir / "summary.json", summary)
        self.dist.barrier()
        self.heartbeat.beat("done")
        return summary


def train(cfg: Config) -> dict[str, Any]:
    """Train on every rank the launcher started; the summary's paths are filled on rank 0."""
    heartbeat = Heartbeat.from_env(detect_launcher().rank)
    with PreemptionFlag() as flag:  # from the start: a signal during set-up is not lost either
        heartbeat.beat("wait:start-up")  # the backend's rendezvous waits for every rank
        dist = init_distributed(cfg.train.dist)
        heartbeat.watch_collectives(dist)
        try:
            return Trainer(cfg, dist, heartbeat).fit(flag)
        except UserError as e:
            if dist.size > 1:  # (damaged data, a full disk) on one rank: its line, then leave
                _exit_without_finalize(f"hpcforge: error: {e}", status=2)
            raise
        except Exception:
            if heartbeat.failed and dist.size > 1:
                _exit_without_finalize()
            raise


def _exit_without_finalize(line: str = "", status: int = 1) -> None:
    """A collective failed (gloo timed out, a peer died or stopped), or this rank met a fault the
    user must fix while its peers wait in a collective: print why and leave now. A normal exit
    would call MPI_Finalize (Horovod's MPI, or mpi4py's for ddp's rendezvous), which waits for the
    failed peer for ever, or aborts with status 1 where the user's fix needs status 2; mpirun ends
    the other ranks when this one exits non-zero."""
    import sys
    import traceback
    if line:
        print(line, file=sys.stderr)
    else:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
