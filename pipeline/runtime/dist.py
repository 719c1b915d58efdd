"""The one module that knows Horovod and torch.distributed.

    dist = init_distributed(cfg.train.dist)
    opt = dist.optimizer(torch.optim.Adam(net.parameters()), net, prefix="model")
    dist.broadcast(net, opt)
    ... loss.backward(); dist.synchronize(opt); clip; dist.step(opt)
    means = dist.mean({"loss": 0.3})

Backends: `horovod` (hvd.DistributedOptimizer per optimizer over its prefixed parameters, gradients
allreduced while backward runs), `ddp` (a torch.distributed process group, gloo on CPU and nccl on
GPU; gradients all-reduced per optimizer in buckets while backward runs), `none` (one process).
Rank, world size and local rank come from the launcher's environment (OpenMPI's mpirun, MPICH PMI,
Slurm's srun, horovodrun, torchrun, our own `--nproc` launcher); `place.launcher` says which one
was found.
"""
from __future__ import annotations

import atexit
import datetime
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import DistConfig
from pipeline.core.errors import UserError

# Set by our `--nproc` launcher (pipeline.runtime.launch.LocalRanks): torchrun's or horovodrun's
# variables are then ours; for ddp, the FileStore its ranks meet through, in its private folder.
LOCAL_RANKS_ENV = "HPCFORGE_LOCAL_RANKS"
RENDEZVOUS_FILE_ENV = "HPCFORGE_RENDEZVOUS_FILE"
OWN_LAUNCHER = "hpcforge --nproc"

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
    world_size: int
    local_rank: int
    local_size: int


def detect_launcher(env: Mapping[str, str] | None = None) -> Placement:
    """Where this process sits, from the launcher's environment; a lone process is rank 0 of 1."""
    env = os.environ if env is None else env
    for name, rank, size, local, local_size in _LAUNCHERS:
        if rank in env and size in env:
            if name.startswith("srun") and "SLURM_STEP_ID" not in env:
                continue  # inside sbatch but not under srun: a batch script, not a rank
            if name in ("horovodrun", "torchrun") and env.get(LOCAL_RANKS_ENV):
                name = OWN_LAUNCHER  # their variables, set by us
            n_local = env.get(local_size, "1").split("(")[0].split(",")[0]  # "2(x2)" in Slurm
            return Placement(name, int(env[rank]), int(env[size]), int(env.get(local, 0)),
                             int(n_local or 1))
    return Placement("single process", 0, 1, 0, 1)


def node_name(env: Mapping[str, str] | None = None) -> str:
    """The node this process runs on: Slurm's name for it under srun (two nodes of a test cluster
    may share one host), else the host name."""
    env = os.environ if env is None else env
    return env.get("SLURMD_NODENAME") or socket.gethostname()


