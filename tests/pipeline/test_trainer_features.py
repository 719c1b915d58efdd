"""Trainer features on one process (backend none): schedules, precision, clipping, checkpoints."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.checkpoint import load
from pipeline.config import ScheduleConfig, load_config
from pipeline.dist import init_distributed
from pipeline.errors import UserError
from models.base import OptimizerSpec
from pipeline.config import OptimConfig
from pipeline.optim import build_optimizer, load_optimizer_state, lr_factor
from pipeline.trainer import Trainer


def _trainer(store, tmp_path, *extra: str) -> Trainer:
    path, overrides = store
    cfg = load_config("demo", overrides[1:] + [f"output_dir={tmp_path}", f"data.path={path}",
                                               "train.dist.backend=none", "train.batch_size=32",
                                               "train.logger.mode=disabled", *extra])
    return Trainer(cfg, init_distributed(cfg.train.dist))


def test_warmup_goes_from_unscaled_lr_to_scaled_peak_then_cosine_to_floor():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    scale = 4.0  # linear scaling on 4 ranks
    assert lr_factor(cfg, 0, 110, scale) == pytest.approx(0.25 + 0.75 * 1 / 10)
    assert lr_factor(cfg, 9, 110, scale) == pytest.approx(1.0)
    assert lr_factor(cfg, 10, 110, scale) == pytest.approx(1.0)
    assert lr_factor(cfg, 60, 110, scale) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(cfg, 110, 110, scale) == pytest.approx(0.1)


def test_step_schedule_decays_by_gamma():
    cfg = ScheduleConfig(name="step", step_size=5, gamma=0.5)
    assert [lr_factor(cfg, s, 100, 1.0) for s in (0, 4, 5, 10, 14)] == [1, 1, 0.5, 0.25, 0.25]


def _adam(module: torch.nn.Module, impl: str) -> torch.optim.Optimizer:
    return build_optimizer(OptimizerSpec("model", module), OptimConfig(impl=impl), 1e-3)


def test_auto_picks_fused_kernels_on_cpu_and_they_update_as_the_for_loop_does():
    torch.manual_seed(0)
    nets = {impl: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
            for impl in ("auto", "foreach", "for-loop")}
    for net in list(nets.values())[1:]:
        net.load_state_dict(nets["auto"].state_dict())
    start = torch.nn.utils.parameters_to_vector(nets["auto"].parameters()).clone()
    opts = {impl: _adam(net, impl) for impl, net in nets.items()}
    auto = opts["auto"].param_groups[0]
    assert (auto["fused"], auto["foreach"]) == (True, None)
    assert opts["foreach"].param_groups[0]["foreach"] is True
    assert opts["for-loop"].param_groups[0]["foreach"] is False
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    for _ in range(20):
        for impl, net in nets.items():
            opts[impl].zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opts[impl].step()
    ref = torch.nn.utils.parameters_to_vector(nets["for-loop"].parameters())
    for impl in ("auto", "foreach"):
        got = torch.nn.utils.parameters_to_vector(nets[impl].parameters())
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert (ref - start).abs().max() > 1e-3  # 20 steps of lr 1e-3 did move the weights


def test_fused_where_torch_has_no_fused_kernel_is_refused_with_the_fix():
    on_meta = torch.nn.Linear(4, 2, device="meta")  # no fused kernels for the meta device
    with pytest.raises(UserError, match="train.optim.impl=fused: torch has no fused adam for "
                                        "'model'.s parameters \\(torch.float32 on meta\\); "
                                        "use train.optim.impl=auto"):
        _adam(on_meta, "fused")
    assert _adam(on_meta, "auto").param_groups[0]["fused"] is None  # auto: torch's default


def test_resume_keeps_this_runs_kernels_not_the_checkpoints():
    net = torch.nn.Linear(4, 2)
    old = _adam(net, "for-loop")
    net(torch.randn(3, 4)).sum().backward()
    old.step()
    new = _adam(net, "auto")
    load_optimizer_state(new, old.state_dict())
    assert new.param_groups[0]["fused"] is True and new.param_groups[0]["foreach"] is None
    assert torch.equal(new.state[net.weight]["exp_avg"], old.state[net.weight]["exp_avg"])
    back = _adam(net, "for-loop")
    load_optimizer_state(back, new.state_dict())
    assert back.param_groups[0]["fused"] is None and back.param_groups[0]["foreach"] is False


def test_linear_lr_scaling_and_schedule_reach_the_optimizer(small_store, tmp_path):
    t = _trainer(small_store, tmp_path, "train.lr=0.01", "train.schedule.name=step",
                 "train.schedule.step_size=2", "train.schedule.gamma=0.5", "train.max_steps=4")
    assert t.optimizers["model"].param_groups[0]["lr"] == pytest.approx(0.01)  # 1 rank: no scaling
    t.fit()
    assert t.optimizers["model"].param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)


def test_bf16_autocast_on_cpu_trains_with_finite_losses(small_store, tmp_path):
    t = _trainer(small_store, tmp_path, "train.precision=bf16", "train.max_steps=3")
    summary = t.fit()
    assert summary["steps"] == 3 and summary["nonfinite_steps"] == 0
    assert t.model.encoder.mu.weight.dtype == torch.float32  # autocast keeps fp32 master weights


def test_fp16_without_gpu_is_refused_with_the_fix(small_store, tmp_path):
    with pytest.raises(UserError, match="train.precision=fp16 needs a GPU .* use train.precision=bf16"):
        _trainer(small_store, tmp_path, "train.precision=fp16")


def test_gradient_clipping_bounds_the_update(small_store, tmp_path):
    t = _trainer(small_store, tmp_path, "train.grad_clip=0.5", "train.optim.name=sgd",
                 "train.optim.momentum=0", "train.lr=1.0")
    batch = next(iter(t.loader))
    before = [p.detach().clone() for p in t.model.parameters()]
    metrics = t.train_step([batch])
    assert metrics["opt/model/grad_norm"] > 0.5          # the raw norm is logged
    step = torch.linalg.vector_norm(torch.cat([(p.detach() - b).flatten()
                                               for p, b in zip(t.model.parameters(), before)]))
    assert step.item() == pytest.approx(0.5, rel=1e-3)   # lr 1 x clipped norm 0.5


def test_gradient_accumulation_sums_batches_into_one_step(small_store, tmp_path):
    t = _trainer(small_store, tmp_path, "train.accumulate=2", "train.max_steps=3")
    assert t.steps_per_epoch == len(t.loader) // 2
    assert t.fit()["steps"] == 3


def test_early_stopping_after_patience_validations(small_store, tmp_path):
    t = _trainer(small_store, tmp_path, "train.epochs=10", "train.early_stopping.metric=val/loss",
                 "train.early_stopping.patience=2", "train.early_stopping.min_delta=1e9")
    summary = t.fit()
    assert len(summary["history"]) == 3     # best at the first, then 2 without improvement
    assert summary["steps"] == 3 * t.steps_per_epoch


def test_keeps_last_k_step_checkpoints_plus_last_best_final(small_store, tmp_path):
    t = _trainer(small_store, tmp_path, "train.max_steps=6", "train.checkpoint.every_steps=1",
                 "train.checkpoint.keep=2", "train.val_every=2")
    t.fit()
    names = sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir())
    assert names == ["best.pt", "final.pt", "last.pt", "step-00000005.pt", "step-00000006.pt"]
    ck = load(tmp_path / "train" / "checkpoints" / "last.pt")
    assert ck["step"] == 6 and len(ck["rng"]) == 1 and ck["code_version"] != ""
    assert set(ck) >= {"model", "optimizers", "schedulers", "loader", "config", "wandb_run_id"}


def test_resume_auto_skips_a_corrupt_newest_checkpoint(small_store, tmp_path, capsys):
    _trainer(small_store, tmp_path, "train.max_steps=4", "train.checkpoint.every_steps=2").fit()
    folder = tmp_path / "train" / "checkpoints"
    (folder / "step-00000099.pt").write_bytes(b"truncated")
    t = _trainer(small_store, tmp_path, "train.max_steps=6", "train.resume=auto")
    assert t.step == 4
    assert "skipping unreadable checkpoint" in capsys.readouterr().out


def test_a_model_whose_optimizers_share_parameters_is_refused(small_store, tmp_path, monkeypatch):
    from models.base import OptimizerSpec
    from models.vae import VAE
    monkeypatch.setattr(VAE, "optimizers", lambda self: [OptimizerSpec("a", self.encoder),
                                                        OptimizerSpec("b", self)])
    with pytest.raises(UserError, match="optimizers 'a' and 'b' share parameters"):
        _trainer(small_store, tmp_path)


def test_seeds_differ_per_rank_and_repeat_per_run():
    from pipeline.trainer import seed_for
    assert seed_for(0, 0) == seed_for(0, 0) and seed_for(0, 0) != seed_for(0, 1)
    assert seed_for(0, 0, 1) != seed_for(0, 0, 0) and not math.isnan(seed_for(1, 2))


@pytest.mark.parametrize("check_s, acted_at", [(1.0, 12), (0.0, 5)])
def test_a_signal_is_agreed_on_at_the_next_check_spaced_by_signal_check_s(
        small_store, tmp_path, monkeypatch, check_s, acted_at):
    """Ranks agree at steps 1 and 2, then every signal_check_s by rank 0's measured step time. A
    clock advancing 0.1 s per agreement makes that 1 step per 0.1 s: with check_s 1.0 the third
    agreement is 10 steps after the second, at step 12; check_s 0 agrees at every step."""
    import types

    import pipeline.trainer as trainer_module
    t = _trainer(small_store, tmp_path, f"train.dist.signal_check_s={check_s}")
    batch = next(iter(t.loader))
    clock = iter(range(1, 1000))
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(
        perf_counter=lambda: 0.1 * next(clock)))
    t._flag = types.SimpleNamespace(signum=None)
    acted = None
    for step in range(1, 20):
        if step == 5:
            t._flag.signum = 15  # SIGTERM arrives before step 5
        t.train_step([batch])
        t.step = step
        if t.preempt:
            acted = step
            break
    assert acted == acted_at
