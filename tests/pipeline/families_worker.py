"""Run by tests/pipeline/test_families_dist.py under mpirun (2 ranks): every model family, two
steps of the real pipeline.train.loop.train_step on batches that differ per rank, under one backend.

Each family is the first case of tests/models/models_testkit.py (small shapes). Its Run is
assembled from the real parts pipeline.train.assembly.build uses (phases with the backend's optimizer
wrappers, rank 0's weights broadcast to every rank, the preemption vote, the buffer guard) with a
stand-in loader, since each family takes data of its own shape. After the steps: the ranks'
mean batch-norm statistics, every rank's weight digest, and a checkpoint written by
pipeline.train.state.save and loaded back into a fresh model. Rank 0 writes one JSON file:
{family: {"before": [per rank, before the broadcast], "start": after it, "digests": [per rank],
"reloaded": digest, "complex": bool}}.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from models_testkit import CASES  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.core.checkpoint import Checkpoints, load  # noqa: E402
from pipeline.runtime.dist import init_distributed  # noqa: E402
from pipeline.runtime.preemption import Preemption, PreemptionFlag  # noqa: E402
from pipeline.runtime.tracking import Tracker  # noqa: E402
from pipeline.runtime.watchdog import NoHeartbeat  # noqa: E402
from pipeline.train.assembly import build_phases  # noqa: E402
from pipeline.train.loop import train_step  # noqa: E402
from pipeline.train.run import BufferGuard, Run, weights_digest  # noqa: E402
from pipeline.train.state import save  # noqa: E402

STEPS = 2


class Batches:
    """The loader's place in a Run: a length (steps per epoch) and a position for checkpoints."""

    def __len__(self) -> int:
        return 100

    def state_dict(self) -> dict[str, int]:
        return {"epoch": 0, "batch": 0}


def assemble(model, cfg, dist, folder: Path) -> Run:
    run = Run(cfg=cfg, dist=dist, heartbeat=NoHeartbeat(), model=model, compiled_losses=None,
              phases=[], loader=Batches(), val_loader=None,
              checkpoints=Checkpoints(folder, keep=1, best_metric=""),
              preemption=Preemption(PreemptionFlag(), dist.begin_sum, dist.is_main, 3600),
              hooks=[], store_meta={}, provenance={}, buffer_guard=BufferGuard(model),
              tracker=Tracker(cfg.train.logger, folder, {}, active=False))
    run.draws = max(model.schedule.values())
    run.phases = build_phases(model, cfg, dist, run.steps_per_epoch)
    dist.broadcast(model, *(p.optimizer for p in run.phases))
    return run


def train_family(case, cfg, dist, folder: Path) -> dict:
    torch.manual_seed(1234 + dist.rank)  # each rank's own initial weights: the broadcast must fix
    model = case.build()
    before = dist.gather_object(weights_digest(model))
    run = assemble(model, cfg, dist, folder)
    start = weights_digest(run.model)
    for step in range(STEPS):
        batches = [case.make_batch(seed=1000 * dist.rank + 10 * step + i)  # differ per rank
                   for i in range(run.batches_per_step)]
        train_step(run, batches)
        run.progress.step += 1
    path = save(run)
    run.checkpoints.wait()
    dist.average_buffers(run.model)
    digests = dist.gather_object(weights_digest(run.model))
    reloaded = None
    if dist.is_main:  # (rank 0 owns the folder: another rank could find it gone)
        fresh = case.build()
        fresh.load_state_dict(load(path)["model"])
        reloaded = weights_digest(fresh)
    return {"digests": digests, "before": before, "start": start, "reloaded": reloaded,
            "complex": any(p.is_complex() for p in run.model.parameters())}


def main(backend: str, out: str) -> None:
    cfg = load_config("demo", [f"train.dist.backend={backend}", "train.logger.mode=disabled",
                               "train.lr=0.01"])
    dist = init_distributed(cfg.train.dist)
    torch.set_num_threads(1)
    results, seen = {}, set()
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            if case.family in seen:
                continue
            seen.add(case.family)
            folder = Path(dist.broadcast_object(tmp)) / case.family
            results[case.family] = train_family(case, cfg, dist, folder)
    if dist.is_main:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