class Dist:
    """One process, no communication. Subclasses average over ranks. Rank 0 owns side effects."""
    backend = "none"

    def __init__(self, place: Placement, device: torch.device, cfg: DistConfig):
        self.place, self.device, self.cfg = place, device, cfg
        self.rank, self.world_size = place.rank, place.world_size
        self.local_rank, self.local_size = place.local_rank, place.local_size
        self.is_main = self.rank == 0

    # -- optimisers
    def optimizer(self, opt: torch.optim.Optimizer, module: torch.nn.Module, prefix: str,
                  accumulate: int = 1) -> torch.optim.Optimizer:
        """Wrap `opt` so its gradients are averaged over ranks (a no-op on one process)."""
        return opt

    def synchronize(self, opt: torch.optim.Optimizer) -> None:
        """Wait until `opt`'s gradients are averaged over ranks (before clipping or checks)."""

    def step(self, opt: torch.optim.Optimizer, scaler: Any = None) -> None:
        """Step `opt` after `synchronize` (through the AMP scaler when there is one)."""
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()

    def broadcast(self, module: torch.nn.Module, *optimizers: torch.optim.Optimizer) -> None:
        """Make every rank start from rank 0's parameters, buffers and optimizer state."""

    def sync_batchnorm(self, module: torch.nn.Module) -> torch.nn.Module:
        """With train.dist.sync_batchnorm on several ranks: every batch norm layer of `module`
        becomes the backend's SyncBatchNorm (same weights and statistics), which normalises with
        the statistics of the global batch. Call it before building the optimizers."""
        if not self.cfg.sync_batchnorm or self.world_size == 1:
            return module
        if self.device.type != "cuda":
            raise UserError(f"train.dist.sync_batchnorm=true: SyncBatchNorm (Horovod's and "
                            f"torch's) runs on CUDA only, and rank {self.rank} is on "
                            f"{self.device}; set train.dist.sync_batchnorm=false on CPU (each rank "
                            f"then normalises over its own batch, and the running statistics are "
                            f"averaged over ranks whenever they are read)")
        return _swap_batchnorm(module, self._sync_batchnorm_class())

    def _sync_batchnorm_class(self) -> type[torch.nn.Module]:
        raise NotImplementedError  # only reached with several ranks, so never for backend none

    # -- collectives on small values
    def begin_sum(self, values: Sequence[float]) -> Callable[[], list[float]]:
        """Start summing `values` over ranks; the returned function waits and gives the sums. The
        trainer agrees on preemption with it: it starts it after a step's last forward and
        finishes it once the gradients are synchronised, so it runs during backward and costs no
        sync point of its own."""
        return lambda: [float(v) for v in values]

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average `module`'s floating-point buffers over ranks, in place. Gradients are averaged,
        buffers are not: each rank's batch-norm running statistics follow its own data. Their
        updates are linear (exponential moving averages of batch statistics), so averaging them
        when they are read (validation, checkpoints, the end) gives what averaging after every
        step would, without a collective per step."""
        bufs = [b for b in module.buffers() if b.is_floating_point()]
        if self.world_size > 1 and bufs:
            for b, mean in zip(bufs, self._average(bufs, "hpcforge.buffers")):
                b.copy_(mean)

    def _average(self, tensors: list[torch.Tensor], name: str) -> list[torch.Tensor]:
        """The mean over ranks of each tensor (one collective for all of them)."""
        return tensors

    def mean(self, values: Mapping[str, float]) -> dict[str, float]:
        """Average scalars over ranks (one collective for all of them)."""
        keys = sorted(values)
        if not keys:
            return {}
        if self.world_size == 1:  # no collective: Horovod's waits for its background cycle even
            # on one rank (~2.5 ms measured, paid by every log line and epoch end of a 1-rank run)
            return {k: float(values[k]) for k in keys}
        t, = self._average([torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)],
                           "hpcforge.mean")
        return dict(zip(keys, t.tolist()))

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        return obj

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def describe(self) -> str:
        return (f"backend={self.backend} launcher={self.place.launcher} ranks={self.world_size} "
                f"local_ranks={self.local_size} device={self.device}")


class HorovodDist(Dist):
    backend = "horovod"

    def __init__(self, place: Placement, device: torch.device, cfg: DistConfig):
        import horovod.torch as hvd
        self.hvd = hvd
        super().__init__(place, device, cfg)
        self._comm = _small_collectives_comm(hvd) if self.world_size > 1 else None

    def optimizer(self, opt, module, prefix, accumulate=1):
        named = [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]
        compression = self.hvd.Compression.fp16 if self.cfg.fp16_allreduce else self.hvd.Compression.none
        return self.hvd.DistributedOptimizer(opt, named_parameters=named, op=self.hvd.Average,
                                             compression=_complex_as_real(compression),
                                             backward_passes_per_step=accumulate)

    def synchronize(self, opt):
        opt.synchronize()

    def step(self, opt, scaler=None):
        with opt.skip_synchronize():  # already synchronised (Horovod's clipping recipe)
            super().step(opt, scaler)

    def broadcast(self, module, *optimizers):
        # (complex tensors as real views: Horovod refuses complex ones)
        self.hvd.broadcast_parameters({k: as_real(t) for k, t in module.state_dict().items()},
                                      root_rank=0)
        for opt in optimizers:
            # A fresh optimizer is the same on every rank. Horovod would initialise its empty state
            # with a zero-gradient step, which moves Adam's step count (bias correction) by one;
            # and its broadcast_optimizer_state refuses complex state (Adam's moments of FNO's
            # weights). Rank 0's state as an object: a resume's one-off cost.
            if opt.state_dict()["state"]:
                opt.load_state_dict(self.broadcast_object(opt.state_dict()))

    def _sync_batchnorm_class(self):
        return self.hvd.SyncBatchNorm

    def _average(self, tensors: list[torch.Tensor], name: str) -> list[torch.Tensor]:
        """The mean over ranks of each tensor: over our own communicator when there is one
        (`_small_collectives_comm`), else through Horovod."""
        if self._comm is not None:
            return _mpi_average(self._comm, tensors, self.world_size)
        return self.hvd.grouped_allreduce(tensors, op=self.hvd.Average, name=name)

    def begin_sum(self, values):
        if self.world_size == 1:
            return super().begin_sum(values)
        if self._comm is not None:
            import numpy as np
            from mpi4py import MPI
            vec = np.array(values, dtype=np.float64)
            request = self._comm.Iallreduce(MPI.IN_PLACE, vec, op=MPI.SUM)

            def finish() -> list[float]:
                request.Wait()
                return vec.tolist()
            return finish
        t = torch.tensor(values, dtype=torch.float64)
        handle = self.hvd.allreduce_async_(t, op=self.hvd.Sum, name="hpcforge.sum")

        def finish_hvd() -> list[float]:
            self.hvd.synchronize(handle)
            return t.tolist()
        return finish_hvd

    # Over our own communicator when there is one: Horovod's object collectives cost ~3 ms each
    # (two negotiated collectives and a pickle round trip), even on one rank. Horovod names them
    # after the object's type unless told: rank 0's str and another rank's None would then never
    # meet. Fixed names keep the ranks matched.
    def gather_object(self, obj):
        if self.world_size == 1:
            return [obj]
        if self._comm is not None:
            return self._comm.allgather(obj)
        return self.hvd.allgather_object(obj, name="hpcforge.gather_object")

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        if self._comm is not None:
            return self._comm.bcast(obj, root=0)
        return self.hvd.broadcast_object(obj, root_rank=0, name="hpcforge.broadcast_object")

    def barrier(self):
        self.hvd.allreduce(torch.zeros(1), name="hpcforge.barrier")

    def shutdown(self):
        self.hvd.shutdown()


def as_real(t: torch.Tensor) -> torch.Tensor:
    """A complex tensor as a real view of the same memory (a trailing axis of 2: real,
    imaginary); any other tensor as it is. Collectives on the view fill the complex tensor in
    place. Horovod has no complex types (FNO's spectral weights are complex; issue 24)."""
    return torch.view_as_real(t) if t.is_complex() else t


def _complex_as_real(inner: Any) -> Any:
    """A Horovod compression that all-reduces complex gradients as real views, then `inner`
    (none or fp16) on them; the gradient comes back complex."""
    class ComplexAsReal:
        @staticmethod
        def compress(tensor):
            compressed, ctx = inner.compress(as_real(tensor))
            return compressed, (tensor.is_complex(), ctx)

        @staticmethod
        def decompress(tensor, ctx):
            was_complex, inner_ctx = ctx
            out = inner.decompress(tensor, inner_ctx)
            return torch.view_as_complex(out.contiguous()) if was_complex else out
    return ComplexAsReal


def _swap_batchnorm(module: torch.nn.Module, cls: type[torch.nn.Module]) -> torch.nn.Module:
    """`module` with every batch norm layer replaced by a `cls` holding its parameters (the same
    Parameter objects), running statistics and mode; state_dict keys stay the same."""
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
        new = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        for name, buf in module.named_buffers(recurse=False):
            setattr(new, name, buf)
        return new.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, _swap_batchnorm(child, cls))
    return module


