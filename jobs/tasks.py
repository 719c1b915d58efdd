"""The callables submitit runs on the cluster: one class per pipeline stage.

Every srun task of a job calls the same object; each task is one rank. Rank, world size, local
rank and node come from pipeline/runtime/dist.py alone (`detect_launcher`, `node_name`), here as in the
trainer; what this module knows is Slurm's side: requeues, job ids, and the rendezvous address
of a torch.distributed job (`export_rendezvous`, from submitit). Submitit pickles the object
into the job folder, so a requeued job calls it again with the same config.

Preemption and time limits follow the one contract written in pipeline/runtime/preemption.py (signals,
the step-boundary vote, checkpoint on disk before exit 75); what is Slurm's side of it lives here:
`TrainJob` requeues the job itself (`scontrol requeue`, rank 0) when `train()` raises `Preempted`,
bounded by `cluster.max_requeues` (Slurm counts them in SLURM_RESTART_COUNT), and outside `train()`
submitit's own handler calls `checkpoint()`, which resubmits the same job (it resumes from last.pt).

A frozen rank (pipeline.runtime.watchdog): every task runs a watchdog thread over all ranks' heartbeats in
the job folder; when a rank is silent longer than `train.dist.timeout_s`, the lowest other rank
prints the line naming it and kills the job step (SIGKILL), so the job FAILS instead of holding
the allocation until its time limit (a failure, never requeued).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import submitit

from jobs import records
from pipeline.config import Config

RANKS_WAIT_S = 120  # how long rank 0 waits for the others' placement files before printing


def restarts() -> int:
    """How many times Slurm has requeued this job so far."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def requeued_by_slurm(job_id: str, n: int) -> bool:
    """Whether Slurm has requeued job `job_id` since this, its `n`-th restart, started: Restarts
    counts up at the requeue while the job is still COMPLETING, as a cancelled one is (scancel)."""
    return int(records.scontrol_job(job_id).get("Restarts", n)) > n


def placement() -> dict[str, Any]:
    """This task's rank and place, as pipeline.runtime.dist reads them from srun (or nothing: rank 0 of 1)."""
    from pipeline.runtime.dist import detect_launcher, node_name  # torch: not in `hpcforge submit`
    place = detect_launcher()
    return {"rank": place.rank, "node": node_name(), "local_rank": place.local_rank,
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", "none"), "pid": os.getpid()}


def export_rendezvous() -> None:
    """MASTER_ADDR and MASTER_PORT for a job's ranks (ddp's store, Horovod's Gloo rendezvous
    across nodes): the job's first node and a port drawn from the job id, as submitit's
    TorchDistributedEnvironment computes them (every task gets the same), for
    pipeline.runtime.dist to use. Values already set (by the user, cluster.setup) are kept."""
    env = submitit.helpers.TorchDistributedEnvironment()
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))


def announce_ranks(folder: Path) -> dict[str, Any]:
    """Each rank leaves its placement in the job folder; rank 0 prints the table once.

    A file per rank, not a collective: the backend (Horovod or DDP) is the trainer's to start,
    and the job folder is on a filesystem every node sees (submitit needs that anyway).
    """
    from pipeline.runtime.dist import detect_launcher
    me = placement()
    world_size = detect_launcher().world_size
    d = folder / f"ranks-{os.environ.get('SLURM_JOB_ID', os.getpid())}-{restarts()}"
    records.write_json(d / f"{me['rank']}.json", me)
    if me["rank"] != 0:
        return me
    t0 = time.monotonic()
    while len(list(d.glob("*.json"))) < world_size and time.monotonic() - t0 < RANKS_WAIT_S:
        time.sleep(0.2)
    table = sorted((json.loads(p.read_text()) for p in d.glob("*.json")), key=lambda r: r["rank"])
    nodes = sorted({r["node"] for r in table})
    lines = [f"[hpcforge] job {os.environ.get('SLURM_JOB_ID', '(local)')}: {world_size} rank(s) on "
             f"{len(nodes)} node(s) {','.join(nodes)}; restart {restarts()}",
             "[hpcforge]   rank  node        local  gpus"]
    lines += [f"[hpcforge]   {r['rank']:>4}  {r['node']:<10}  {r['local_rank']:>5}  {r['gpus']}"
              for r in table]
    if len(table) < world_size:
        lines.append(f"[hpcforge]   ({world_size - len(table)} rank(s) not reported within "
                     f"{RANKS_WAIT_S} s)")
    print("\n".join(lines), flush=True)
    return me


