"""No secret reaches a file hpcforge writes: W&B files, logs, checkpoints, summary, store metadata."""
from __future__ import annotations

import pytest
from helpers import files_holding, hpcforge, small

from pipeline.core.checkpoint import load
from pipeline.core.redaction import redact

# Planted where a user puts secrets: the environment, setup lines, and config keys named like them.
ENV_SECRET = "env-s3cr3t-0001"
SECRETS = {"cluster.setup": ["export WANDB_API_KEY=setup-s3cr3t-0002",
                             "login --password setup-s3cr3t-0003", "export HF_TOKEN=setup-s3cr3t-0004"],
           "cluster.sbatch_extra.api_key": "key-s3cr3t-0005",
           "cluster.sbatch_extra.token": "token-s3cr3t-0006",
           "cluster.sbatch_extra.password": "pw-s3cr3t-0007",
           "cluster.sbatch_extra.client_secret": "sec-s3cr3t-0008"}
VALUES = [ENV_SECRET, *(f"s3cr3t-000{i}" for i in range(2, 9))]


def planted() -> list[str]:
    setup = ", ".join(SECRETS["cluster.setup"])
    return [f"cluster.setup=[{setup}]",
            *(f"{k}={v}" for k, v in SECRETS.items() if k != "cluster.setup")]


def test_redact_hides_secret_named_keys_and_assignments_and_keeps_settings():
    cfg = {"api_key": "a1", "Token": "t1", "db": {"password": "p1", "user": "me"},
           "tokens": ["x1", "x2"], "max_tokens": 64, "empty_token": "",
           "setup": ["export WANDB_API_KEY=w1", "run --token t2 --verbose", "echo keyboard"]}
    assert redact(cfg) == {"api_key": "***", "Token": "***", "db": {"password": "***", "user": "me"},
                           "tokens": ["***", "***"], "max_tokens": 64, "empty_token": "",
                           "setup": ["export WANDB_API_KEY=***", "run --token *** --verbose",
                                     "echo keyboard"]}


@pytest.mark.slow
def test_no_file_of_a_prepare_and_a_run_holds_a_planted_secret(tmp_path):
    """One rank, an offline W&B run, a checkpoint every 2 steps; then every file under the store
    and the output dir is scanned (W&B's run file, files/, logs/, checkpoints and their pickled
    config, metrics, summary), with the API key in the environment too."""
    env = {"WANDB_API_KEY": ENV_SECRET}
    r = hpcforge("prepare", *small(tmp_path), *planted(), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = hpcforge("train", *small(tmp_path)[1:], f"output_dir={tmp_path}", *planted(),
                 "train.dist.backend=none", "train.dist.nproc=1", "train.batch_size=32",
                 "train.max_steps=4", "train.checkpoint.every_steps=2", "train.logger.log_every=2",
                 "train.logger.mode=offline", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = tmp_path / "train"
    written = {p.relative_to(run).parts[0] for p in run.rglob("*") if p.is_file()}
    assert {"wandb", "checkpoints", "metrics.jsonl", "summary.json"} <= written
    assert list(run.glob("wandb/offline-run-*/logs/*.log")) and list(run.glob("wandb/offline-run-*/files/*"))
    assert files_holding(tmp_path, VALUES) == []
    cfg = load(run / "checkpoints" / "last.pt")["config"]
    assert cfg["cluster"]["sbatch_extra"] == {"api_key": "***", "token": "***", "password": "***",
                                              "client_secret": "***"}
    assert cfg["cluster"]["setup"][0] == "export WANDB_API_KEY=***"
    # resuming compares the run's config with the checkpoint's (redacted) one: still accepted
    r = hpcforge("train", *small(tmp_path)[1:], f"output_dir={tmp_path}", *planted(),
                 "train.dist.backend=none", "train.dist.nproc=1", "train.batch_size=32",
                 "train.max_steps=6", "train.resume=auto", "train.logger.mode=offline", env=env)
    assert r.returncode == 0 and "at step 4" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert files_holding(tmp_path, VALUES) == []