def _small_collectives_comm(hvd: Any) -> Any:
    """A communicator of our own for the small collectives at step boundaries, or None.

    A Horovod allreduce waits for its background thread's next negotiation cycle: 1.2 ms for a few
    KiB on 2 ranks here, once per step, while an MPI_Allreduce of the same takes 9 us. Only where
    Horovod runs on MPI with MPI_THREAD_MULTIPLE (its thread and ours then call MPI at once, each
    on its own communicator); under the Gloo controller the collectives stay Horovod's.
    """
    if not hvd.mpi_enabled():
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        return None
    return MPI.COMM_WORLD.Dup()


def _mpi_average(comm: Any, tensors: list[torch.Tensor], world_size: int) -> list[torch.Tensor]:
    from mpi4py import MPI
    return _flat_average(tensors, torch.device("cpu"),
                         lambda flat: comm.Allreduce(MPI.IN_PLACE, flat.numpy(), op=MPI.SUM), world_size)


def _flat_average(tensors: list[torch.Tensor], device: torch.device,
                  allreduce_sum: Callable[[torch.Tensor], Any], world_size: int) -> list[torch.Tensor]:
    """The mean over ranks of each tensor (any float dtype, any device), in one in-place sum of
    their float64 concatenation on `device`."""
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    allreduce_sum(flat)
    flat /= world_size
    parts = flat.split([t.numel() for t in tensors])
    return [p.view(t.shape).to(t.device, t.dtype) for p, t in zip(parts, tensors)]


