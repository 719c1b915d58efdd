"""Transfer learning (issue #16): train.init_from, train.freeze and train.optim.groups on a real
pretrained CNN checkpoint over the small Ising store; resume wins over init_from; 2 Horovod
ranks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import hpcforge

from pipeline.config import load_config
from pipeline.core.checkpoint import load
from pipeline.core.errors import UserError
from pipeline.runtime.dist import init_distributed
from pipeline.train.assembly import build
from pipeline.train.loop import fit
from pipeline.train.run import Run

TINY = ["model.channels=[4,8]", "train.batch_size=32", "train.logger.mode=disabled",
        "train.epochs=1"]


def _overrides(store, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"data.path={store[0]}", *TINY, *extra]


def _build(store, out: Path, *extra: str) -> Run:
    cfg = load_config("cnn_ising2d", _overrides(store, out, "train.dist.backend=none", *extra))
    return build(cfg, init_distributed(cfg.train.dist))


@pytest.fixture(scope="module")
def pretrained(small_store, tmp_path_factory) -> dict[str, torch.Tensor]:
    """A real CNN phase classifier checkpoint (4 steps), and its weights."""
    run = _build(small_store, tmp_path_factory.mktemp("pre"), "train.max_steps=4")
    path = Path(fit(run)["checkpoint"])
    return {"path": path, **load(path)["model"]}


def test_a_changed_head_is_reinitialised_the_rest_loaded_and_the_run_says_so(
        small_store, pretrained, tmp_path, capsys):
    run = _build(small_store, tmp_path, f"train.init_from={pretrained['path']}",
                 "model.n_outputs=3")
    state = run.model.state_dict()
    assert run.transfer.reinitialised == ["head.3.weight", "head.3.bias"]
    assert run.transfer.ignored == []
    assert len(run.transfer.loaded) == len(state) - 2
    for k in run.transfer.loaded:
        assert torch.equal(state[k], pretrained[k]), k
    assert state["head.3.weight"].shape == (3, 8) != pretrained["head.3.weight"].shape
    out = capsys.readouterr().out
    assert (f"init_from {pretrained['path']}: {len(state) - 2} tensors loaded, 2 re-initialised, "
            f"0 ignored") in out
    assert "re-initialised: head.3.weight, head.3.bias" in out
    assert "loaded: features (12)" in out
    # a fresh optimizer at step 0: nothing of the pretraining's Adam state or progress
    assert run.progress.step == 0 and not run.phases[0].optimizer.state_dict()["state"]


def test_frozen_params_and_their_batchnorm_stats_stay_bit_for_bit_and_groups_scale_lr(
        small_store, pretrained, tmp_path):
    run = _build(small_store, tmp_path, f"train.init_from={pretrained['path']}",
                 "train.freeze=[features.0]", "train.optim.groups.features=0.1",
                 "train.max_steps=3", "train.schedule.name=cosine")
    opt = run.phases[0].optimizer
    frozen = {n for n, p in run.model.named_parameters() if not p.requires_grad}
    assert frozen == {"features.0.0.0.weight", "features.0.0.1.weight", "features.0.0.1.bias"}
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for n, p in run.model.named_parameters() if n in frozen)
    # the rest at lr, the unfrozen backbone at 0.1 lr; the schedule multiplies both alike
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])
    fit(run)
    assert [g["lr"] / g["initial_lr"] for g in opt.param_groups] == pytest.approx(
        [opt.param_groups[0]["lr"] / 1e-3] * 2)
    state = run.model.state_dict()
    for k, v in state.items():
        if k.startswith("features.0."):  # weights and the batch norm's running statistics
            assert torch.equal(v, pretrained[k]), k
    assert not torch.equal(state["features.1.0.0.weight"], pretrained["features.1.0.0.weight"])
    assert not run.model.features[0][0][1].training     # fit()'s train() left it in eval mode
    assert run.model.features[1][0][1].training


def test_resumed_finetune_goes_on_from_its_own_checkpoint_not_init_from(
        small_store, pretrained, tmp_path):
    init = tmp_path / "init.pt"
    shutil.copy(pretrained["path"], init)
    first = _build(small_store, tmp_path / "ft", f"train.init_from={init}", "train.max_steps=2")
    saved = load(fit(first)["checkpoint"])
    init.unlink()  # a resume that tried to re-load init_from would now fail
    again = _build(small_store, tmp_path / "ft", f"train.init_from={init}", "train.resume=auto",
                   "train.max_steps=3")
    assert again.transfer is None and again.progress.step == saved["step"] == 2
    for k, v in again.model.state_dict().items():
        assert torch.equal(v, saved["model"][k]), k
    assert again.phases[0].optimizer.state_dict()["state"]  # Adam's moments came back too


def test_bad_prefixes_and_a_missing_checkpoint_are_one_line_each(small_store, tmp_path):
    with pytest.raises(UserError, match=r"^train.freeze: prefix 'backbone' names no parameter of "
                                        r"model CNN; .* top-level modules: features, head$"):
        _build(small_store, tmp_path, "train.freeze=[backbone]")
    with pytest.raises(UserError, match=r"^train.optim.groups: prefix 'feat' names no parameter"):
        _build(small_store, tmp_path, "train.optim.groups.feat=0.1")  # whole components only
    with pytest.raises(UserError, match=r"^train.optim.groups.head=0.0: expected an lr scale > 0; "
                                        r"to keep 'head' fixed use train.freeze=\[head\]$"):
        _build(small_store, tmp_path, "train.optim.groups.head=0")
    with pytest.raises(UserError, match=r"^train.freeze=\['features', 'head'\] freezes every "):
        _build(small_store, tmp_path, "train.freeze=[features, head]")
    with pytest.raises(UserError, match=r"^train.init_from=/nowhere.pt: no such checkpoint file"):
        _build(small_store, tmp_path, "train.init_from=/nowhere.pt")


def test_a_checkpoint_of_another_family_is_refused_by_the_cli(small_store, pretrained, tmp_path):
    r = hpcforge("train", "-e", "resnet_ising2d", f"output_dir={tmp_path}",
                 f"data.path={small_store[0]}", "train.dist.backend=none",
                 "train.logger.mode=disabled", f"train.init_from={pretrained['path']}")
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines == [f"hpcforge: error: train.init_from={pretrained['path']} does not fit this "
                     f"run: model.name is 'cnn' in the checkpoint but 'resnet' here; start from a "
                     f"checkpoint of model resnet, or drop train.init_from"]
    assert not (tmp_path / "train" / "checkpoints").exists()


@pytest.mark.mpi
@pytest.mark.slow
def test_two_horovod_ranks_finetune_to_identical_weights_with_frozen_ones_untouched(
        small_store, pretrained, tmp_path):
    r = hpcforge("train", "-e", "cnn_ising2d", "--nproc", "2",
                 *_overrides(small_store, tmp_path, f"train.init_from={pretrained['path']}",
                             "train.freeze=[features.0]", "train.optim.groups.features=0.1",
                             "model.n_outputs=3", "train.max_steps=4"), timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 4
    digests = summary["weights_sha256_per_rank"]
    assert digests[0] == digests[1]
    assert r.stdout.count("tensors loaded, 2 re-initialised") == 1  # rank 0 alone says it
    final = load(summary["checkpoint"])["model"]
    for k, v in final.items():
        if k.startswith("features.0."):
            assert torch.equal(v, pretrained[k]), k
    assert not torch.equal(final["features.1.0.0.weight"], pretrained["features.1.0.0.weight"])
