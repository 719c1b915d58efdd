"""A real 2-rank Horovod run over MPI (mpirun, CPU), logging to a real offline W&B run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import files_holding, hpcforge
from wandb_records import history, run_config

from pipeline.core.checkpoint import load

pytestmark = [pytest.mark.mpi, pytest.mark.slow]


@pytest.fixture(scope="module")
def run(small_store):
    path, overrides = small_store
    r = hpcforge("train", "--nproc", "2", *overrides, "train.dist.launcher=mpirun",  # on MPI
                 "train.epochs=3", "train.batch_size=32",
                 "train.logger.log_every=4", "train.logger.images_every=8",
                 "train.lr=0.002", "cluster.setup=[export WANDB_API_KEY=s3cr3t-value]", timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = Path(overrides[0].split("=", 1)[1]) / "train"
    return r, out, json.loads((out / "summary.json").read_text())


def test_two_horovod_ranks_over_mpi_end_with_identical_weights(run):
    r, out, summary = run
    assert summary["ranks"] == 2 and summary["launcher"] == "mpirun (OpenMPI)"
    digests = summary["weights_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert "backend=horovod launcher=mpirun (OpenMPI) ranks=2" in r.stdout


def test_loss_falls(run):
    history_ = run[2]["history"]
    first, last = history_[0]["train/model/loss"], history_[-1]["train/model/loss"]
    assert last < 0.9 * first, (first, last)
    assert history_[-1]["val/loss"] < history_[0]["val/loss"]


def test_each_rank_reads_its_own_part(run):
    # 512 train samples / 2 ranks / batch 32 = 8 steps per epoch, 3 epochs
    assert run[2]["steps"] == 24


def test_rank0_checkpoint_is_complete_and_loads_safely(run):
    _, out, summary = run
    ckpt = load(summary["checkpoint"])
    assert ckpt["step"] == 24 and ckpt["model_name"] == "vae"
    assert ckpt["config"]["train"]["epochs"] == 3                    # resolved config inside
    assert ckpt["loader"] == {"epoch": 3, "batch": 0}
    assert set(ckpt["dataset"]["checksums"]) >= {"train/0"}
    assert ckpt["wandb_run_id"] and ckpt["versions"]["horovod"] == "0.28.1"
    assert not list((out / "checkpoints").glob(".*tmp*"))             # no temp file left behind


def test_offline_wandb_run_holds_metrics_images_and_config(run):
    _, out, summary = run
    run_dir = Path(summary["wandb_run"])
    assert run_dir.name.startswith("offline-run-")
    (run_file,) = run_dir.glob("run-*.wandb")
    rows = history(run_file)
    keys = set().union(*rows)
    scalars = ("train/model/loss", "train/model/recon", "train/model/kl", "opt/model/lr",
               "opt/model/grad_norm", "perf/samples_per_s", "perf/step_time_s",
               "perf/data_wait_fraction", "train/nonfinite_steps", "dist/ranks", "dist/nodes")
    for key in (*scalars, "val/loss", "images/reconstructions/path", "images/samples/path",
                "images/observables/path", "physics/w1/magnetization", "physics/w1/energy"):
        assert key in keys, key
    logged = [row for row in rows if "perf/samples_per_s" in row]
    assert [row["_step"] for row in logged] == [4, 8, 12, 16, 20, 24]   # once per logging step
    assert all(set(scalars) <= set(row) for row in logged)               # every scalar each time
    assert logged[0]["dist/ranks"] == 2
    images = list((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert any("samples" in p.name for p in images) and any("reconstr" in p.name for p in images)
    cfg = run_config(run_file)
    assert cfg["train"]["epochs"] == 3 and cfg["model"]["name"] == "vae"
    assert cfg["cluster"]["setup"] == ["export WANDB_API_KEY=***"]       # secrets redacted
    # not in any file of the run either: W&B's files/ and logs/, checkpoints, metrics, summary
    assert files_holding(out, ["s3cr3t-value"]) == []
    assert cfg["dataset"]["source"] == "ising2d" and cfg["versions"]["horovod"] == "0.28.1"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["step"] == 4
