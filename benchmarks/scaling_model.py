"""Data-parallel scaling on paper (issue 28, point 4): step time = compute + the all-reduce that
backward does not hide, with the all-reduce in the alpha-beta model (Hockney; Thakur et al. 2005,
"Optimization of collective communication operations in MPICH"):

    ring  T = b * 2(p-1) * alpha + 2 (p-1)/p * S / beta
    tree  T = b * 2 ceil(log2 p) * alpha + 2 * S / beta    (pipelined double binary tree, NCCL)

for S bytes of gradients sent as b fused buffers (Horovod's 64 MiB fusion buffer, ddp's buckets)
over p ranks; alpha is one message step's latency, beta the bandwidth of the slowest link a rank
uses (within a node, or the node's network). Backward overlaps the all-reduce of every buffer but
the last (Horovod's tensor fusion, ddp's buckets: a buffer goes once it is full), so what shows is
the longer of the last buffer's all-reduce (T_last: the bytes left over after the full buffers)
and what outlasts backward:

    shown(p) = max(T_last(p), T(p) - h * T_c)
    step(p)  = T_c * (1 + o[p > gpus per node]) + shown(p)

with T_c the compute step, h the share of it that can hide communication (backward, about 2/3 of
a step: twice the forward's FLOPs) and o a fixed cost of running on several nodes. A model whose
gradients fit one buffer (all of hpcforge's: < 3 MB against ddp's 25 MB buckets) hides nothing.
Weak-scaling efficiency is step(1) / step(p).

Checked against the Horovod paper (Sergeev & Del Balso 2018, arXiv:1802.05799; Horovod's
docs/benchmarks): tf_cnn_benchmarks, batch 64 per GPU, servers of 4 Pascal GPUs on a RoCE-capable
25 Gbit/s network; at 128 GPUs 90 % (Inception V3, ResNet-101) and 79 % (VGG-16), at 512 GPUs
90 % and 68 %. `paper_cluster` takes beta from the network's 25 Gbit/s, o from the 128-GPU figure
of the two 90 % models, alpha from the 128-GPU VGG-16 figure; the 512-GPU figures are then
predicted, not fitted (`paper_check`). `predict` applies the same model, with the interconnect
of `H100_CLUSTER`, to hpcforge's families: their gradient bytes counted from the models built at
their experiments' configs, their compute from FLOPs counted by torch. `this_machine` calibrates
alpha and beta on benchmarks/allreduce.py's measured rows for the 2-rank prediction beside the
bench's measured weak-scaling row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

MiB = 2 ** 20
HOROVOD_FUSION = 64 * MiB   # HOROVOD_FUSION_THRESHOLD's default
BACKWARD_SHARE = 2 / 3      # backward's FLOPs are about twice the forward's


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float        # bytes/s one way, per ring (or tree) edge
    latency: float          # s per message step (alpha)


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus_per_node: int
    intra: Link
    inter: Link
    fusion_bytes: float = HOROVOD_FUSION
    multi_node_overhead: float = 0.0   # o: a fixed share of the step on several nodes


@dataclass(frozen=True)
class Workload:
    name: str
    params: float           # trainable parameters (gradients are 4 bytes each, fp32)
    step_s: float           # compute of one step on one GPU
    source: str = ""

    @property
    def grad_bytes(self) -> float:
        return 4.0 * self.params


def allreduce_s(nbytes: float, p: int, cluster: Cluster, algo: str = "ring") -> float:
    """Seconds to all-reduce `nbytes` over `p` ranks: over the node's links within one node,
    over its network past it (the slowest link sets the pace of a ring or tree)."""
    if p <= 1:
        return 0.0
    link = cluster.intra if p <= cluster.gpus_per_node else cluster.inter
    buffers = max(1, math.ceil(nbytes / cluster.fusion_bytes))
    if algo == "ring":
        return buffers * 2 * (p - 1) * link.latency + 2 * (p - 1) / p * nbytes / link.bandwidth
    if algo == "tree":
        return buffers * 2 * math.ceil(math.log2(p)) * link.latency + 2 * nbytes / link.bandwidth
    raise ValueError(f"algo={algo!r}: expected ring or tree")


def shown_s(w: Workload, p: int, cluster: Cluster, algo: str = "ring") -> float:
    """The all-reduce time backward does not hide (module docstring)."""
    t = allreduce_s(w.grad_bytes, p, cluster, algo)
    last = w.grad_bytes - (buffers(w, cluster) - 1) * cluster.fusion_bytes
    return max(allreduce_s(last, p, cluster, algo), t - BACKWARD_SHARE * w.step_s)


def buffers(w: Workload, cluster: Cluster) -> int:
    return max(1, math.ceil(w.grad_bytes / cluster.fusion_bytes))


def step_s(w: Workload, p: int, cluster: Cluster, algo: str = "ring") -> float:
    nodes = p > cluster.gpus_per_node
    return (w.step_s * (1 + (cluster.multi_node_overhead if nodes else 0.0))
            + shown_s(w, p, cluster, algo))


def efficiency(w: Workload, p: int, cluster: Cluster, algo: str = "ring") -> float:
    """Weak scaling: samples/s per GPU on p GPUs / on one."""
    return w.step_s / step_s(w, p, cluster, algo)


# ---------------------------------------------------------------------------- the Horovod paper
# Parameters: ResNet-101 44.5 M, Inception V3 23.8 M (Szegedy et al. 2016 count 23.9 M with the
# auxiliary head), VGG-16 138.4 M (Simonyan & Zisserman 2015). Step = 64 images / P100 images/s:
# Inception V3 142 img/s is TensorFlow's published P100 figure (tensorflow.org/performance/
# benchmarks, DGX-1, batch 64, synthetic data); ResNet-101 104 img/s is Horovod's own 16-GPU
# example (1656.82 img/s / 16, docs/benchmarks); VGG-16 140 img/s is our reading of the same
# TensorFlow page (not re-fetched here: `paper_check(vgg_img_s=...)` shows how much it matters).
BATCH = 64
PAPER_PUBLISHED = {128: {"Inception V3": 0.90, "ResNet-101": 0.90, "VGG-16": 0.79},
                   512: {"Inception V3": 0.90, "ResNet-101": 0.90, "VGG-16": 0.68}}


def paper_workloads(vgg_img_s: float = 140.0) -> list[Workload]:
    return [Workload("Inception V3", 23.8e6, BATCH / 142.0, "TF benchmarks, P100"),
            Workload("ResNet-101", 44.5e6, BATCH / (1656.82 / 16), "Horovod docs, 16 GPUs"),
            Workload("VGG-16", 138.4e6, BATCH / vgg_img_s, "TF benchmarks, P100 (recalled)")]


def paper_cluster(workloads: list[Workload] | None = None) -> Cluster:
    """The paper's cluster, calibrated on its 128-GPU figures only (module docstring)."""
    inception, resnet, vgg = workloads or paper_workloads()
    base = Cluster("Horovod paper: 4 P100 per server (PCIe), RoCE 25 Gbit/s", 4,
                   intra=Link("PCIe 3.0 x16", 12e9, 5e-6), inter=Link("25 GbE RoCE", 25e9 / 8, 0.0))
    published, p, cluster = PAPER_PUBLISHED[128], 128, base
    for _ in range(50):  # o and alpha depend on each other a little: iterate to their fixed point
        # Inception V3, ResNet-101: what their 90 % loses beyond their last buffers' all-reduce
        overhead = sum(1 / published[w.name] - 1 - shown_s(w, p, cluster) / w.step_s
                       for w in (inception, resnet)) / 2
        # VGG-16: what shows of its all-reduce at 128 GPUs fixes alpha
        shown = vgg.step_s * (1 / published[vgg.name] - 1 - overhead)
        b = buffers(vgg, base)
        length = max(shown + BACKWARD_SHARE * vgg.step_s, 0.0)  # the all-reduce's length
        bandwidth_part = 2 * (p - 1) / p * vgg.grad_bytes / base.inter.bandwidth
        alpha = max(0.0, (length - bandwidth_part) / (b * 2 * (p - 1)))
        cluster = replace(base, inter=replace(base.inter, latency=alpha),
                          multi_node_overhead=overhead)
    return cluster


