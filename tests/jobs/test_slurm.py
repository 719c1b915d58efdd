"""Jobs against a real Slurm cluster (tests/jobs/conftest.py starts it): no mock scheduler.

Each test submits through the real `hpcforge` CLI or jobs/ API into its own submitit folder and
reads back what Slurm's accounting, submitit's result pickles and the run's files say.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from jobs import records

pytestmark = pytest.mark.slow
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def job_args(small_store, out: Path, jobs_dir: Path, *extra: str, vae: bool = True) -> list[str]:
    """The small dataset's settings (tests/conftest.py), this test's folders, the local cluster."""
    store, overrides = small_store
    small = [o for o in overrides[1:] if vae or not o.startswith("model.")]
    return [*small, f"data.path={store}", f"output_dir={out}", "cluster=local_slurm",
            f"cluster.jobs_dir={jobs_dir}", "train.batch_size=16", *extra]


def results(record: dict, ranks: int) -> list[dict]:
    out = []
    for r in range(ranks):
        status, value = records.result_of(record, r)
        assert status == "success", value
        out.append(value)
    return out


def log_of(job: dict) -> str:
    paths = [Path(job["logs"]), Path(job["logs"]).with_suffix(".err")]
    return "\n".join(p.read_text(errors="replace") for p in paths if p.exists())


def queue(slurm_conf) -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()


def test_two_nodes_four_horovod_ranks_agree(slurm, small_store, tmp_path, jobs_dir, submit, cli,
                                            slurm_tools):
    t0 = time.monotonic()
    [job] = submit(*job_args(small_store, tmp_path / "run", jobs_dir, "cluster.nodes=2",
                             "cluster.tasks_per_node=2", "train.epochs=1"))
    assert time.monotonic() - t0 < 60, "submit must return without waiting for the job"
    assert slurm_tools.wait(job["job_id"], ENDED) == "COMPLETED", log_of(job)

    record = json.loads(Path(job["record"]).read_text())
    out = results(record, 4)
    assert [r["rank"] for r in out] == [0, 1, 2, 3]
    assert [r["node"] for r in out] == ["n1", "n1", "n2", "n2"]
    assert {r["summary"]["ranks"] for r in out} == {4}
    assert all(r["summary"]["launcher"].startswith("srun") for r in out)
    digests = out[0]["summary"]["weights_sha256_per_rank"]
    assert len(digests) == 4 and len(set(digests)) == 1, "ranks ended with different weights"
    assert len({json.dumps(r["summary"]["history"]) for r in out}) == 1  # allreduced metrics
    assert out[0]["summary"]["history"], "an epoch ran, so validation metrics exist"

    # The job printed its rank/node map once, and recorded config, command and git revision.
    log = log_of(job)
    assert log.count("4 rank(s) on 2 node(s) n1,n2") == 1
    assert record["config"]["cluster"]["nodes"] == 2 and record["ranks"] == 4
    assert record["command"][:2] == ["hpcforge", "submit"] and record["git_revision"] != "unknown"

    status = cli("status", job["job_id"], "--jobs-dir", str(jobs_dir))
    assert status.returncode == 0 and "COMPLETED" in status.stdout and "n[1-2]" in status.stdout
    logs = cli("logs", job["job_id"], "--rank", "3", "--jobs-dir", str(jobs_dir))
    assert logs.returncode == 0 and "global_rank=3(4)" in logs.stdout
    bad = cli("logs", job["job_id"], "--rank", "4", "--jobs-dir", str(jobs_dir))
    assert bad.returncode == 2 and "ranks 0..3" in bad.stderr


def test_ddp_job_on_two_nodes_meets_where_submitit_says(slurm, small_store, tmp_path, jobs_dir,
                                                        submit, slurm_tools):
    """train.dist.backend=ddp as a Slurm job: jobs/tasks.py exports submitit's MASTER_PORT (from
    the job id) and pipeline/dist asks Slurm nothing itself; without the export its srun ranks
    are refused for want of MASTER_PORT. The fake nodes' names (n1) resolve to no address, so
    cluster.setup gives MASTER_ADDR, which the export keeps; on a real cluster it is the first
    node, as submitit's TorchDistributedEnvironment says."""
    setup = "cluster.setup=['export OMPI_MCA_btl=self,tcp', 'export MASTER_ADDR=127.0.0.1']"
    [job] = submit(*job_args(small_store, tmp_path / "run", jobs_dir, "cluster.nodes=2",
                             "train.dist.backend=ddp", "train.epochs=1", setup))
    assert slurm_tools.wait(job["job_id"], ENDED) == "COMPLETED", log_of(job)
    out = results(json.loads(Path(job["record"]).read_text()), 2)
    assert [(r["rank"], r["node"]) for r in out] == [(0, "n1"), (1, "n2")]
    assert {r["summary"]["ranks"] for r in out} == {2}
    digests = out[0]["summary"]["weights_sha256_per_rank"]
    assert len(digests) == 2 and len(set(digests)) == 1, "ranks ended with different weights"


