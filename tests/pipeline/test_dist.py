"""Rank discovery from each launcher's environment (pure: the variables the launchers set)."""
from __future__ import annotations

import pytest

from pipeline.runtime.dist import detect_launcher
from pipeline.runtime.launch import mpirun_command


@pytest.mark.parametrize("env, expected", [
    ({}, ("single process", 0, 1, 0, 1)),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, ("mpirun (OpenMPI)", 3, 4, 1, 2)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
      "SLURM_NTASKS_PER_NODE": "4(x2)"}, ("srun (Slurm)", 5, 8, 1, 4)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, ("single process", 0, 1, 0, 1)),  # batch script
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
     ("torchrun", 1, 2, 1, 2)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
      "HPCFORGE_LOCAL_RANKS": "1"}, ("hpcforge --nproc", 1, 2, 1, 2)),  # our own ranks (ddp)
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2",
      "HPCFORGE_LOCAL_RANKS": "1"}, ("hpcforge --nproc", 1, 2, 1, 2)),  # (Horovod on Gloo)
    ({"HOROVOD_RANK": "0", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "0",
      "HOROVOD_LOCAL_SIZE": "2"}, ("horovodrun", 0, 2, 0, 2)),
])
def test_launcher_detection(env, expected):
    p = detect_launcher(env)
    assert (p.launcher, p.rank, p.world_size, p.local_rank, p.local_size) == expected


def test_mpirun_line_needs_no_user_flags():
    cmd = mpirun_command(2, ["train", "-e", "demo"])
    assert cmd[1:5] == ["-np", "2", "--oversubscribe", "--bind-to"]
    assert cmd[-5:] == ["-m", "hpcforge", "train", "-e", "demo"]


def test_cpu_ranks_yield_in_mpi_waits_and_gpu_ranks_keep_polling_gpu_mocked(monkeypatch):
    """No GPU here: torch.cuda.is_available is mocked for the GPU case."""
    import torch

    from pipeline.runtime.dist import apply_cpu_mpi_defaults
    from pipeline.runtime.launch import mpi_env
    env: dict[str, str] = {}
    apply_cpu_mpi_defaults(env)
    assert env == {"OMPI_MCA_mpi_yield_when_idle": "1"}
    mine = {"OMPI_MCA_mpi_yield_when_idle": "0"}
    apply_cpu_mpi_defaults(mine)
    assert mine == {"OMPI_MCA_mpi_yield_when_idle": "0"}            # the user's choice stays
    monkeypatch.delenv("OMPI_MCA_mpi_yield_when_idle", raising=False)
    assert mpi_env()["OMPI_MCA_mpi_yield_when_idle"] == "1"         # our own mpirun launches
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu: dict[str, str] = {}
    apply_cpu_mpi_defaults(gpu)
    assert gpu == {} and "OMPI_MCA_mpi_yield_when_idle" not in mpi_env()


def test_transports_talk_over_loopback_on_one_node_and_over_the_interface_across_nodes():
    """Issue 25: gloo's, NCCL's and Open MPI's TCP traffic (the variables they read at start)."""
    from pipeline.config import DistConfig
    from pipeline.runtime.dist import Placement, pin_transports
    one, two_nodes = Placement("mpirun", 0, 2, 0, 2), Placement("srun (Slurm)", 0, 4, 0, 2)
    names = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "OMPI_MCA_btl_tcp_if_include")
    for place, cfg, iface in [(one, DistConfig(), "lo"), (one, DistConfig(interface="ib0"), "lo"),
                              (two_nodes, DistConfig(interface="ib0"), "ib0")]:
        env: dict[str, str] = {}
        pin_transports(place, cfg, env)
        assert env == dict.fromkeys(names, iface)
    env = {}
    pin_transports(two_nodes, DistConfig(), env)
    assert env == {}  # no interface set: each library's own choice
    env = {"OMPI_MCA_btl_tcp_if_exclude": "eth0", "NCCL_SOCKET_IFNAME": "ib1"}
    pin_transports(two_nodes, DistConfig(interface="ib0"), env)
    assert env == {"OMPI_MCA_btl_tcp_if_exclude": "eth0", "NCCL_SOCKET_IFNAME": "ib1",
                   "GLOO_SOCKET_IFNAME": "ib0"}  # the user's settings stay


