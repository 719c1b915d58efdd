"""`hpcforge train`: the data-parallel training loop, the same for every model family.

Per step, for each optimizer the model declares (in order, `schedule` times), the loop freezes the
other networks, asks the model for that phase's named losses, backpropagates "loss" and steps; the
DistributedOptimizer averages gradients over ranks. Rank 0 logs rank-averaged metrics, images and
the checkpoint; every rank computes, no rank but 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from models import MODELS
from models.base import Trainable
from pipeline.checkpoint import save_atomic
from pipeline.config import Config
from pipeline.data.loader import ShardedLoader
from pipeline.data.store import open_store
from pipeline.dist import Dist, init_distributed
from pipeline.tracking import Tracker


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


class Trainer:
    def __init__(self, cfg: Config, dist: Dist):
        self.cfg, self.dist = cfg, dist
        t = cfg.train
        torch.manual_seed(seed_for(t.seed, dist.rank))
        torch.set_num_threads(t.threads or max(1, (os.cpu_count() or 1) // dist.local_size))
        store = open_store(cfg.data.path)
        loader_args = dict(inputs=cfg.data.inputs, batch_size=t.batch_size, rank=dist.rank,
                           world=dist.size, seed=t.seed, normalize=cfg.data.normalize,
                           prefetch=t.prefetch)
        self.loader = ShardedLoader(store, "train", **loader_args)
        self.val_loader = (ShardedLoader(store, "val", **loader_args)
                           if store.meta["splits"]["val"] >= dist.size * t.batch_size else None)
        self.store_meta = {k: store.meta[k] for k in ("source", "splits", "checksums", "shuffle")}
        self.model = build_model(cfg).to(dist.device)
        self.specs = self.model.optimizers()
        self.optimizers = {
            s.name: dist.optimizer(torch.optim.Adam(s.module.parameters(), lr=t.lr * s.lr_scale,
                                                    betas=s.betas), s.module, prefix=s.name)
            for s in self.specs}
        dist.broadcast(self.model, *self.optimizers.values())
        self.run_dir = Path(cfg.output_dir) / "train"
        self.tracker = Tracker(t.logger, self.run_dir, cfg.to_dict(), active=dist.is_main)
        self.step = 0

    def _phase(self, name: str, module: torch.nn.Module, batch: dict[str, torch.Tensor]):
        """One optimizer's update; other networks are frozen so only its gradients are made."""
        trainable = {id(p) for p in module.parameters()}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trainable)
        opt = self.optimizers[name]
        opt.zero_grad()  # Horovod's wrapper takes no set_to_none
        losses = self.model.losses(batch, name)
        losses["loss"].backward()
        opt.step()
        return {f"{name}/{k}": v.item() for k, v in losses.items()}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        out: dict[str, float] = {}
        for spec in self.specs:
            for _ in range(self.model.schedule[spec.name]):
                out.update(self._phase(spec.name, spec.module, batch))
        return out

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        self.model.eval()
        sums: dict[str, float] = defaultdict(float)
        phase = self.specs[0].name
        for n, batch in enumerate(self.val_loader, 1):
            batch = {k: v.to(self.dist.device) for k, v in batch.items()}
            for k, v in self.model.losses(batch, phase).items():
                sums[k] += v.item()
        return self.dist.mean({f"val/{k}": v / n for k, v in sums.items()})

    def fit(self) -> dict[str, Any]:
        t, dist = self.cfg.train, self.dist
        history: list[dict[str, float]] = []
        window: dict[str, list[float]] = defaultdict(list)
        t_log, samples_since, wait_since = time.perf_counter(), 0, self.loader.wait_s
        done = False
        last_batch = None
        for epoch in range(t.epochs):
            self.loader.set_epoch(epoch)
            bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not dist.is_main,
                       leave=True, dynamic_ncols=True)
            epoch_losses: dict[str, list[float]] = defaultdict(list)
            for batch in bar:
                batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
                last_batch = batch
                losses = self.train_step(batch)
                self.step += 1
                samples_since += t.batch_size * dist.size
                for k, v in losses.items():
                    window[k].append(v)
                    epoch_losses[k].append(v)
                if self.step % t.logger.log_every == 0:
                    elapsed = time.perf_counter() - t_log
                    metrics = dist.mean({f"train/{k}": float(np.mean(v)) for k, v in window.items()})
                    metrics.update({"perf/samples_per_s": samples_since / elapsed,
                                    "perf/step_time_s": elapsed / t.logger.log_every,
                                    "perf/data_wait_fraction": (self.loader.wait_s - wait_since) / elapsed,
                                    "epoch": epoch, "ranks": dist.size})
                    self.tracker.log(metrics, self.step)
                    bar.set_postfix(loss=f"{metrics[f'train/{self.specs[0].name}/loss']:.3f}")
                    window.clear()
                    t_log, samples_since, wait_since = time.perf_counter(), 0, self.loader.wait_s
                if t.logger.images_every and self.step % t.logger.images_every == 0:
                    self._log_images(batch)
                if t.max_steps and self.step >= t.max_steps:
                    done = True
                    break
            self.dist.average_buffers(self.model)
            record = {"epoch": epoch, **dist.mean({f"train/{k}": float(np.mean(v))
                                                   for k, v in epoch_losses.items()}),
                      **self.validate()}
            history.append(record)
            self.tracker.log(record, self.step)
            if done:
                break
        every = self.cfg.train.logger.images_every
        if last_batch is not None and not (every and self.step % every == 0):
            self._log_images(last_batch)  # the final state, unless just logged
        return self._finish(history)

    def _log_images(self, batch: dict[str, torch.Tensor]) -> None:
        if self.dist.is_main:
            self.model.eval()
            self.tracker.images(self.model.figures(batch), self.step)

    def _finish(self, history: list[dict[str, float]]) -> dict[str, Any]:
        digests = self.dist.gather_object(weights_digest(self.model))
        summary: dict[str, Any] = {"steps": self.step, "ranks": self.dist.size,
                                   "launcher": self.dist.place.launcher,
                                   "weights_sha256_per_rank": digests, "history": history}
        if self.dist.is_main:
            ckpt = save_atomic(self._state(), self.run_dir / "checkpoints" / "final.pt")
            summary.update(checkpoint=str(ckpt), metrics=str(self.tracker.metrics_path),
                           wandb_run=self.tracker.run_path)
            self.tracker.finish({k: v for k, v in history[-1].items()} if history else {})
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.dist.barrier()
        return summary

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(),
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "step": self.step, "model_name": self.cfg.model.name,
                "config": self.cfg.to_dict(), "dataset": self.store_meta,
                "loader": self.loader.state_dict(), "wandb_run_id": self.tracker.run_id,
                "torch_rng": torch.get_rng_state(),
                "versions": versions()}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("hpcforge", "torch", "horovod", "zarr", "dask", "wandb"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def train(cfg: Config) -> dict[str, Any]:
    dist = init_distributed(cfg.train.dist)
    if dist.is_main:
        print(f"[hpcforge] {dist.describe()}", flush=True)
    return Trainer(cfg, dist).fit()