def watch_ranks(folder: Path, cfg: Config) -> threading.Event:
    """Start this task's heartbeat and its watchdog thread over every rank's; set the returned
    event to stop watching. Every task watches (any of them may be the frozen one) but only the
    lowest rank other than the silent one acts, so the line is printed once. A thread is enough
    here: it needs the GIL only every POLL_S, and a rank blocked in a collective has given it up."""
    from pipeline.runtime.dist import detect_launcher
    from pipeline.runtime.watchdog import WATCH_DIR_ENV, Watchdog
    d = folder / f"heartbeats-{os.environ.get('SLURM_JOB_ID', os.getpid())}-{restarts()}"
    d.mkdir(parents=True, exist_ok=True)
    os.environ[WATCH_DIR_ENV] = str(d)  # the trainer beats there (pipeline.runtime.watchdog.Heartbeat)
    stop = threading.Event()
    dog = Watchdog(d, detect_launcher().world_size, cfg.train.dist.timeout_s)
    threading.Thread(target=_watch, args=(dog, stop, Path(cfg.output_dir) / "train" / "checkpoints"),
                     daemon=True, name="hpcforge-watchdog").start()
    return stop


def _watch(dog: Any, stop: threading.Event, checkpoints: Path) -> None:
    from pipeline.runtime.watchdog import POLL_S, latest_checkpoint
    me = placement()["rank"]
    while not stop.wait(POLL_S):
        stall = dog.stalled()
        silent = stall.record["rank"] if stall else me
        if stall is None or me != min((r for r in range(dog.ranks) if r != silent), default=me):
            continue
        print(f"hpcforge: error: {stall.describe(dog.timeout_s, latest_checkpoint(checkpoints))}",
              file=sys.stderr, flush=True)
        step = f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}"
        subprocess.run(["scancel", "--signal=KILL", step], timeout=60, check=False)
        return


def job_folder() -> Path:
    try:
        return Path(submitit.JobEnvironment().paths.folder)
    except (RuntimeError, KeyError):  # not inside a submitit job (debug executor, direct call)
        return Path(os.environ.get("TMPDIR", "/tmp"))


