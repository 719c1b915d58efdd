"""jobs/ without a scheduler: validation, executor parameters, sweep expansion, the debug executor."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jobs.executor import (container_python, make_executor, slurm_parameters, tasks_per_node,
                           validate)
from jobs.sweep import expand, split_values
from pipeline.config import CONFIG_DIR, available, load_config
from pipeline.core.errors import UserError

ROOT = CONFIG_DIR.parent


def cluster(*overrides: str):
    return load_config("demo", list(overrides)).cluster


@pytest.mark.parametrize("name", available("cluster"))
def test_every_cluster_profile_composes_and_validates_offline(name):
    c = cluster(f"cluster={name}")
    validate(c, "local")  # the checks that need no Slurm
    params = slurm_parameters(c, "x")
    assert params["tasks_per_node"] == tasks_per_node(c) >= 1


def test_gpu_profile_asks_one_rank_per_gpu_under_srun_pmix():
    c = cluster("cluster=gpu_cluster", "cluster.nodes=8", "cluster.account=proj")
    p = slurm_parameters(c, "train")
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"]) == (8, 4, 4)
    assert p["slurm_account"] == "proj" and p["slurm_srun_args"] == ["--mpi=pmix"]
    assert p["slurm_signal_delay_s"] == c.signal_delay_s
    assert p["slurm_additional_parameters"]["kill-on-invalid-dep"] == "yes"
    local = slurm_parameters(cluster("cluster=local_slurm"), "train")
    assert "export OMPI_MCA_btl=self,tcp" in local["slurm_setup"] and "gpus_per_node" not in local


def test_slurm_commands_fixture_installs_the_client_tools(slurm_commands):
    """The install-only fixture the two tests below rely on gives a real, runnable `srun`."""
    assert os.path.basename(slurm_commands) == "srun" and os.access(slurm_commands, os.X_OK)
    # srun itself cannot run without a slurm.conf; ask dpkg which package owns it instead
    r = subprocess.run(["dpkg-query", "-S", os.path.realpath(slurm_commands)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("slurm-client: "), r.stdout + r.stderr


def test_sbatch_script_carries_every_resource_setting(tmp_path, slurm_commands):
    c = cluster("cluster=gpu_cluster", "cluster.qos=high", "cluster.constraint=a100",
                "cluster.mem_gb=64", "cluster.sbatch_extra.comment=hpcforge")
    ex = make_executor(c, "slurm", tmp_path, "train", binds=[])
    text = ex._executor._make_submission_file_text("CMD", "uid")
    for flag in ("--partition=gpu", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                 "--cpus-per-task=8", "--qos=high", "--constraint=a100", "--mem=64GB",
                 "--time=720", "--signal=USR2@300", "--comment=hpcforge", "--kill-on-invalid-dep=yes"):
        assert f"#SBATCH {flag}" in text, flag
    assert "srun --unbuffered" in text and "--mpi=pmix" in text and "export NCCL_DEBUG=WARN" in text


def test_container_runs_ranks_under_apptainer_with_data_and_outputs_bound(tmp_path, slurm_commands):
    image = tmp_path / "hpcforge.sif"
    image.write_text("")
    c = cluster("cluster=gpu_cluster", f"cluster.container={image}", "cluster.binds=[/scratch]")
    cmd = container_python(c, [str(tmp_path / "data"), str(tmp_path / "out")])
    assert cmd.startswith("apptainer exec --nv --bind ") and cmd.endswith(f"{image} python")
    assert f"{tmp_path / 'data'}" in cmd and f"{tmp_path / 'out'}" in cmd and "/scratch" in cmd
    ex = make_executor(c, "slurm", tmp_path, "train", binds=[str(tmp_path / "out")])
    assert "apptainer exec --nv" in ex._executor._make_submission_file_text(ex._executor._submitit_command_str, "u")
    with pytest.raises(UserError, match="cluster.container=/nope.sif: no such image file"):
        validate(cluster("cluster.container=/nope.sif"), "local")


@pytest.mark.parametrize("setting, message", [
    ("cluster.nodes=0", "cluster.nodes=0: expected at least 1 node; set cluster.nodes=1 or more"),
    ("cluster.timeout_min=1", "cluster.timeout_min=1 is too short to checkpoint"),
    ("cluster.cpus_per_task=0", "cluster.cpus_per_task=0: expected at least 1"),
])
def test_bad_settings_are_named(setting, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        validate(cluster("cluster=local_slurm", setting), "local")


def test_one_rank_per_gpu_is_enforced():
    with pytest.raises(UserError, match="one rank per GPU"):
        validate(cluster("cluster.gpus_per_node=4", "cluster.tasks_per_node=2"), "local")


def test_sweep_grid_times_tasks():
    assert split_values("a,[1,2],b") == ["a", "[1,2]", "b"]
    tasks = expand(["model=vae,autoencoder", "train.seed=0,1"], [])
    assert len(tasks) == 4 and ["model=autoencoder", "train.seed=1"] in tasks
    tasks = expand(["train.seed=0,1"], ["model=gan model.data_shape=[1,16,16]", "model=vae"])
    assert tasks[0] == ["train.seed=0", "model=gan", "model.data_shape=[1,16,16]"] and len(tasks) == 4
    with pytest.raises(UserError, match="nothing to sweep"):
        expand([], [])
    with pytest.raises(UserError, match="expected key=v1,v2"):
        expand(["train.seed"], [])


def test_sweep_refuses_a_bad_task_before_submitting(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcforge", "sweep", "cluster=local_slurm",
                        f"cluster.jobs_dir={tmp_path}", "--grid", "train.epochz=1,2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown key train.epochz" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["submit", "sweep", "status", "logs", "cancel"])
def test_job_commands_answer_help(command):
    r = subprocess.run([sys.executable, "-m", "hpcforge", command, "--help"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: hpcforge {command}")


def test_status_of_unknown_job_lists_what_exists(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcforge", "status", "999", "--jobs-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "job 999: no record" in r.stderr


def test_chaining_needs_slurm(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hpcforge", "submit", "cluster=local",
                        "--stages", "prepare,train"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "chaining needs Slurm" in r.stderr


def _submit(small_store, tmp_path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """`hpcforge submit --json` of the small dataset's training into tmp_path/run, its submitit
    folder tmp_path/jobs; the finished command and its one job, failing on a non-zero exit."""
    store, overrides = small_store
    r = subprocess.run([sys.executable, "-m", "hpcforge", "submit", *overrides[1:],
                        f"data.path={store}", f"output_dir={tmp_path / 'run'}",
                        f"cluster.jobs_dir={tmp_path / 'jobs'}", "train.batch_size=16", *extra,
                        "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    [job] = json.loads(r.stdout.strip().splitlines()[-1])
    return r, job


@pytest.mark.slow
def test_debug_executor_trains_in_process(small_store, tmp_path):
    r, job = _submit(small_store, tmp_path, "cluster=debug", "train.dist.nproc=1",
                     "train.max_steps=3")
    assert job["backend"] == "debug" and "3 steps on 1 ranks" in r.stderr
    assert (tmp_path / "run" / "train" / "summary.json").is_file()
    record = json.loads(open(job["record"]).read())
    assert record["config"]["output_dir"] == str(tmp_path / "run")


@pytest.mark.slow
def test_job_record_and_run_hold_no_planted_secret(small_store, tmp_path):
    """Secrets in setup lines and secret-named keys reach the job (it needs them) but not its
    record (job.json, which `hpcforge status` reads) nor any file the run writes."""
    from helpers import files_holding
    secrets = ["setup-s3cr3t-01", "key-s3cr3t-02", "token-s3cr3t-03"]
    _, job = _submit(small_store, tmp_path, "cluster=debug", "train.dist.nproc=1",
                     "train.max_steps=2", "train.logger.mode=offline",
                     f"cluster.setup=[export WANDB_API_KEY={secrets[0]}]",
                     f"cluster.sbatch_extra.api_key={secrets[1]}",
                     f"cluster.sbatch_extra.token={secrets[2]}")
    record = json.loads(open(job["record"]).read())
    assert record["cluster"]["sbatch_extra"] == {"api_key": "***", "token": "***"}
    assert any("WANDB_API_KEY=***" in a for a in record["command"])
    assert files_holding(tmp_path / "run", secrets) == []
    assert files_holding(tmp_path / "jobs", secrets) == []


@pytest.mark.slow
def test_local_executor_starts_its_ranks_itself_and_they_agree(small_store, tmp_path):
    """cluster=local with train.dist.nproc=2: the job (submitit's LocalExecutor, a process of its
    own) starts 2 ranks with hpcforge's own launcher, no mpirun, and the run records both."""
    import time
    _, job = _submit(small_store, tmp_path, "cluster=local", "train.dist.nproc=2",
                     "train.max_steps=3")
    status = ""
    for _ in range(240):
        status = subprocess.run([sys.executable, "-m", "hpcforge", "status", job["job_id"],
                                 "--jobs-dir", str(tmp_path / "jobs")],
                                capture_output=True, text=True, cwd=ROOT).stdout
        if "COMPLETED" in status or "FAILED" in status:
            break
        time.sleep(1)
    assert "COMPLETED" in status and "3 steps on 2 ranks" in status, status
    summary = json.loads((tmp_path / "run" / "train" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["launcher"] == "hpcforge --nproc"
    assert len(set(summary["weights_sha256_per_rank"])) == 1
    ranks = json.loads((tmp_path / "run" / "train" / "ranks.json").read_text())
    assert [x["rank"] for x in ranks] == [0, 1] and len({x["pid"] for x in ranks}) == 2