class _GradientBuckets:
    """One optimizer's gradients, averaged over ranks while backward runs (as DDP's reducer does).

    The parameters are cut, last first (backward makes the last layers' gradients first), into
    buckets of about `cap` bytes. A hook on each parameter notes when its gradient is final (after
    `accumulate` backward passes); a bucket's asynchronous all-reduce starts once all its gradients
    are final and every earlier bucket has started, so all ranks issue the same collectives in the
    same order. `finish` starts the rest, waits, and writes the means back.

    A parameter without a gradient this step (a branch one rank did not take) contributes zeros,
    as Horovod does, and gets the mean like every other: the buckets are the same size on every
    rank whatever each rank's forward used (DDP needs find_unused_parameters for that).
    """

    def __init__(self, params: list[torch.nn.Parameter], all_reduce: Callable[..., Any],
                 world_size: int, accumulate: int, cap: int):
        self.all_reduce, self.world_size = all_reduce, world_size
        self.accumulate = max(1, accumulate)
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        filled = 0
        params = [p for p in params if p.requires_grad]  # what Horovod updates, too
        for p in reversed(params):
            if filled >= cap:
                self.buckets.append([])
                filled = 0
            self.buckets[-1].append(p)
            filled += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.passes: dict[int, int] = {}
        self.final = [0] * len(self.buckets)  # parameters of each bucket whose gradient is final
        self.started = 0                       # buckets whose all-reduce has started, in order
        self.pending: list[tuple[Any, torch.Tensor, list[torch.Tensor]]] = []
        for p in params:
            p.register_post_accumulate_grad_hook(self._ready)

    def _ready(self, p: torch.nn.Parameter) -> None:
        n = self.passes[id(p)] = self.passes.get(id(p), 0) + 1
        if n != self.accumulate:
            return
        self.final[self.bucket_of[id(p)]] += 1
        while self.started < len(self.buckets) and \
                self.final[self.started] == len(self.buckets[self.started]):
            self._start()

    def _start(self) -> None:
        bucket = self.buckets[self.started]
        for p in bucket:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [as_real(p.grad) for p in bucket]  # (complex ones as real views)
        self.started += 1
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(self.world_size)
        self.pending.append((self.all_reduce(flat, async_op=True), flat, grads))

    def finish(self) -> None:
        while self.started < len(self.buckets):
            self._start()
        for work, flat, grads in self.pending:
            work.wait()  # the means back into the gradients in one batched copy per bucket
            torch._foreach_copy_(grads, [part.view_as(g) for g, part in
                                         zip(grads, flat.split([g.numel() for g in grads]))])
        self.pending, self.passes, self.started = [], {}, 0
        self.final = [0] * len(self.buckets)