class TrainJob(submitit.helpers.Checkpointable):
    """`pipeline.train.trainer.train(cfg)` on every task of the job, surviving preemption by requeue.

    With `evaluate=True` (a sweep's `--stages train,evaluate`, issue 15) rank 0 then scores the
    final checkpoint in the same task, as `hpcforge evaluate` would: no second job to queue per
    task, and the array's `afterany` summary finds every task's metrics. A signal during the
    evaluation reaches submitit's `checkpoint()`: the requeued task resumes at the final step and
    evaluates again (the `.eval.json` is replaced atomically)."""

    def __init__(self, cfg: Config, argv: list[str], max_requeues: int, evaluate: bool = False):
        self.cfg = cfg
        self.argv = argv                # `hpcforge train` arguments, for a local relaunch
        self.max_requeues = max_requeues
        self.evaluate = evaluate

    def __call__(self) -> dict[str, Any]:
        from pipeline.runtime.dist import detect_launcher
        cfg = resumable(self.cfg)
        under_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"  # ranks are srun's tasks
        if not under_slurm and detect_launcher().world_size == 1 and cfg.train.dist.nproc > 1:
            return self._relaunch_locally(cfg)  # local executor: start the ranks here
        from pipeline.runtime.preemption import Preempted
        from pipeline.train.trainer import train
        if under_slurm and cfg.train.dist.backend != "none":
            export_rendezvous()
        me = announce_ranks(job_folder())
        stop = watch_ranks(job_folder(), cfg)
        try:
            summary = train(cfg)
        except Preempted:
            self._requeue_or_fail()
        finally:
            stop.set()
        if self.evaluate and me["rank"] == 0:
            summary = {**summary, "evaluation": evaluate_final(cfg)}
        return {**me, "restarts": restarts(), "summary": summary}

    def _requeue_or_fail(self) -> None:
        from pipeline.runtime.dist import detect_launcher
        from pipeline.runtime.preemption import REQUEUE_EXIT_CODE
        n, rank = restarts(), detect_launcher().rank
        job_id = os.environ.get("SLURM_JOB_ID")
        checkpoints = Path(self.cfg.output_dir) / "train" / "checkpoints"
        if rank == 0 and job_id and requeued_by_slurm(job_id, n):
            # Slurm requeued the job itself (`scontrol requeue`, preemption with PreemptMode=
            # REQUEUE) and its signal got us here: say so in one line and leave with 75, no
            # traceback (issue 25: the log said "COMPLETING (cancelled) ... not requeueing").
            print(f"[hpcforge] checkpoint written; Slurm is requeueing job {job_id} itself "
                  f"(requeue {n + 1}); it resumes from {checkpoints} when it starts again",
                  flush=True)
            sys.exit(REQUEUE_EXIT_CODE)
        if n >= self.max_requeues:
            raise RuntimeError(f"preempted/timed out again after {n} requeues "
                               f"(cluster.max_requeues={self.max_requeues}); the last checkpoint "
                               f"is in {checkpoints}: resubmit to continue from it")
        if job_id is None:
            raise RuntimeError("preempted outside Slurm: nothing requeues this run; the checkpoint "
                               "is written, resubmit with train.resume=auto to continue")
        if rank == 0:
            # scancel also sends SIGTERM: a cancelled job must stay cancelled, and `scontrol
            # requeue` would revive it. Slurm shows it COMPLETING (CANCELLED once its processes
            # are gone) before the signal arrives; a preemption or time-limit signal comes to a
            # RUNNING job.
            state = records.scontrol_job(job_id).get("JobState", "")
            if state in ("COMPLETING", "CANCELLED"):
                print(f"[hpcforge] job {job_id} is {state} (cancelled): checkpoint written, not "
                      f"requeueing", flush=True)
                raise RuntimeError(f"job {job_id} was cancelled (scancel); the last checkpoint is "
                                   f"in {checkpoints}: resubmit to continue from it")
            print(f"[hpcforge] checkpoint written; requeueing job {job_id} "
                  f"(requeue {n + 1} of at most {self.max_requeues})", flush=True)
            # Requeue may already be under way (Slurm's own preemption requeue): not an error.
            subprocess.run(["scontrol", "requeue", job_id], timeout=60, check=False)
        sys.exit(REQUEUE_EXIT_CODE)  # SystemExit: submitit writes no result; the requeued job will

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Submitit's handler (a signal outside train()): the same job again, resuming."""
        if restarts() >= self.max_requeues:
            return None  # submitit then fails the job with "checkpoint function returned None"
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _relaunch_locally(self, cfg: Config) -> dict[str, Any]:
        from pipeline.runtime.launch import relaunch
        from pipeline.runtime.preemption import REQUEUE_EXIT_CODE
        rc = relaunch(cfg.train.dist.nproc, ["train", *self.argv], cfg.train.dist.launcher,
                      cfg.train.dist.timeout_s, Path(cfg.output_dir) / "train" / "checkpoints",
                      backend=cfg.train.dist.backend)
        if rc == REQUEUE_EXIT_CODE:  # the ranks checkpointed after a preemption signal
            self._requeue_or_fail()
        if rc != 0:
            raise RuntimeError(f"`hpcforge train` on {cfg.train.dist.nproc} local ranks exited "
                               f"with {rc}; see the job's log")
        summary = json.loads((Path(cfg.output_dir) / "train" / "summary.json").read_text())
        if self.evaluate:
            summary["evaluation"] = evaluate_final(cfg)
        return {**placement(), "restarts": 0, "summary": summary}


def final_checkpoint(cfg: Config) -> Path:
    """Where `hpcforge train` leaves the run's final checkpoint (pipeline/train/loop.py)."""
    return Path(cfg.output_dir) / "train" / "checkpoints" / "final.pt"


def resumable(cfg: Config) -> Config:
    """Jobs always resume from `last.pt` when one exists (a requeued job finds its own)."""
    cfg.train.resume = "auto"
    return cfg


class PrepareJob(submitit.helpers.Checkpointable):
    """`hpcforge prepare` as a job: Dask runs inside the allocation (data.dask settings)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def __call__(self) -> str:
        from pipeline.data.prepare import prepare
        path = prepare(self.cfg.data, self.cfg.to_dict())
        print(f"[hpcforge] dataset ready: {path}", flush=True)
        return str(path)


def evaluate_final(cfg: Config) -> dict[str, Any]:
    """`hpcforge evaluate` on the run's final checkpoint; its metrics (and where they went)."""
    result = EvaluateJob(str(final_checkpoint(cfg)))()
    return {"json": result["json"], "metrics": result["metrics"]}


class EvaluateJob:
    """`hpcforge evaluate` as a job: scores the train stage's final checkpoint."""

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint

    def __call__(self) -> dict[str, Any]:
        from pipeline.analysis.evaluate import evaluate
        result = evaluate(self.checkpoint)
        print(f"[hpcforge] evaluated {self.checkpoint}: {json.dumps(result['metrics'])}", flush=True)
        return result