def _on_two_ranks(worker: str, tmp_path) -> dict:
    """Run tests/pipeline/`worker`.py on 2 ranks; what they wrote, checked to be the same."""
    import json
    import subprocess

    from helpers import ROOT

    from pipeline.runtime.launch import mpi_env
    out = tmp_path / "out"
    r = subprocess.run(mpirun_command(2, [str(out)], module=worker),
                       cwd=ROOT / "tests" / "pipeline", env=mpi_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    ranks = [json.loads(out.with_name(f"out.{i}").read_text()) for i in (0, 1)]
    assert ranks[0] == ranks[1]
    return ranks[0]


@pytest.mark.mpi
def test_step_boundary_collectives_on_two_horovod_ranks_over_their_own_communicator(tmp_path):
    """2 real ranks: buffers averaged, sums (one rank's flag seen by both, rank 0's proposal),
    metrics averaged, all through a Dup of COMM_WORLD (not Horovod's negotiated allreduce); a sum
    left in flight while other collectives run; object gather and broadcast."""
    got = _on_two_ranks("collectives_worker", tmp_path)
    assert got["own_comm"] is True and got["quiet"] == [0.0, 7.0] and got["flagged"] == [1.0, 0.0]
    assert got["averaged"] == [[0.5] * 3, [3.0] * 3]
    assert got["tracked"] == 0                                     # integer buffers untouched
    assert got["means"] == {"loss": 1.5, "lr": 0.25}
    assert got["during"] == {"x": 5.0} and got["overlapped"] == [1.0, 6.0]
    assert got["overlapped_mean"] == [2.0] * 3
    assert got["gathered"] == [{"rank": 0}, {"rank": 1}] and got["broadcast"] == "rank 0's"


@pytest.mark.mpi
def test_ddp_gradients_are_all_reduced_in_buckets_while_backward_runs(tmp_path):
    """2 gloo ranks, 256-byte buckets (3 of them): every bucket has started when backward returns
    (before synchronize), in order on both ranks; the result equals one flat mean bit for bit. With
    accumulate=2 nothing starts after the first pass, all after the second, and the sum of two
    equal passes is twice one pass. A layer only one rank used is averaged with zeros from the
    other, as Horovod does, instead of leaving the ranks' buckets different sizes."""
    got = _on_two_ranks("buckets_worker", tmp_path)
    assert got["buckets"] == 3 and got["started"] == [3] and got["again"] == [3]
    assert got["equal"] is True
    assert got["acc_started"] == [0, 3] and got["acc_equal"] is True
    # a parameter only rank 1 used: rank 0 sends zeros, both get rank 1's gradient / 2
    assert got["unused_had_grad"] == [False, True] and got["unused_mean"] is True


def _two_rank_dist(cls, device: str, **cfg):
    """A `cls` for rank 0 of 2 on `device`, built without starting its backend (no collectives
    are called): enough to test what sync_batchnorm does before training starts."""
    import horovod.torch as hvd
    import torch
    import torch.distributed as td

    from pipeline.config import DistConfig
    from pipeline.runtime.dist import Dist, Placement
    dist = cls.__new__(cls)
    Dist.__init__(dist, Placement("test", 0, 2, 0, 2), torch.device(device), DistConfig(**cfg))
    dist.hvd, dist.td = hvd, td
    return dist


def _vae():
    from models import MODELS
    cfg_cls, build = MODELS["vae"]
    return build(cfg_cls(image_size=16))


def test_sync_batchnorm_on_cpu_ranks_is_refused_with_the_fix():
    from pipeline.core.errors import UserError
    from pipeline.runtime.dist import HorovodDist
    with pytest.raises(UserError, match=r"train.dist.sync_batchnorm=true: SyncBatchNorm .* CUDA "
                                        r"only, and rank 0 is on cpu; set "
                                        r"train.dist.sync_batchnorm=false on CPU"):
        _two_rank_dist(HorovodDist, "cpu", sync_batchnorm=True).sync_batchnorm(_vae())
    model = _vae()  # off (the default): untouched
    assert _two_rank_dist(HorovodDist, "cpu").sync_batchnorm(model) is model


@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_sync_batchnorm_swaps_every_batch_norm_keeping_its_state_gpu_mocked(backend):
    """No GPU here: the rank's device is named cuda:0 but nothing runs on it. The backend's
    SyncBatchNorm replaces each BatchNorm with the same Parameter objects, statistics and mode."""
    import horovod.torch as hvd
    import torch

    from pipeline.runtime.dist import HorovodDist, TorchDist
    cls, sync = ((HorovodDist, hvd.SyncBatchNorm) if backend == "horovod"
                 else (TorchDist, torch.nn.SyncBatchNorm))
    model = _vae()
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(bns) >= 2
    with torch.no_grad():
        for m in bns.values():
            m.running_mean.uniform_()
            m.num_batches_tracked += 7
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    model.encoder.eval()
    out = _two_rank_dist(cls, "cuda:0", sync_batchnorm=True).sync_batchnorm(model)
    swapped = {n: m for n, m in out.named_modules() if isinstance(m, sync)}
    assert sorted(swapped) == sorted(bns)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in out.modules())
    assert all(p is params[n] for n, p in out.named_parameters())
    after = out.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(m.training == n.startswith("decoder") for n, m in swapped.items())


