"""The data-parallel training loop, the same for every model family (nanoGPT's train.py shape).

Per step: fetch a group of `accumulate` batches; for each phase the model declares (in order,
`repeats` times) let only that network make gradients, average them over ranks, clip them, skip
the update if they are not finite, and step; then the step's end: log, draw, validate,
checkpoint, and stop if the ranks voted to (pipeline.runtime.preemption). Rank 0 logs and writes
checkpoints; every rank computes. The parts come from pipeline.train.assembly.build.

Between log steps nothing is read back to the host (issue 28): losses and norms stay on the device
(pipeline.train.log_window), and so does the non-finite check (pipeline.train.nonfinite).
"""
from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm import tqdm

from models.base import Batch
from pipeline.core.checkpoint import link_atomic
from pipeline.runtime.dist import Dist, only_grads_of
from pipeline.runtime.preemption import REQUEUE_EXIT_CODE, Preempted
from pipeline.train import nonfinite
from pipeline.train.ema import EMA
from pipeline.train.ema import digest as ema_digest
from pipeline.train.image_hooks import Drawing
from pipeline.train.log_window import Window, metric_name, progress_bar
from pipeline.train.optim import fused
from pipeline.train.profile import step_timer
from pipeline.train.run import Phase, Run, autocast, weights_digest
from pipeline.train.state import save
from pipeline.train.validation import after_validation, validate

Metrics = dict[str, "torch.Tensor | float"]  # 0-d tensors on the device; the lr a float


class Gradients(NamedTuple):
    """One phase's averaged, clipped gradients are in its parameters' .grad; this is what the
    step learned about them: the named losses (at log steps the norm and lr too) to log, and
    whether they are finite (decided on averaged gradients: every rank decides the same)."""
    metrics: Metrics
    bad: torch.Tensor  # 0-d float32: 0.0 if finite, 1.0 if not (fused optimizers' `found_inf`)


# ---------------------------------------------------------------------------- the run
def fit(run: Run) -> dict[str, Any]:
    """Train until the epochs, train.max_steps or early stopping end it; return the summary."""
    flag, cfg = run.preemption.flag, run.cfg.train
    run.timer = step_timer(cfg.profile, run.dist.device, run.run_dir / "profile", run.dist.rank,
                           cfg.profile_steps)
    with nullcontext() if flag.catching else flag:
        try:
            return _train(run)
        finally:  # whatever ends the run, the last checkpoint handed to the writer is on disk
            run.timer.close()
            run.checkpoints.wait()


def _train(run: Run) -> dict[str, Any]:
    train_cfg, dist, last, stop = run.cfg.train, run.dist, None, False
    window = Window(run.loader, dist, run.timer,
                    train_cfg.batch_size * run.batches_per_step * dist.world_size,
                    train_cfg.logger.log_every)
    drawing = Drawing(run.hooks, run.model, run.ema, run.tracker, run.heartbeat)
    while run.progress.epoch < train_cfg.epochs and not stop:
        stop, last = _epoch(run, window, drawing, last)
    every = train_cfg.logger.images_every
    if last is not None and not (every and run.progress.step % every == 0):
        drawing.log(last[0], run.progress.step)  # the final state, unless just logged
    return finish(run)


def _epoch(run: Run, window: Window, drawing: Drawing,
           last: list[Batch] | None) -> tuple[bool, list[Batch] | None]:
    train_cfg, progress = run.cfg.train, run.progress
    epoch = progress.epoch
    if run.loader.epoch != epoch:
        run.loader.set_epoch(epoch)
    run.model.reset_state()  # stateful RNNs start each epoch from a zero state
    with progress_bar(run.loader, run.batches_per_step, epoch, train_cfg.epochs,
                       run.dist.is_main) as bar:  # closed on an error too: its line ends first
        for group in batch_groups(run):
            nonfinite.inject_nan(group, progress.step + 1, train_cfg.inject_nan_at,
                                 run.dist.is_main)
            losses, last = train_step(run, group), group
            progress.step += 1
            with run.timer.part("logging"):
                bar.update(1)
                window.add(losses)  # (the epoch's losses too: on the device, read at its end)
                stop = _step_end(run, window, drawing, group, bar)
            run.timer.step_done()
            if stop or (train_cfg.max_steps and progress.step >= train_cfg.max_steps):
                return True, last
    return _epoch_end(run, epoch, window), last


def batch_groups(run: Run) -> Iterator[list[Batch]]:
    """The loader's batches on the device, one step's worth (`batches_per_step`) at a time."""
    group: list[Batch] = []
    batches, timer, device, per_step = iter(run.loader), run.timer, run.dist.device, \
        run.batches_per_step  # (read once: a property of the Run, not a field)
    on_cpu = device.type == "cpu"  # the loader's batches are there already: no .to() per tensor
    while True:
        with timer.part("data"):  # (the loader's wait, and the copy to the device)
            batch = next(batches, None)
            if batch is None:
                return
            run.heartbeat.beat("training", run.progress.step)
            group.append(batch if on_cpu else
                         {k: v.to(device, non_blocking=True) for k, v in batch.items()})
        if len(group) == per_step:
            yield group
            group = []


