"""The alpha-beta scaling model (benchmarks/scaling_model.py, issue 28 point 4): its all-reduce
formulas, its fit to this machine's rows, and the Horovod paper's 512-GPU efficiencies it must
reproduce from a calibration on the 128-GPU ones."""
from __future__ import annotations

import pytest

from benchmarks.scaling_model import (H100_CLUSTER, MiB, Cluster, Link, Workload, allreduce_s,
                                      efficiency, paper_check, this_machine, two_rank_prediction)

TOLERANCE = 0.06  # efficiency points at 512 GPUs, predicted from the 128-GPU calibration


def test_the_paper_512_gpu_efficiencies_are_reproduced_from_the_128_gpu_calibration():
    rows = {(r["model"], r["gpus"]): r for r in paper_check()}
    for (model, gpus), r in rows.items():
        tol = 0.01 if r["fitted"] else TOLERANCE
        assert r["predicted"] == pytest.approx(r["published"], abs=tol), (model, gpus, r)
    # VGG-16 (138 M parameters for the compute of a ResNet-101) is the one that stops scaling
    at_512 = {m: r["predicted"] for (m, g), r in rows.items() if g == 512}
    assert min(at_512, key=at_512.get) == "VGG-16"
    assert at_512["VGG-16"] < 0.75 < min(at_512["ResNet-101"], at_512["Inception V3"])


def test_ring_and_tree_all_reduce_times_follow_alpha_beta():
    link = Link("l", 1e9, 1e-5)
    c = Cluster("c", 8, link, link, fusion_bytes=64 * MiB)
    s = 10 * MiB
    assert allreduce_s(s, 1, c) == 0
    assert allreduce_s(s, 2, c, "ring") == pytest.approx(2 * 1e-5 + s / 1e9)
    assert allreduce_s(s, 8, c, "ring") == pytest.approx(14 * 1e-5 + 2 * 7 / 8 * s / 1e9)
    assert allreduce_s(s, 8, c, "tree") == pytest.approx(6 * 1e-5 + 2 * s / 1e9)
    # past the fusion buffer, each buffer pays the latency again: linear in whole buffers
    assert allreduce_s(256 * MiB, 8, c, "ring") == pytest.approx(4 * allreduce_s(64 * MiB, 8, c))


def test_small_gradients_stop_scaling_on_ring_latency_and_tree_keeps_them():
    small = Workload("1 ms step, 1 MB of gradients", 0.25e6, 1e-3)
    assert efficiency(small, 8, H100_CLUSTER, "ring") > 0.95     # NVLink, one node
    assert efficiency(small, 512, H100_CLUSTER, "ring") < 0.3    # 1022 message steps of 5 us
    assert efficiency(small, 512, H100_CLUSTER, "tree") > 0.85   # 18 steps
    big = Workload("1 ms step, 400 MB", 100e6, 1e-3)             # bandwidth-bound instead
    assert efficiency(big, 512, H100_CLUSTER, "tree") < efficiency(small, 512, H100_CLUSTER, "tree")


def test_this_machine_fit_recovers_alpha_and_beta_from_allreduce_rows():
    alpha, beta = 50e-6, 2e9
    rows = [{"case": f"{mb} MB x 2 ranks", "baseline": mb / (2 * alpha + mb * MiB / beta)}
            for mb in (1, 16, 64)]
    link = this_machine(rows).intra
    assert link.latency == pytest.approx(alpha, rel=1e-6)
    assert link.bandwidth == pytest.approx(beta, rel=1e-6)
    # 175k parameters (the bench's ResNet), 50 ms a step: communication alone costs ~nothing
    assert two_rank_prediction(175e3, 0.05, rows) == pytest.approx(2.0, abs=0.05)
