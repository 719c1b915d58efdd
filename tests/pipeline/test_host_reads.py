"""No reads of tensors on the host between logging steps (issue 28, point 1), over real short
runs of each kind of model: one network (VAE, classifier), two (GAN), and critic repeats (WGAN-GP);
on one process here and on 2 ranks of each backend under mpirun. Reads at log steps and at the
end are allowed (and happen: the counter sees them). The bad-step guarantees that used to rest on
a read at every step are tested with real injected NaNs in test_trainer_dist.py and below."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from host_reads_worker import HostReads

from pipeline.config import load_config
from pipeline.runtime.dist import init_distributed
from pipeline.runtime.launch import mpirun_command
from pipeline.train.assembly import build
from pipeline.train.loop import fit
from pipeline.train.nonfinite import NonFiniteError

LOG_EVERY = 4
RUN = ["train.dist.backend=none", "train.batch_size=32", "train.logger.mode=disabled",
       f"train.logger.log_every={LOG_EVERY}", "train.logger.images_every=0", "train.max_steps=10",
       f"train.checkpoint.every_steps={2 * LOG_EVERY}", "train.threads=1"]
FAMILIES = {
    "vae": ["model.image_size=16"],
    "gan": ["model=gan", "model.data_shape=[1,16,16]", "model.g_hidden=[32]",
            "model.d_hidden=[32]"],
    "wgan_gp": ["model=wgan_gp", "model.image_size=16", "model.channels=[8,4]",
                "model.n_critic=2"],
    "cnn": ["model=cnn", "model.channels=[4,8]", "model.n_outputs=2",
            "model.loss=ce", "data.inputs={x: spins, y: phase}"],
}


def _overrides(store, out: Path, family: str, *extra: str) -> list[str]:
    path, overrides = store
    return ([o for o in overrides[1:] if not o.startswith("model.")] + FAMILIES[family] +
            [f"output_dir={out}", f"data.path={path}", *RUN, *extra])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_run_reads_nothing_on_the_host_between_logging_steps(small_store, tmp_path, family,
                                                               monkeypatch):
    cfg = load_config("demo", _overrides(small_store, tmp_path, family))
    run = build(cfg, init_distributed(cfg.train.dist))
    reads = HostReads()
    reads.install(monkeypatch.setattr)
    summary = fit(run)
    assert summary["steps"] == 10 and summary["nonfinite_steps"] == 0
    assert reads.between_logs(LOG_EVERY) == []
    # the counter does see reads: at the log steps (4, 8) and at the end
    assert {s for where, s, _ in reads.reads if where == "step end"} == {4, 8}
    assert any(where == "end" for where, _, _ in reads.reads)


def test_a_nan_step_is_skipped_on_the_device_and_counted_at_the_next_log_step(small_store,
                                                                            tmp_path):
    """Step 3's NaN: weights and Adam's state as before it (fused Adam skips on the device), the
    batch-norm statistics undone, and the count read at step 4; with train.nonfinite=fail the
    error names step 3, raised at step 4, before any checkpoint."""
    cfg = load_config("demo", _overrides(small_store, tmp_path / "a", "cnn",
                                         "train.inject_nan_at=[3]", "train.max_steps=3"))
    run = build(cfg, init_distributed(cfg.train.dist))
    from pipeline.train import loop
    before: dict = {}
    step = loop.train_step

    def snapshot(run, batches):
        if run.progress.step == 2:
            before.update({k: v.clone() for k, v in run.model.state_dict().items()})
            opt = run.phases[0].optimizer
            before["adam_step"] = next(iter(opt.state.values()))["step"].clone()
        return step(run, batches)
    loop.train_step = snapshot
    try:
        summary = fit(run)
    finally:
        loop.train_step = step
    assert summary["nonfinite_steps"] == 1
    for k, v in run.model.state_dict().items():  # (num_batches_tracked counts forwards: as before)
        if v.is_floating_point():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert next(iter(run.phases[0].optimizer.state.values()))["step"] == before["adam_step"]

    cfg = load_config("demo", _overrides(small_store, tmp_path / "b", "cnn",
                                         "train.inject_nan_at=[3]", "train.nonfinite=fail",
                                         "train.checkpoint.every_steps=4"))
    run = build(cfg, init_distributed(cfg.train.dist))
    with pytest.raises(NonFiniteError, match="1 non-finite step.* in a row at step 3 "):
        fit(run)
    assert run.progress.step == 4
    assert not list((tmp_path / "b" / "train" / "checkpoints").glob("*.pt"))


@pytest.mark.mpi
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["horovod", "ddp"])
def test_two_ranks_read_nothing_on_the_host_between_logging_steps(small_store, tmp_path, backend):
    worker = str(Path(__file__).with_name("host_reads_worker.py"))
    out = tmp_path / "reads.json"
    args = _overrides(small_store, tmp_path, "vae", f"train.dist.backend={backend}")
    cmd = mpirun_command(2, [])[:-3] + [sys.executable, worker, str(out), *args]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for rank in (0, 1):
        reads = [tuple(x) for x in json.loads(Path(f"{out}.{rank}").read_text())]
        counter = HostReads()
        counter.reads = reads
        assert counter.between_logs(LOG_EVERY) == [], rank
        assert {s for where, s, _ in reads if where == "step end"} == {4, 8}