def _step_end(run: Run, window: Window, drawing: Drawing, group: list[Batch], bar: tqdm) -> bool:
    """Log, draw, validate and checkpoint as configured; act on an agreed preemption. Returns
    whether early stopping says stop."""
    train_cfg, progress, stop = run.cfg.train, run.progress, False
    step = progress.step
    if step % train_cfg.logger.log_every == 0:
        run.nonfinite.settle(progress)
        window.log(progress, run.tracker, bar, f"train/{run.phases[0].name}/loss")
    if train_cfg.logger.images_every and step % train_cfg.logger.images_every == 0:
        drawing.log(group[0], step)
    if train_cfg.val_every and step % train_cfg.val_every == 0:
        stop = after_validation(_validate(run), progress, run.tracker, train_cfg.early_stopping)
    if train_cfg.checkpoint.every_steps and step % train_cfg.checkpoint.every_steps == 0:
        run.nonfinite.settle(progress)
        save(run)
    if run.preemption.agreed:  # by every rank, at the end of train_step
        preempted(run)
    return stop


def _epoch_end(run: Run, epoch: int, window: Window) -> bool:
    train_cfg, progress = run.cfg.train, run.progress
    progress.epoch = epoch + 1
    run.nonfinite.settle(progress)
    means = run.dist.mean({f"train/{k}": v for k, v in window.epoch_means().items()})
    val = _validate(run) if not train_cfg.val_every else {}
    stop = after_validation({"epoch": float(epoch), **means, **val}, progress, run.tracker,
                            train_cfg.early_stopping)
    save(run)
    return stop


def _validate(run: Run) -> dict[str, float]:
    """The first phase's losses on the validation split (pipeline.train.validation)."""
    return validate(run.val_loader, run.model, partial(run.losses, phase=run.phases[0].name),
                    run.dist, run.cfg.train.precision, run.heartbeat)


# ---------------------------------------------------------------------------- one step
def train_step(run: Run, batches: list[Batch]) -> Metrics:
    """One step of every phase, in the model's order; repetition r of a phase trains on the r-th
    `accumulate` batches of `batches`. A phase whose gradients are not finite is skipped, and the
    step's batch-norm updates are undone with it, on the device; the step's flag joins
    `run.nonfinite` until it settles. When a vote is due, the ranks vote on preemption while the
    last phase computes its gradients (a collective of its own after the step cost 2 ranks ~10 %
    of their steps/s); `run.preemption.agreed` has the result."""
    if not run.model.training:  # walking the module tree costs ~0.2 ms: only after eval
        run.model.train()
    run.buffer_guard.save()
    metrics: Metrics = {}
    order, step, all_bad, vote, acc = run.phase_order, run.progress.step, None, None, \
        run.cfg.train.accumulate
    logging = (step + 1) % run.cfg.train.logger.log_every == 0  # the norm and lr are logged
    assert len(batches) == run.batches_per_step, (len(batches), run.batches_per_step)
    for i, (phase, rep) in enumerate(order):
        last = i == len(order) - 1
        if last and run.preemption.vote_due(step + 1):
            vote = run.preemption.begin_vote(step)
        grads = phase_gradients(run, phase, batches[rep * acc:(rep + 1) * acc], logging)
        metrics.update(grads.metrics)
        all_bad = grads.bad if all_bad is None else all_bad + grads.bad
        if vote is not None:
            run.preemption.end_vote(vote, step)
        with run.timer.part("optimizer"):
            if last:
                run.buffer_guard.restore_if_bad(all_bad)
            _update(phase, grads.bad, run.dist, run.scaler, run.ema)
    if run.scaler is not None:
        run.scaler.update()
    run.nonfinite.note(all_bad)
    return metrics


def phase_gradients(run: Run, phase: Phase, batches: list[Batch],
                    logging: bool = True) -> Gradients:
    """`phase`'s gradients over the group's batches, averaged over ranks and clipped; the norm
    only where needed (train.grad_clip, or a log step: `logging`; nonfinite.judge)."""
    opt = phase.optimizer
    opt.zero_grad()
    # one network among several: freeze the others (a lone network needs no toggling)
    scope = only_grads_of(run.model, phase.params) if len(run.phases) > 1 else nullcontext()
    with scope:
        losses = _backward(run, phase.name, batches)
    with run.timer.part("allreduce"):
        run.dist.synchronize(opt)  # gradients now averaged over ranks: the same on every rank
    with run.timer.part("optimizer"):
        if run.scaler is not None:
            run.scaler.unscale_(opt)
        metrics: Metrics = {metric_name(phase.name, k): v for k, v in losses.items()}
        bad, norm = nonfinite.judge(phase.params, phase.one_kind, run.cfg.train.grad_clip, logging)
        if norm is not None:  # (a log step's, or every step's with clipping)
            metrics[metric_name("opt", phase.name, "grad_norm")] = norm
        if logging:
            metrics[metric_name("opt", phase.name, "lr")] = opt.param_groups[0]["lr"]
    return Gradients(metrics, bad)


