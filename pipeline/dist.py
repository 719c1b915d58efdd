"""The one module that knows Horovod (and, later, torch.distributed).

    dist = init_distributed(cfg.train.dist)
    opt = dist.optimizer(torch.optim.Adam(net.parameters()), net, prefix="model")
    dist.broadcast(net, opt)
    means = dist.mean({"loss": 0.3})

Rank, size and local rank come from the launcher's environment (OpenMPI's mpirun, MPICH-style PMI,
Slurm's srun, horovodrun, torchrun); `launcher` says which one was found.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from pipeline.config import DistConfig
from pipeline.errors import UserError

# (launcher name, rank var, size var, local rank var, local size var), first match wins.
_LAUNCHERS = (
    ("horovodrun", "HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_RANK", "HOROVOD_LOCAL_SIZE"),
    ("mpirun (OpenMPI)", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpirun (PMI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("srun (Slurm)", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
)


@dataclass(frozen=True)
class Placement:
    launcher: str
    rank: int
    size: int
    local_rank: int
    local_size: int


def detect_launcher(env: Mapping[str, str] | None = None) -> Placement:
    """Where this process sits, from the launcher's environment; a lone process is rank 0 of 1."""
    env = os.environ if env is None else env
    for name, rank, size, local, local_size in _LAUNCHERS:
        if rank in env and size in env:
            if name.startswith("srun") and "SLURM_STEP_ID" not in env:
                continue  # inside sbatch but not under srun: a batch script, not a rank
            n_local = env.get(local_size, "1").split("(")[0].split(",")[0]  # "2(x2)" in Slurm
            return Placement(name, int(env[rank]), int(env[size]), int(env.get(local, 0)),
                             int(n_local or 1))
    return Placement("single process", 0, 1, 0, 1)


class Dist:
    """Rank bookkeeping and collectives for one backend. Rank 0 owns every side effect."""

    def __init__(self, backend: str, place: Placement, device: torch.device):
        self.backend, self.place, self.device = backend, place, device
        self.rank, self.size = place.rank, place.size
        self.local_rank, self.local_size = place.local_rank, place.local_size
        self.is_main = self.rank == 0
        if backend == "horovod":
            import horovod.torch as hvd
            self._hvd = hvd

    def optimizer(self, opt: torch.optim.Optimizer, module: torch.nn.Module,
                  prefix: str) -> torch.optim.Optimizer:
        """Wrap `opt` so gradients are averaged over ranks before each step."""
        if self.backend != "horovod":
            return opt
        named = [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]
        return self._hvd.DistributedOptimizer(opt, named_parameters=named, op=self._hvd.Average)

    def broadcast(self, module: torch.nn.Module, *optimizers: torch.optim.Optimizer) -> None:
        """Make every rank start from rank 0's parameters, buffers and optimizer state."""
        if self.backend != "horovod":
            return
        self._hvd.broadcast_parameters(module.state_dict(), root_rank=0)
        for opt in optimizers:
            self._hvd.broadcast_optimizer_state(opt, root_rank=0)

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average floating-point buffers (batch-norm running statistics) over ranks.

        Horovod averages gradients, not buffers, so each rank's running statistics drift with its
        own data; averaging them before validation and checkpoints makes every rank hold the same
        model (the "reduce" policy of timm's distribute_bn).
        """
        if self.backend != "horovod":
            return
        for name, buf in module.named_buffers():
            if buf.is_floating_point():
                buf.copy_(self._hvd.allreduce(buf, op=self._hvd.Average, name=f"buffer.{name}"))

    def mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """Average scalars over ranks (one allreduce for all of them)."""
        keys = sorted(values)
        if self.backend != "horovod" or not keys:
            return {k: float(values[k]) for k in keys}
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        t = self._hvd.allreduce(t, op=self._hvd.Average, name="hpcforge.mean")
        return dict(zip(keys, t.tolist()))

    def gather_object(self, obj):
        """Every rank's `obj`, in rank order (for checks such as equal weights)."""
        if self.backend != "horovod":
            return [obj]
        return self._hvd.allgather_object(obj)

    def barrier(self) -> None:
        if self.backend == "horovod":
            self._hvd.allreduce(torch.zeros(1), name="hpcforge.barrier")

    def describe(self) -> str:
        return (f"backend={self.backend} launcher={self.place.launcher} ranks={self.size} "
                f"local_ranks={self.local_size} device={self.device}")


def init_distributed(cfg: DistConfig) -> Dist:
    """Start the backend and check that it agrees with the launcher about the world."""
    place = detect_launcher()
    device = torch.device("cuda", place.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # one GPU per rank, pinned by local rank
    if cfg.backend == "none":
        if place.size > 1:
            raise UserError(f"train.dist.backend=none but the launcher ({place.launcher}) started "
                            f"{place.size} ranks; use train.dist.backend=horovod or one rank")
        return Dist("none", place, device)
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise UserError(f"train.dist.backend=horovod but Horovod does not import ({e}); run "
                        f"`make setup` to build it, or set train.dist.backend=none") from None
    hvd.init()  # Horovod's own view of the world is the one collectives use
    place = Placement(place.launcher, hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
    return Dist("horovod", place, device)
