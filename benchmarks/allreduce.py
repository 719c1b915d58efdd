"""Horovod allreduce bandwidth ÷ a bare mpi4py Allreduce of the same buffers, in the same job.

Run on N ranks (`mpirun -np 2 python -m benchmarks.allreduce OUT.json`); rank 0 writes the rows.
Both sides sum float32 buffers of 1, 16 and 64 MB; bandwidth is the algorithm bandwidth
bytes / seconds per call (the same definition for both, so the ratio is fair).
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

SIZES_MB = (1, 16, 64)
TARGET = 0.8  # trainer issue: Horovod >= 0.8x bare MPI for 16 and 64 MB


def _time(fn, reps: int) -> float:
    fn()  # warm-up: first call negotiates / allocates
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(out: str, reps: int) -> None:
    from mpi4py import MPI  # initialises MPI (thread-multiple) before Horovod joins it
    import horovod.torch as hvd
    import torch

    hvd.init()
    comm = MPI.COMM_WORLD
    rows = []
    for mb in SIZES_MB:
        n = mb * (1 << 20) // 4
        send = np.random.default_rng(comm.rank).random(n, dtype=np.float32)
        recv = np.empty_like(send)
        tensor = torch.from_numpy(send.copy())
        comm.Barrier()
        t_mpi = _time(lambda: comm.Allreduce(send, recv, op=MPI.SUM), reps)
        comm.Barrier()
        t_hvd = _time(lambda: hvd.allreduce(tensor, op=hvd.Sum, name=f"bench.{mb}"), reps)
        # the two must agree on the values, or the comparison is meaningless
        assert np.allclose(hvd.allreduce(tensor, op=hvd.Sum, name=f"check.{mb}").numpy(), recv,
                           rtol=1e-5), "Horovod and MPI sums differ"
        t_mpi, t_hvd = comm.allreduce(t_mpi, op=MPI.MAX), comm.allreduce(t_hvd, op=MPI.MAX)
        bw_mpi, bw_hvd = mb / t_mpi, mb / t_hvd
        rows.append({"benchmark": "allreduce", "case": f"{mb} MB x {comm.size} ranks",
                     "value": round(bw_hvd, 1), "baseline": round(bw_mpi, 1), "unit": "MB/s",
                     "ratio": round(bw_hvd / bw_mpi, 3), "target": f">= {TARGET}" if mb >= 16 else "report",
                     "what": "Horovod allreduce bandwidth / mpi4py Allreduce bandwidth"})
    if comm.rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20)