def _backward(run: Run, phase: str, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Backward of the mean loss over the group's batches (accumulation); their mean losses, as
    0-d tensors on the device (detached: a logged loss must not keep its graph alive)."""
    means: dict[str, torch.Tensor] = {}
    n = len(batches)
    for batch in batches:
        with run.timer.part("forward"), autocast(run.cfg.train.precision, run.dist.device):
            losses = run.train_losses(batch, phase)  # (adversarial examples mixed in, if set)
        loss = losses["loss"].float()
        if n > 1:
            loss = loss / n
        with run.timer.part("backward"):
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        for k, v in losses.items():
            v = v.detach() / n if n > 1 else v.detach()
            means[k] = means[k] + v if k in means else v
    return means


def _update(phase: Phase, bad: torch.Tensor, dist: Dist, scaler: torch.amp.GradScaler | None,
            ema: EMA | None) -> None:
    """Step the phase's optimizer (through `dist`, and `scaler` under fp16) unless its gradients
    are not finite (`bad`), then its lr schedule and the weight average `ema`. Fused kernels skip
    on the device (`found_inf`: no update, Adam's step count kept); others read `bad` here. The lr
    schedule and the EMA count every step, skipped or not (as under torch's GradScaler, whose
    skipped steps the schedule counts too); a skipped step's EMA update folds in the unchanged
    weights."""
    opt = phase.optimizer
    if scaler is None and fused(opt):
        opt.found_inf = bad  # read by torch's fused Adam/AdamW/SGD (float32)
        try:
            dist.step(opt)
        finally:
            del opt.found_inf
    elif not bad.item():  # unfused, or fp16 with a GradScaler: read on the host, every step
        dist.step(opt, scaler)
    else:
        opt.zero_grad()
    phase.scheduler.step()  # (constant: only counted, pipeline.train.optim.Schedule)
    if ema is not None and ema.follows(phase.params):
        ema.update()


# ---------------------------------------------------------------------------- the end
def preempted(run: Run) -> None:
    """The contract's steps 4-5 (pipeline.runtime.preemption): checkpoint on disk, then
    `Preempted`."""
    run.nonfinite.settle(run.progress)
    path = save(run)
    run.checkpoints.wait()  # on disk before anyone hears "requeue me"
    signum = run.preemption.signum
    run.print(f"[hpcforge] {signal.Signals(signum).name}: checkpointed step {run.progress.step} to "
              f"{path}; exit {REQUEUE_EXIT_CODE} (requeue me)")
    run.tracker.finish({"preempted_at_step": run.progress.step}, exit_code=REQUEUE_EXIT_CODE)
    run.dist.barrier()  # rank 0's files are complete before any rank exits
    run.heartbeat.beat("preempted")  # the launcher's cue for 75 (pipeline.runtime.launch.relaunch)
    raise Preempted(signum, path)


def finish(run: Run) -> dict[str, Any]:
    """The final checkpoint (also final.pt), every rank's weight digest, the summary."""
    run.nonfinite.settle(run.progress)
    final, p, dist = save(run), run.progress, run.dist
    dist.average_buffers(run.model)  # training is over: every rank ends with the mean
    digests = dist.gather_object(weights_digest(run.model))
    summary: dict[str, Any] = {"steps": p.step, "ranks": dist.world_size,
                               "launcher": dist.place.launcher,
                               "nonfinite_steps": p.nonfinite_total,
                               "weights_sha256_per_rank": digests, "history": p.history}
    if run.ema is not None:
        summary["ema_sha256_per_rank"] = dist.gather_object(ema_digest(run.ema))
    run.checkpoints.wait()
    if dist.is_main:
        ckpt = run.checkpoints.folder / "final.pt"
        if final:
            link_atomic(Path(final), ckpt)
        summary.update(checkpoint=str(ckpt), metrics=str(run.tracker.metrics_path),
                       wandb_run=run.tracker.run_path)
        run.tracker.finish(dict(p.history[-1]) if p.history else {})
        run.tracker.write_json(run.run_dir / "summary.json", summary)
    dist.barrier()
    run.heartbeat.beat("done")
    return summary