def _job_listeners(jobs_dir: Path, job_id: str, slurm_tools) -> tuple[str, dict[str, str]]:
    """Wait for the job to end; its final state and every address its ranks (submitit's tasks,
    found by their folder in the command line, and their children) listened on meanwhile,
    sampled 5x a second, each with the port and process that held it. Slurm's own sockets are
    not the job's: srun's step ports, and slurmstepd's PMIx port, which its tasks inherit."""
    import psutil

    from helpers import process_tree
    seen: dict[str, str] = {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        state = slurm_tools.state(job_id)
        if state in ENDED:
            return state, seen
        ranks = {q for p in psutil.process_iter(["cmdline"])
                 if "submitit.core._submit" in (p.info["cmdline"] or [])[1:4]
                 and str(jobs_dir) in " ".join(p.info["cmdline"]) for q in process_tree(p.pid)}
        stepds = [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "slurmstepd"]
        slurms = {(ip, port) for pid in stepds for ip, port in _listening(pid)}
        for pid in ranks:
            for ip, port in set(_listening(pid)) - slurms:
                seen.setdefault(ip, f"port {port}, pid {pid}")
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {state} after 300 s")


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of the listening TCP sockets process `pid` holds, inherited ones too."""
    import psutil
    try:
        return [(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections("tcp")
                if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


def test_horovod_on_two_nodes_meets_on_master_addrs_address_over_gloo(
        slurm, small_store, tmp_path, jobs_dir, submit, slurm_tools):
    """Issue 25: Horovod's ranks on several nodes run its Gloo controller, meeting at rank 0's
    rendezvous server on MASTER_ADDR's address: nothing listens on every address, where Open MPI's
    TCP transport would. Here MASTER_ADDR is this host's network address (the fake nodes' names
    resolve to none); the ranks of both nodes agree on the weights."""
    from helpers import network_address
    iface, address = network_address()
    setup = f"cluster.setup=['export MASTER_ADDR={address}']"
    [job] = submit(*job_args(small_store, tmp_path / "run", jobs_dir, "cluster.nodes=2",
                             "cluster.tasks_per_node=2", "train.epochs=2", setup))
    state, addresses = _job_listeners(jobs_dir, job["job_id"], slurm_tools)
    assert state == "COMPLETED", log_of(job)
    out = results(json.loads(Path(job["record"]).read_text()), 4)
    digests = out[0]["summary"]["weights_sha256_per_rank"]
    assert len(digests) == 4 and len(set(digests)) == 1, "ranks ended with different weights"
    log = log_of(job)
    assert f"Horovod across 2 nodes on its Gloo controller: rendezvous on {address}:" in log
    assert f", pairs on {iface}" in log
    assert address in addresses, "the rendezvous server was never seen listening"
    assert set(addresses) <= {address, "127.0.0.1", "::1"}, addresses


def _wait_steps(metrics: Path, steps: int, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if metrics.exists():
            done = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line]
            if done and max(done) >= steps:
                return
        time.sleep(0.5)
    raise AssertionError(f"no step >= {steps} in {metrics} after {timeout} s")


def test_preempted_job_requeues_and_resumes_to_the_same_weights_and_run(
        slurm, small_store, tmp_path, jobs_dir, submit, slurm_tools):
    import submitit

    # 10 epochs (160 steps, a few seconds): the signal must land while the job still trains.
    # With 2 (32 steps, 0.7 s once fused Adam sped steps up) it could finish first.
    common = ["cluster.nodes=1", "cluster.tasks_per_node=2", "train.epochs=10",
              "train.logger.log_every=2", "train.dist.signal_check_s=0"]  # act at the next step
    [plain] = submit(*job_args(small_store, tmp_path / "plain", jobs_dir / "plain", *common))
    [hit] = submit(*job_args(small_store, tmp_path / "hit", jobs_dir / "hit", *common))
    _wait_steps(tmp_path / "hit" / "train" / "metrics.jsonl", 4)
    # Preemption as submitit tests it: SIGTERM then SIGUSR2 to every rank of the job.
    submitit.SlurmJob(folder=jobs_dir / "hit" / "%j", job_id=hit["job_id"])._interrupt()

    t0 = time.monotonic()
    # Restarts counts up at the requeue, while the job is still COMPLETING; only once it is PENDING
    # again does Slurm set the ~120 s BeginTime a requeued job waits for, which StartTime=now lifts.
    while (job := slurm_tools.show(hit["job_id"])).get("Restarts", "0") == "0" \
            or job.get("JobState") != "PENDING":
        assert time.monotonic() - t0 < 120, f"job was not requeued:\n{log_of(hit)}"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={hit['job_id']}", "StartTime=now"], check=True)
    assert slurm_tools.wait(plain["job_id"], ENDED) == "COMPLETED", log_of(plain)
    assert slurm_tools.wait(hit["job_id"], ENDED) == "COMPLETED", log_of(hit)

    a = results(json.loads(Path(plain["record"]).read_text()), 2)[0]
    b = results(json.loads(Path(hit["record"]).read_text()), 2)[0]
    assert a["restarts"] == 0 and b["restarts"] == 1
    assert b["summary"]["steps"] == a["summary"]["steps"]
    assert b["summary"]["weights_sha256_per_rank"] == a["summary"]["weights_sha256_per_rank"]
    log = log_of(hit)
    assert "requeueing job" in log and "resumed from" in log
    assert "Traceback" not in log and "not requeueing" not in log, log  # issue 25
    # One W&B run, written in two sittings: both offline run folders carry the same run id.
    runs = sorted((tmp_path / "hit" / "train" / "wandb").glob("offline-run-*"))
    assert len(runs) >= 2 and len({r.name.rsplit("-", 1)[-1] for r in runs}) == 1, runs
    # What `wandb sync` uploads holds each step once, the steps metrics.jsonl holds (issue 25)
    from wandb_records import history
    [uploaded] = {p.resolve() for p in (tmp_path / "hit" / "train" / "wandb").glob("*/*.wandb")}
    steps = [row["_step"] for row in history(uploaded)]
    metrics = (tmp_path / "hit" / "train" / "metrics.jsonl").read_text().splitlines()
    assert steps == sorted({json.loads(line)["step"] for line in metrics}), steps


def test_a_job_slurm_requeues_itself_says_so_in_one_line_and_resumes(
        slurm, small_store, tmp_path, jobs_dir, submit, slurm_tools):
    """Slurm's own requeue (`scontrol requeue`, as a preemption with PreemptMode=REQUEUE does):
    the job is COMPLETING when its SIGTERM reaches the trainer, as a cancelled one is; the log
    says the checkpoint is written and Slurm requeues the job, without a traceback (issue 25)."""
    [job] = submit(*job_args(small_store, tmp_path, jobs_dir, "cluster.nodes=1",
                             "cluster.tasks_per_node=2", "train.epochs=10",
                             "train.dist.signal_check_s=0"))
    _wait_steps(tmp_path / "train" / "metrics.jsonl", 4)
    subprocess.run(["scontrol", "requeue", job["job_id"]], check=True)
    t0 = time.monotonic()
    while slurm_tools.show(job["job_id"]).get("JobState") != "PENDING":
        assert time.monotonic() - t0 < 120, f"job was not requeued:\n{log_of(job)}"
        time.sleep(0.5)
    subprocess.run(["scontrol", "update", f"JobId={job['job_id']}", "StartTime=now"], check=True)
    assert slurm_tools.wait(job["job_id"], ENDED) == "COMPLETED", log_of(job)
    assert results(json.loads(Path(job["record"]).read_text()), 2)[0]["restarts"] == 1
    log = log_of(job)
    assert f"checkpoint written; Slurm is requeueing job {job['job_id']} itself (requeue 1)" \
        in log, log
    assert "resumed from" in log, log
    assert "Traceback" not in log and "not requeueing" not in log, log


def test_sweep_over_three_architectures_is_one_array_with_a_summary(
        slurm, small_store, tmp_path, jobs_dir, cli, slurm_tools):
    tasks = ["model=vae model.image_size=16",
             "model=autoencoder model.image_size=16",
             "model=dcgan model.image_size=16 model.channels=[32,16]"]
    args = job_args(small_store, tmp_path, jobs_dir, "train.epochs=1", "train.batch_size=32", vae=False)
    r = cli("sweep", *args, *[a for t in tasks for a in ("--task", t)], "--parallel", "2",
            "--name", "archs", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    array = rec["job_id"]
    assert [t["job_id"] for t in rec["tasks"]] == [f"{array}_{i}" for i in range(3)]
    assert slurm_tools.wait(rec["summary_job"], ENDED, timeout=400) == "COMPLETED"

    states = {row["JobID"]: row["State"] for row in records.sacct(array)}
    assert states == {f"{array}_{i}": "COMPLETED" for i in range(3)}, states
    arrays = [line for p in jobs_dir.rglob("*_submission.sh") for line in p.read_text().splitlines()
              if line.startswith("#SBATCH --array")]
    assert arrays == ["#SBATCH --array=0-2%2"]  # one array, at most two tasks at once
    summary = json.loads((tmp_path / "sweeps" / "archs" / "summary.json").read_text())
    rows = summary["rows"]
    assert [row["overrides"] for row in rows] == tasks
    assert all(row["state"] == "COMPLETED" and row["steps"] > 0 for row in rows)
    assert all(any(k.startswith("val/") for k in row) for row in rows), rows
    assert (tmp_path / "sweeps" / "archs" / "summary.md").read_text().count("COMPLETED") == 3
    # The table as a W&B table, in the sweep's group with the tasks' runs.
    tables = list((tmp_path / "sweeps" / "archs").rglob("*.table.json"))
    assert len(tables) == 1 and len(json.loads(tables[0].read_text())["data"]) == 3
    for i in range(3):
        run = next((tmp_path / "sweeps" / "archs" / str(i) / "train" / "wandb").glob("offline-run-*"))
        assert b"archs" in next(run.glob("*.wandb")).read_bytes()  # the group name
    status = cli("status", array, "--jobs-dir", str(jobs_dir))
    assert status.returncode == 0 and status.stdout.count("COMPLETED") >= 3


def test_chain_train_never_starts_when_prepare_fails(slurm, small_store, tmp_path, jobs_dir,
                                                     submit, slurm_tools):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the dataset's folder should be")
    prepare, train = submit(*job_args(small_store, tmp_path, jobs_dir, "train.epochs=1"),
                            f"data.path={blocker}/ising.zarr", "--stages", "prepare,train")
    assert (prepare["stage"], train["stage"]) == ("prepare", "train")
    record = json.loads(Path(train["record"]).read_text())
    assert record["depends_on"] == f"afterok:{prepare['job_id']}"
    assert slurm_tools.wait(prepare["job_id"], ENDED) == "FAILED"
    assert slurm_tools.wait(train["job_id"], ENDED, timeout=60) == "CANCELLED"
    row = records.sacct(train["job_id"])[0]
    assert row["Start"] in ("None", "Unknown", "") or row["Elapsed"] == "00:00:00", row
    assert not Path(train["logs"]).exists(), "the train job must not have run"


def test_chain_prepare_train_evaluate_in_order(slurm, small_store, tmp_path, jobs_dir, submit,
                                               slurm_tools):
    store, overrides = small_store
    # logger.mode=offline: evaluate passes logger.mode=auto to wandb.init as is (reported).
    args = [*job_args(small_store, tmp_path, jobs_dir, "train.epochs=1", "data.test_fraction=0.2",
                      "train.logger.mode=offline"), f"data.path={tmp_path / 'data' / 'fresh.zarr'}"]
    jobs = submit(*args, "--stages", "prepare,train,evaluate")
    assert [j["stage"] for j in jobs] == ["prepare", "train", "evaluate"]
    for j in jobs:
        assert slurm_tools.wait(j["job_id"], ENDED, timeout=300) == "COMPLETED", log_of(j)
    rows = [records.sacct(j["job_id"])[0] for j in jobs]
    assert rows[0]["End"] <= rows[1]["Start"] and rows[1]["End"] <= rows[2]["Start"], rows
    assert (tmp_path / "data" / "fresh.zarr").is_dir()
    status, result = records.result_of(json.loads(Path(jobs[2]["record"]).read_text()))
    assert status == "success" and result["metrics"], result


def test_cancel_stops_a_running_job(slurm, small_store, tmp_path, jobs_dir, submit, cli, slurm_tools):
    [job] = submit(*job_args(small_store, tmp_path, jobs_dir, "train.epochs=200"))
    slurm_tools.wait(job["job_id"], {"RUNNING"}, timeout=120)
    r = cli("cancel", job["job_id"], "--jobs-dir", str(jobs_dir))
    assert r.returncode == 0 and job["job_id"] in r.stdout
    assert slurm_tools.wait(job["job_id"], ENDED, timeout=60) == "CANCELLED"
    # scancel's SIGTERM reaches the trainer like a preemption: it checkpoints, but must not
    # requeue a cancelled job. Wait until no process of the job is left, then look again.
    t0 = time.monotonic()
    while subprocess.run(["squeue", "-h", "-j", job["job_id"]], capture_output=True,
                         text=True).stdout.strip() and time.monotonic() - t0 < 60:
        time.sleep(0.5)
    assert slurm_tools.show(job["job_id"])["Restarts"] == "0", log_of(job)
    status = cli("status", job["job_id"], "--jobs-dir", str(jobs_dir))
    assert "CANCELLED" in status.stdout, status.stdout + log_of(job)


def test_gpu_request_on_cpu_cluster_fails_at_submit_with_a_clear_message(
        slurm, small_store, tmp_path, jobs_dir, cli):
    before = queue(slurm)
    r = cli("submit", *job_args(small_store, tmp_path, jobs_dir, "cluster.gpus_per_node=1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cluster.gpus_per_node=1" in r.stderr and "no GPUs" in r.stderr, r.stderr
    # The same request slipped past the check as a raw sbatch option: sbatch's refusal, translated.
    r = cli("submit", *job_args(small_store, tmp_path, jobs_dir, "cluster.sbatch_extra.gres=gpu:1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "Invalid generic resource" in r.stderr and "cluster.gpus_per_node" in r.stderr, r.stderr
    assert not set(queue(slurm)) - set(before), "nothing may be submitted"


@pytest.mark.parametrize("setting, message", [
    ("cluster.partition=nosuch", "cluster.partition=nosuch: no such partition on this cluster; available: debug"),
    ("cluster.nodes=0", "cluster.nodes=0: expected at least 1 node"),
    ("cluster.timeout_min=1", "cluster.timeout_min=1 is too short to checkpoint"),
])
def test_bad_cluster_configs_are_refused_before_submitting(slurm, small_store, tmp_path, jobs_dir,
                                                           cli, setting, message):
    before = queue(slurm)
    r = cli("submit", *job_args(small_store, tmp_path, jobs_dir, setting))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not set(queue(slurm)) - set(before) and not jobs_dir.exists()


def test_dask_slurmcluster_prepare_runs_its_workers_as_slurm_jobs(slurm, tmp_path, cli):
    from pipeline.config import DaskConfig
    import dask_jobqueue  # noqa: F401  (the data issue's SLURMCluster path needs it)
    assert "cluster" in DaskConfig.__dataclass_fields__
    store = tmp_path / "dask.zarr"
    logs = tmp_path / "dask-logs"
    r = cli("prepare", f"output_dir={tmp_path}", f"data.path={store}", "data.params.lattice=16",
            "data.params.burn_in=20", "data.params.decorrelation=2", "data.n_samples=256",
            "data.chunk_size=64", "data.dask.progress=false", "data.dask.cluster=slurm",
            "data.dask.slurm.jobs=2", "data.dask.slurm.cores=1", "data.dask.slurm.memory=2GiB",
            "data.dask.slurm.queue=debug", "data.dask.slurm.walltime=00:10:00",
            f"data.dask.slurm.log_directory={logs}", "data.dask.slurm.interface=lo", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (store / "zarr.json").is_file()
    worker_logs = list(logs.glob("*.out")) + list(logs.glob("*.err"))
    assert len({p.stem for p in worker_logs}) >= 2, "each dask worker ran as its own Slurm job"
    deadline = time.time() + 60  # slurmdbd records jobs asynchronously: give it a moment
    while True:
        names = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobName,State", "-S",
                                "now-30minutes"], capture_output=True, text=True).stdout
        if names.count("dask-worker") >= 2 or time.time() > deadline:
            break
        time.sleep(2)
    assert names.count("dask-worker") >= 2, names