class TorchDist(Dist):
    """torch.distributed: gloo on CPU, nccl on GPU. Gradients are all-reduced per optimizer while
    backward runs, in buckets (`_GradientBuckets`, what DDP's reducer does); the loop calls models
    through `losses()`, not `forward()`, so a DDP module wrapper would see no forward to hook."""
    backend = "ddp"

    def __init__(self, place: Placement, device: torch.device, cfg: DistConfig):
        import torch.distributed as td
        self.td = td
        super().__init__(place, device, cfg)
        self._buckets: dict[int, _GradientBuckets] = {}
        atexit.unregister(_let_gloo_threads_finish)  # once per process, however many groups
        atexit.register(_let_gloo_threads_finish)

    def optimizer(self, opt, module, prefix, accumulate=1):
        self._buckets[id(opt)] = _GradientBuckets(list(module.parameters()), self.td.all_reduce,
                                                  self.world_size, accumulate,
                                                  int(self.cfg.bucket_mb * 2 ** 20))
        return opt

    def synchronize(self, opt):
        self._buckets[id(opt)].finish()

    def broadcast(self, module, *optimizers):
        for t in module.state_dict().values():
            self.td.broadcast(as_real(t), src=0)
        for opt in optimizers:  # optimizer state is empty before the first step; kept for resume
            state = self.broadcast_object(opt.state_dict())
            opt.load_state_dict(state)

    def _sync_batchnorm_class(self):
        return torch.nn.SyncBatchNorm  # over the default process group: every rank

    def begin_sum(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self._dev)
        work = self.td.all_reduce(t, async_op=True)

        def finish() -> list[float]:
            work.wait()
            return t.tolist()
        return finish

    def _average(self, tensors, name):
        return _flat_average(tensors, self._dev, self.td.all_reduce, self.world_size)

    def gather_object(self, obj):
        out: list[Any] = [None] * self.world_size
        self.td.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        box = [obj]
        self.td.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        self.td.barrier()

    def shutdown(self):
        self.td.barrier()  # every rank's collectives are done before the group goes
        self.td.destroy_process_group()

    @property
    def _dev(self) -> torch.device:  # nccl collectives need CUDA tensors
        return self.device if self.td.get_backend() == "nccl" else torch.device("cpu")


def _let_gloo_threads_finish() -> None:
    """At exit, before Python starts finalizing: give up the GIL for a moment. A gloo thread lets
    go of a finished collective's tensors after the caller has been woken; when Python made the
    tensor, that needs the GIL. Were the process already finalizing by then (a script that exits
    right after its last collective), the thread would be killed inside C++ and abort the
    process (SIGABRT, in ~1 of 15 2-rank runs here)."""
    time.sleep(0.05)


LOOPBACK = "127.0.0.1"


def one_node(place: Placement) -> bool:
    """Every rank on this node (a `--nproc` run, a one-node job)."""
    return place.local_size >= place.world_size


def pin_transports(place: Placement, cfg: DistConfig, env: dict[str, str] | Any = os.environ) -> None:
    """Gloo's, NCCL's and Open MPI's TCP traffic on loopback when every rank is on this node,
    else on train.dist.interface when set (issue 25); anything the user set wins. Several nodes
    and no interface set: gloo's on the interface this node reaches MASTER_ADDR by (`route_to`),
    the other libraries' their own choice. Before MPI_Init (mpi4py's import, hvd.init), which
    reads OMPI_MCA_*. Open MPI 4.1's TCP transport still listens on every address:
    btl_tcp_if_include picks the interface it talks over (docs/security.md)."""
    iface = "lo" if one_node(place) else cfg.interface
    if iface:
        env.setdefault("GLOO_SOCKET_IFNAME", iface)
        env.setdefault("NCCL_SOCKET_IFNAME", iface)
        if "OMPI_MCA_btl_tcp_if_exclude" not in env:  # (Open MPI refuses both)
            env.setdefault("OMPI_MCA_btl_tcp_if_include", iface)
    elif env.get("MASTER_ADDR") and "GLOO_SOCKET_IFNAME" not in env:
        route = route_to(env["MASTER_ADDR"])
        if route:
            env["GLOO_SOCKET_IFNAME"] = route[0]


def interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (e.g. ib0); a user error names the others."""
    import psutil
    addrs = psutil.net_if_addrs()
    found = [a.address for a in addrs.get(name, []) if a.family == socket.AF_INET]
    if not found:
        raise UserError(f"train.dist.interface={name}: no such network interface with an IPv4 "
                        f"address on {socket.gethostname()}; available: {', '.join(sorted(addrs))}")
    return found[0]


def route_to(host: str) -> tuple[str, str] | None:
    """The network interface and IPv4 address this node reaches `host` by: the kernel's route, as
    connecting a UDP socket picks it (nothing is sent). On the node that is `host`, its own
    address there. None when `host` resolves to loopback (a Debian /etc/hosts maps the node's own
    name to 127.0.1.1) or to no interface of this node's."""
    import psutil
    try:
        ip = socket.gethostbyname(host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((ip, 9))
            local = s.getsockname()[0]
    except OSError:
        return None
    if local.startswith("127."):
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == local for a in addrs):
            return name, local
    return None


def _store(place: Placement, cfg: DistConfig) -> Any:
    """Where torch.distributed's ranks meet (issue 25: PyTorch's advice is to bind the store to a
    trusted interface; its TCPStore otherwise listens on every interface).

    Every rank on one node: a FileStore in a folder only this user can open, so nothing listens
    at all (our `--nproc` launcher names it; under mpirun, rank 0 makes it and tells the others
    over MPI); given MASTER_ADDR/PORT (a one-node Slurm job), a TCPStore on loopback. Several
    nodes: a TCPStore whose rank 0 listens on one address only, on MASTER_PORT, else
    train.dist.port, else a free port shared over MPI: train.dist.interface's address, else
    MASTER_ADDR's (the address the other ranks are told), else, when that is loopback on rank 0's
    node or not given (mpirun across nodes), every address, as torch does, saying so."""
    import torch.distributed as td
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    if place.launcher == OWN_LAUNCHER:
        return td.FileStore(os.environ[RENDEZVOUS_FILE_ENV], place.world_size)
    addr, port = _rendezvous(place)
    under_mpirun = place.launcher.startswith("mpirun")
    if one_node(place) and under_mpirun:
        return td.FileStore(_shared_by_rank_0(_private_store_file), place.world_size)
    if one_node(place):
        bind = LOOPBACK
    elif cfg.interface:
        bind = interface_address(cfg.interface)
    else:
        bind = _master_address(place, addr)
    listener = socket.create_server((bind, int(port or cfg.port or 0)), backlog=4096) \
        if place.rank == 0 else None
    if addr is None:  # under mpirun: rank 0's address and port, to every rank
        addr, port = _shared_by_rank_0(lambda: (bind or socket.gethostname(),
                                                listener.getsockname()[1]))
    return td.TCPStore(LOOPBACK if one_node(place) else addr, int(port), place.world_size,
                       place.rank == 0, timeout,
                       master_listen_fd=listener.detach() if listener else None)  # its now


def _master_address(place: Placement, addr: str | None) -> str:
    """Rank 0's store address across nodes with no train.dist.interface: MASTER_ADDR's own
    address on this node, else every address ("") with one line that says how to narrow it."""
    route = route_to(addr) if addr else None
    if route:
        return route[1]
    if place.rank == 0:
        print(f"[hpcforge] rank 0's rendezvous listens on every address: MASTER_ADDR="
              f"{addr or '(unset, mpirun)'} is not an address of this node's; set "
              f"train.dist.interface (e.g. ib0) to listen on one", flush=True)
    return ""


def _rendezvous(place: Placement) -> tuple[str | None, str | None]:
    """MASTER_ADDR/PORT as the launcher gave them (torchrun; `hpcforge submit`'s jobs, where
    jobs/tasks.py exports submitit's TorchDistributedEnvironment); (None, None) under mpirun,
    where rank 0 picks them and shares them over MPI; refused under any other launcher."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        return addr, port
    if place.launcher.startswith("mpirun"):
        return None, None
    raise UserError(f"train.dist.backend=ddp under {place.launcher}: set MASTER_ADDR and "
                    f"MASTER_PORT (`hpcforge submit` sets them in its Slurm jobs), or start the "
                    f"ranks with mpirun (hpcforge train --nproc N) or torchrun")


def _private_store_file() -> str:
    """A FileStore's path in a fresh folder of mode 0700, removed when this process exits."""
    import shutil
    import tempfile
    folder = tempfile.mkdtemp(prefix="hpcforge-store-")  # 0700: only this user opens it
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return os.path.join(folder, "store")