def paper_check(vgg_img_s: float = 140.0) -> list[dict]:
    """Predicted vs published efficiency at 128 (fitted) and 512 GPUs (predicted), ring."""
    workloads = paper_workloads(vgg_img_s)
    cluster = paper_cluster(workloads)
    return [{"model": w.name, "gpus": p, "predicted": efficiency(w, p, cluster, "ring"),
             "published": PAPER_PUBLISHED[p][w.name], "fitted": p == 128}
            for p in (128, 512) for w in workloads]


# ---------------------------------------------------------------------------- a GPU cluster
# NVIDIA DGX H100 (datasheet): 8 H100 SXM a node, NVLink 4 at 900 GB/s a GPU (450 GB/s each
# way), 8 ConnectX-7 InfiniBand NDR ports at 400 Gbit/s (50 GB/s each, 400 GB/s a node).
# alpha: 2 us a step on NVLink, 5 us on InfiniBand (NCCL's per-hop latencies are of this order;
# our assumption, stated, not measured here).
H100_CLUSTER = Cluster("DGX H100: 8 GPUs NVLink 4 (450 GB/s a way), 8x IB NDR 400 Gbit/s a node",
                       8, intra=Link("NVLink 4", 450e9, 2e-6),
                       inter=Link("8x InfiniBand NDR", 8 * 50e9, 5e-6),
                       fusion_bytes=25 * MiB)  # ddp's bucket_mb default
GPU_FLOPS = 20e12      # achieved fp32 FLOP/s: ~30 % of an H100 SXM's 67 TFLOP/s
GPU_FLOOR_S = 1e-3     # steps of these small models are launch-bound: about 1 ms (issue 28)
GPUS = (2, 4, 8, 16, 32, 64, 128, 256, 512)

