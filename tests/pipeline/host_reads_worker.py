"""Counts the reads of tensors on the host during a real training run (issue 28).

A read (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.numpy()`, `.cpu()`, ...) waits for the
device's queue to drain; on a GPU, one between logging steps stalls every step. CPU tensors have
no queue, so the reads are counted where they are made: `HostReads` wraps those methods of
torch.Tensor and notes, for each read, which part of the loop made it and at which step. The
loop's own functions are wrapped to say where it is (pipeline.train.loop looks them up as globals at
each call, so the wrapped ones are the ones it runs).

The preemption vote is tagged apart: a sum of host values (signal seen, rank 0's proposed
interval) at steps 1 and 2, then once per train.dist.signal_check_s seconds, not per step; ddp
reads its result from a tensor (on a GPU under nccl, a device read once a second).

Run under mpirun (`python host_reads_worker.py OUT.json OVERRIDES...`): every rank trains with
the real loader and backend, and writes its reads to OUT.json.<rank>.
"""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")
WHERE = {"train_step": "step", "_step_end": "step end", "_epoch_end": "epoch end",
         "finish": "end", "batch_groups": "loader"}


class HostReads:
    """Install with `install(monkeypatch_setattr)`; `reads` holds (where, step, method)."""

    def __init__(self) -> None:
        self.where: str | None = None
        self.run = None
        self.reads: list[tuple[str, int, str]] = []

    def install(self, setattr_) -> None:
        from pipeline.train import loop
        for name in READS:
            setattr_(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        for name, where in WHERE.items():
            setattr_(loop, name, self._tagging(where, getattr(loop, name)))
        from pipeline.runtime.preemption import Preemption
        end_vote = Preemption.end_vote

        def vote(preemption, *args):
            outer, self.where = self.where, "vote"
            try:
                return end_vote(preemption, *args)
            finally:
                self.where = outer
        setattr_(Preemption, "end_vote", vote)

    def _counting(self, name: str, method):
        reads = self

        @functools.wraps(method)
        def read(tensor, *args, **kwargs):
            if reads.where is not None:
                reads.reads.append((reads.where, reads.run.progress.step, name))
            return method(tensor, *args, **kwargs)
        return read

    def _tagging(self, where: str, fn):
        reads = self

        if where == "loader":  # a generator: tag each resumption, not the call
            @functools.wraps(fn)
            def gen(run, *args):
                it = fn(run, *args)
                while True:
                    outer, reads.where = reads.where, where
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                    finally:
                        reads.where = outer
                    yield item
            return gen

        @functools.wraps(fn)
        def tagged(run, *args, **kwargs):
            outer, reads.where, reads.run = reads.where, where, run
            try:
                return fn(run, *args, **kwargs)
            finally:
                reads.where = outer
        return tagged

    def between_logs(self, log_every: int) -> list[tuple[str, int, str]]:
        """Reads made by a step, by the loader, or at a step's end that is no log step. (A step's
        reads are tagged with the steps done before it: step s+1 runs while progress.step is s.)"""
        return [r for r in self.reads
                if r[0] in ("step", "loader") or (r[0] == "step end" and r[1] % log_every)]


def main(out: str, overrides: list[str]) -> None:
    from pipeline.config import load_config
    from pipeline.runtime.dist import init_distributed
    from pipeline.train.assembly import build
    from pipeline.train.loop import fit
    cfg = load_config("demo", overrides)
    dist = init_distributed(cfg.train.dist)
    counter = HostReads()
    counter.install(setattr)
    fit(build(cfg, dist))
    Path(f"{out}.{dist.rank}").write_text(json.dumps(counter.reads))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