def _shared_by_rank_0(make: Callable[[], Any]) -> Any:
    """`make()` on rank 0, broadcast to every rank over MPI (the ranks' launcher is mpirun)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    return comm.bcast(make() if comm.Get_rank() == 0 else None, root=0)


# OpenMPI, for ranks whose threads fill the CPU cores (training on CPU): a rank waiting in MPI
# yields its core instead of spinning on it. Horovod's background thread negotiates every cycle;
# spinning there starved the compute threads: 2 ranks x 1 thread on 2 cores scaled 1.2x, 1.96x
# with this (benchmarks/trainer.py). Not on GPUs: the cores are free there and polling is faster.
CPU_MPI_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "1"}


def apply_cpu_mpi_defaults(env: dict[str, str] | Any = os.environ) -> None:
    """Set CPU_MPI_DEFAULTS in `env` (keeping anything the user set) when there is no GPU."""
    if not torch.cuda.is_available():
        for k, v in CPU_MPI_DEFAULTS.items():
            env.setdefault(k, v)


def _horovod() -> Any:
    """horovod.torch, or a user error naming ddp: Horovod is optional at run time (issue 26), and
    its last release may stop building or importing against a later torch."""
    try:
        import horovod.torch as hvd
    except ImportError as e:  # not installed, hidden, or built against another torch
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"train.dist.backend=horovod but Horovod does not import here ({cause}); "
                        f"set train.dist.backend=ddp (torch.distributed trains the same), or run "
                        f"`make setup` to build Horovod") from None
    return hvd


def check_backend(cfg: DistConfig) -> None:
    """Refuse a backend this installation lacks, before any rank starts (the command calls it)."""
    if cfg.backend == "horovod":
        _horovod()


def init_distributed(cfg: DistConfig) -> Dist:
    """Start the backend, pin this rank's GPU, and check the launcher agrees about the world."""
    place = detect_launcher()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", place.local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # one GPU per rank, pinned by local rank
    if cfg.backend == "none":
        if place.world_size > 1:
            raise UserError(f"train.dist.backend=none but the launcher ({place.launcher}) started "
                            f"{place.world_size} ranks; use train.dist.backend=horovod or ddp")
        return Dist(place, device, cfg)
    if cfg.backend == "ddp":
        import torch.distributed as td
        pin_transports(place, cfg)
        # torchrun's agent already serves the store at MASTER_ADDR:PORT: join it (env://)
        meet = {"init_method": "env://"} if place.launcher == "torchrun" else \
            {"store": _store(place, cfg)}
        td.init_process_group("nccl" if cuda else "gloo", rank=place.rank,
                              world_size=place.world_size,
                              timeout=datetime.timedelta(seconds=cfg.timeout_s), **meet)
        return TorchDist(place, device, cfg)
    hvd = _horovod()
    # A rank that stops answering ends the job after timeout_s instead of hanging for ever.
    os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(max(5, cfg.timeout_s // 4)))
    os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS", str(cfg.timeout_s))
    apply_cpu_mpi_defaults()  # read by MPI_Init, which hvd.init() calls: srun launches get it too
    pin_transports(place, cfg)
    with horovod_gloo_across_nodes(place, cfg):
        hvd.init()
    place = Placement(place.launcher, hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())
    return HorovodDist(place, device, cfg)


@contextmanager
def horovod_gloo_across_nodes(place: Placement, cfg: DistConfig, env: Any = os.environ):
    """Around hvd.init() for srun's ranks on several nodes: Horovod's Gloo controller, meeting at
    a rendezvous server in rank 0 on MASTER_ADDR's address and MASTER_PORT (issue 25). On MPI,
    every rank would open Open MPI's TCP transport, which listens on every address
    (docs/security.md); Gloo's pairs listen on one interface: train.dist.interface, else the one
    each node reaches MASTER_ADDR by. Needs a MASTER_ADDR that resolves and the same number of
    ranks on every node; else, and with train.dist.launcher=mpirun, Horovod runs on MPI as
    before, and rank 0 says why in one line. The variables set for Horovod are
    removed after hvd.init(), which has read them."""
    plan = _gloo_plan(place, cfg, env)
    if plan is None:
        yield
        return
    from horovod.runner.common.util.hosts import SlotInfo
    from horovod.runner.gloo_run import create_run_env_vars, create_slot_env_vars
    (addr, bind, port, iface), nodes = plan
    tpn = place.local_size
    slots = [SlotInfo(f"node{r // tpn}", r, r % tpn, r // tpn, place.world_size, tpn, nodes)
             for r in range(place.world_size)]
    server = None
    if place.rank == 0:
        server = serve_horovod_rendezvous(bind, port, slots)
        print(f"[hpcforge] Horovod across {nodes} nodes on its Gloo controller: rendezvous on "
              f"{bind or '*'}:{port}, pairs on {iface}", flush=True)
    added = {k: str(v) for k, v in {**create_run_env_vars(addr, [iface], port),
                                    **create_slot_env_vars(slots[place.rank])}.items()
             if k not in env}
    env.update(added)
    try:
        yield
    finally:
        for k in added:
            env.pop(k, None)
        if server is not None:
            atexit.register(server.shutdown)


def serve_horovod_rendezvous(address: str, port: int, slots: list[Any]) -> Any:
    """Horovod's own rendezvous server (the one `horovodrun --gloo` runs) on (address, port),
    knowing the ranks' `slots`, serving from a daemon thread; shared by our `--nproc` launcher
    (127.0.0.1) and rank 0 of a job across nodes (MASTER_ADDR's address)."""
    from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
    server = RendezvousHTTPServer((address, port), RendezvousHandler, 0)
    server.init(slots)
    threading.Thread(target=server.serve_forever, name="horovod-rendezvous", daemon=True).start()
    return server


def _gloo_plan(place: Placement, cfg: DistConfig, env: Any
               ) -> tuple[tuple[str, str, int, str], int] | None:
    """((rendezvous address, address rank 0 listens on, port, interface), nodes) for
    `horovod_gloo_across_nodes`, or None (Horovod on MPI), with rank 0's one line saying why.
    The choice rests on what every rank sees alike (the job's variables, MASTER_ADDR's name), so
    no two ranks pick different controllers."""
    if not place.launcher.startswith("srun") or one_node(place) or cfg.launcher == "mpirun":
        return None
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    nodes = place.world_size // place.local_size
    why, ip = None, None
    if not (addr and port):
        why = "MASTER_ADDR and MASTER_PORT are not set (hpcforge submit sets them)"
    elif nodes * place.local_size != place.world_size or "," in env.get(
            "SLURM_TASKS_PER_NODE", ""):
        why = "the nodes run different numbers of ranks"
    else:
        try:
            ip = socket.gethostbyname(addr)
        except OSError:
            why = f"MASTER_ADDR={addr} does not resolve"
    if why:
        if place.rank == 0:
            print(f"[hpcforge] Horovod across nodes on MPI, whose TCP transport listens on every "
                  f"address: {why}", flush=True)
        return None
    route = route_to(addr)
    iface = cfg.interface or (route[0] if route else _any_interface())
    bind = interface_address(cfg.interface) if cfg.interface else _master_address(place, addr)
    return (ip, bind, int(port), iface), nodes


def _any_interface() -> str:
    """The first network interface that is up and not loopback (for Gloo on rank 0's node when
    MASTER_ADDR names that node by a loopback address); a user error when there is none."""
    import psutil
    up = [n for n, st in sorted(psutil.net_if_stats().items()) if st.isup and n != "lo"]
    if not up:
        raise UserError("Horovod across nodes: this node has no network interface up but lo; "
                        "set train.dist.interface (e.g. ib0)")
    return up[0]


@contextmanager
def only_grads_of(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]):
    """Let autograd make gradients for `params` only: the other networks of a multi-network model
    are frozen, so one optimizer's phase never fires another's Horovod hooks (horovod#2559)."""
    keep = {id(p) for p in params}
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)