# hpcforge's families on the Ising data, at their experiments' configs (configs/experiment);
# not wgan_gp: torch's FlopCounterMode cannot follow its gradient penalty's double backward
FAMILIES = {"vae": "vae_ising2d", "gan": "gan_ising2d", "dcgan": "dcgan_ising2d", "cnn": "cnn_ising2d", "resnet": "resnet_ising2d",
            "autoencoder": "autoencoder_ising2d", "aae": "aae_ising2d"}


def family_workload(family: str, experiment: str) -> Workload:
    """Parameters and FLOPs of one training step (every phase, n_critic repeats included) of the
    family at its experiment's config and batch, on a 32x32 Ising batch; the GPU step is
    FLOPs / GPU_FLOPS, at least GPU_FLOOR_S."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.config import load_config
    from pipeline.train.assembly import build_model
    cfg = load_config(experiment)
    torch.manual_seed(0)
    model = build_model(cfg)
    b = cfg.train.batch_size
    batch = {"x": torch.randint(0, 2, (b, 1, 32, 32)).float() * 2 - 1,
             "y": torch.randint(0, 2, (b,))}
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    schedule = model.schedule
    with FlopCounterMode(display=False) as counter:
        for spec in model.optimizers():
            for _ in range(schedule.get(spec.name, 1)):
                model.zero_grad()
                model.losses(batch, spec.name)["loss"].backward()
    flops = counter.get_total_flops()
    return Workload(family, params, max(flops / GPU_FLOPS, GPU_FLOOR_S),
                    f"{flops / 1e9:.2f} GFLOP a step")


def predict(workloads: list[Workload], cluster: Cluster = H100_CLUSTER) -> list[dict]:
    """Each family's efficiency at each GPU count, ring and tree, with its gradient bytes per
    second of compute (what decides who stops scaling first)."""
    return [{"family": w.name, "params": w.params, "step_ms": 1e3 * w.step_s,
             "grad_mb_per_ms": w.grad_bytes / MiB / (1e3 * w.step_s),
             **{f"{algo}@{p}": efficiency(w, p, cluster, algo) for algo in ("ring", "tree")
                for p in GPUS}}
            for w in sorted(workloads, key=lambda w: -w.grad_bytes / w.step_s)]


# ---------------------------------------------------------------------------- this machine
def this_machine(allreduce_rows: list[dict]) -> Cluster:
    """alpha and beta of 2 ranks here, fitted (least squares) on the bare MPI Allreduce times of
    benchmarks/allreduce.py's rows (MB/s of 1, 16 and 64 MB buffers): t = 2 alpha + S / beta."""
    sizes = [float(r["case"].split()[0]) * MiB for r in allreduce_rows]
    times = [s / MiB / r["baseline"] for s, r in zip(sizes, allreduce_rows)]
    n, mean_s, mean_t = len(sizes), sum(sizes) / len(sizes), sum(times) / len(times)
    slope = (sum((s - mean_s) * (t - mean_t) for s, t in zip(sizes, times))
             / sum((s - mean_s) ** 2 for s in sizes))
    if slope <= 0:  # (noise: larger buffers no slower) all bandwidth, at the best seen
        slope = min(t / s for s, t in zip(sizes, times))
    alpha = max(0.0, (mean_t - slope * mean_s) / 2)
    link = Link("shared memory (MPI, measured)", 1 / slope, alpha)
    return Cluster(f"this machine, 2 ranks ({n} sizes)", 2, intra=link, inter=link,
                   fusion_bytes=HOROVOD_FUSION)


def two_rank_prediction(params: float, step_s_one: float, allreduce_rows: list[dict]) -> float:
    """Predicted 2-rank / 1-rank samples/s (2 x efficiency) from communication alone."""
    w = Workload("measured", params, step_s_one)
    return 2 * efficiency(w, 2, this_machine(allreduce_rows), "ring")


def main() -> None:
    print("Horovod paper, ring all-reduce (128: alpha and o fitted there; 512: predicted)")
    cluster = paper_cluster()
    print(f"  fitted alpha {cluster.inter.latency * 1e6:.1f} us, multi-node cost "
          f"{cluster.multi_node_overhead:.3f} of a step")
    for r in paper_check():
        print(f"  {r['model']:<13} {r['gpus']:>4} GPUs  predicted {r['predicted']:.3f}  "
              f"published {r['published']:.2f}{'  (fitted)' if r['fitted'] else ''}")
    print(f"\n{H100_CLUSTER.name}; GPU step = max(FLOPs / {GPU_FLOPS / 1e12:.0f} TFLOP/s, "
          f"{GPU_FLOOR_S * 1e3:.0f} ms)")
    rows = predict([family_workload(f, e) for f, e in FAMILIES.items()])
    head = "  family        params  step ms  MB/ms " + " ".join(f"{p:>5}" for p in GPUS)
    print(head)
    for algo in ("ring", "tree"):
        print(f"  {algo}")
        for r in rows:
            print(f"  {r['family']:<12} {r['params'] / 1e6:6.2f}M {r['step_ms']:7.2f} "
                  f"{r['grad_mb_per_ms']:6.2f} " + " ".join(f"{r[f'{algo}@{p}']:5.2f}" for p in GPUS))


if __name__ == "__main__":
    main()