def test_ddp_rendezvous_takes_the_address_it_is_given_and_knows_no_scheduler(monkeypatch):
    """dist asks no scheduler (no scontrol): MASTER_ADDR/PORT come from the launcher, or from
    `hpcforge submit`'s jobs (jobs/tasks.py, submitit); without them srun ranks are refused."""
    from pipeline.core.errors import UserError
    from pipeline.runtime.dist import _rendezvous
    srun = detect_launcher({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
                            "SLURM_STEP_ID": "0", "SLURM_NTASKS_PER_NODE": "1(x2)"})
    monkeypatch.setenv("MASTER_ADDR", "n1")
    monkeypatch.setenv("MASTER_PORT", "29512")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert _rendezvous(srun) == ("n1", "29512")
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(UserError, match=r"backend=ddp under srun \(Slurm\): set MASTER_ADDR and "
                                        r"MASTER_PORT \(`hpcforge submit` sets them"):
        _rendezvous(srun)


def test_node_is_slurms_name_for_it_else_the_host():
    import socket

    from pipeline.runtime.dist import node_name
    assert node_name({"SLURMD_NODENAME": "n2"}) == "n2"
    assert node_name({}) == socket.gethostname()


def _two_node_store(monkeypatch, address: str, cfg) -> list[tuple[str, int]]:
    """Ranks 0 and 1 of a 2-node run (one rank per node, srun's variables), MASTER_ADDR=`address`
    and a free MASTER_PORT, meet through `_store` in two threads; the (address, port) rank 0's
    store listens on, after a key set by rank 0 was read by rank 1."""
    import os
    import socket
    import threading

    from helpers import listening

    from pipeline.runtime.dist import Placement, _store
    with socket.socket() as s:
        s.bind((address, 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", address)
    monkeypatch.setenv("MASTER_PORT", str(port))
    stores = {}

    def rank(r: int) -> None:
        stores[r] = _store(Placement("srun (Slurm)", r, 2, 0, 1), cfg)  # one rank per node
    other = threading.Thread(target=rank, args=(1,))
    other.start()
    rank(0)
    other.join(20)
    stores[0].set("k", "v")
    assert stores[1].get("k") == b"v"
    return [(ip, p) for _, ip, p in listening([os.getpid()]) if p == port]


def test_ranks_on_several_nodes_meet_on_the_configured_interface_only(monkeypatch):
    """train.dist.interface: rank 0's store listens on that interface's address alone (here lo
    stands for ib0), on MASTER_PORT; the other ranks connect to MASTER_ADDR."""
    from pipeline.config import DistConfig
    got = _two_node_store(monkeypatch, "127.0.0.1", DistConfig(backend="ddp", interface="lo",
                                                                timeout_s=20))
    assert [ip for ip, _ in got] == ["127.0.0.1"]


def test_ranks_on_several_nodes_with_no_interface_set_meet_on_master_addrs_address_only(
        monkeypatch, capsys):
    """Issue 25: with no train.dist.interface, rank 0's store listens on MASTER_ADDR's address
    alone (the one the other ranks are told), not on every address as torch's TCPStore does, and
    gloo talks over the interface that holds it. Before, it listened on 0.0.0.0."""
    from helpers import network_address

    from pipeline.config import DistConfig
    from pipeline.runtime.dist import Placement, pin_transports
    iface, address = network_address()
    cfg = DistConfig(backend="ddp", timeout_s=20)
    assert [ip for ip, _ in _two_node_store(monkeypatch, address, cfg)] == [address]
    assert "every address" not in capsys.readouterr().out
    env = {"MASTER_ADDR": address}
    pin_transports(Placement("srun (Slurm)", 1, 2, 0, 1), cfg, env)
    assert env == {"MASTER_ADDR": address, "GLOO_SOCKET_IFNAME": iface}


def test_a_master_addr_that_is_loopback_on_rank_0s_node_listens_everywhere_and_says_so(capsys):
    """A node whose /etc/hosts maps its own name to 127.0.1.1 (Debian's default): binding there
    would shut the other nodes out, so rank 0 keeps torch's every-address store and says how to
    narrow it; gloo is left to its own choice."""
    from pipeline.config import DistConfig
    from pipeline.runtime.dist import Placement, _master_address, pin_transports
    assert _master_address(Placement("srun (Slurm)", 0, 2, 0, 1), "localhost") == ""
    assert capsys.readouterr().out == (
        "[hpcforge] rank 0's rendezvous listens on every address: MASTER_ADDR=localhost is not "
        "an address of this node's; set train.dist.interface (e.g. ib0) to listen on one\n")
    env = {"MASTER_ADDR": "127.0.1.1"}
    pin_transports(Placement("srun (Slurm)", 0, 2, 0, 1), DistConfig(), env)
    assert env == {"MASTER_ADDR": "127.0.1.1"}
