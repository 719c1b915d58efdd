"""Trainer features on one process (backend none): schedules, precision, clipping, checkpoints."""
from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from helpers import hpcforge

from models.base import OptimizerSpec
from pipeline.config import OptimConfig, ScheduleConfig, load_config
from pipeline.core.checkpoint import load
from pipeline.core.errors import UserError
from pipeline.runtime.dist import init_distributed
from pipeline.train.assembly import build
from pipeline.train.loop import fit, train_step
from pipeline.train.optim import build_optimizer, load_optimizer_state, lr_factor
from pipeline.train.run import Run


def _trainer(store, tmp_path, *extra: str) -> Run:
    path, overrides = store
    cfg = load_config("demo", overrides[1:] + [f"output_dir={tmp_path}", f"data.path={path}",
                                               "train.dist.backend=none", "train.batch_size=32",
                                               "train.logger.mode=disabled", *extra])
    return build(cfg, init_distributed(cfg.train.dist))


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


@pytest.mark.mpi
@pytest.mark.slow
def test_linear_lr_scaling_on_two_ranks_doubles_the_lr_the_optimizer_uses(small_store, tmp_path):
    """2 real ranks with lr_scaling=linear: every step uses 2 x base lr (times the step schedule),
    read from what the optimizer logged and from its state in the final checkpoint."""
    path, overrides = small_store
    r = hpcforge("train", "--nproc", "2", *overrides[1:], f"data.path={path}",
                 f"output_dir={tmp_path}", "train.batch_size=16", "train.lr=0.01",
                 "train.lr_scaling=linear", "train.schedule.name=step", "train.schedule.step_size=2",
                 "train.schedule.gamma=0.5", "train.max_steps=4", "train.logger.log_every=1",
                 "train.logger.mode=disabled")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    used = {row["step"]: row["opt/model/lr"] for row in rows if "opt/model/lr" in row}
    assert used == pytest.approx({1: 0.02, 2: 0.02, 3: 0.01, 4: 0.01})  # 2 ranks x 0.01, halved at 2
    ck = load(tmp_path / "train" / "checkpoints" / "final.pt")
    assert ck["ranks"] == 2
    group = ck["optimizers"]["model"]["param_groups"][0]
    assert group["initial_lr"] == pytest.approx(0.02) and group["lr"] == pytest.approx(0.005)


def _activation_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """Dtypes of every Linear/Conv output in the forwards run after this call."""
    seen: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            m.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype))
    return seen


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_bf16_autocast_on_cpu_runs_the_forward_in_bfloat16(small_store, tmp_path, precision, dtype):
    t = _trainer(small_store, tmp_path, f"train.precision={precision}", "train.max_steps=3")
    seen = _activation_dtypes(t.model)
    summary = fit(t)
    assert summary["steps"] == 3 and summary["nonfinite_steps"] == 0
    assert seen == {dtype}                                   # every matmul/conv ran in bf16 (or not)
    assert t.model.encoder.mu.weight.dtype == torch.float32  # autocast keeps fp32 master weights


def test_fp16_without_gpu_is_refused_with_the_fix(small_store, tmp_path):
    with pytest.raises(UserError, match="train.precision=fp16 needs a GPU .* use train.precision=bf16"):
        _trainer(small_store, tmp_path, "train.precision=fp16")


def test_gradient_clipping_bounds_the_update(small_store, tmp_path):
    t = _trainer(small_store, tmp_path, "train.grad_clip=0.5", "train.optim.name=sgd",
                 "train.optim.momentum=0", "train.lr=1.0")
    batch = next(iter(t.loader))
    before = [p.detach().clone() for p in t.model.parameters()]
    metrics = train_step(t, [batch])
    assert metrics["opt/model/grad_norm"] > 0.5          # the raw norm is logged
    step = torch.linalg.vector_norm(torch.cat([(p.detach() - b).flatten()
                                               for p, b in zip(t.model.parameters(), before)]))
    assert step.item() == pytest.approx(0.5, rel=1e-3)   # lr 1 x clipped norm 0.5


MLP = ["model=mlp", "model.in_features=256", "model.out_features=2",
       "data.inputs={x: spins, y: phase}", "train.optim.name=sgd", "train.optim.momentum=0",
       "train.lr=0.5"]


def test_gradient_accumulation_of_two_batches_equals_one_step_on_both(small_store, tmp_path):
    """SGD without momentum: the weights after 2 accumulated micro-batches equal one step on the
    two concatenated (a sum instead of a mean would double the update)."""
    store = (small_store[0], [o for o in small_store[1] if not o.startswith("model.")])
    acc = _trainer(store, tmp_path / "acc", *MLP, "train.accumulate=2")
    one = _trainer(store, tmp_path / "one", *MLP)
    assert acc.steps_per_epoch == len(acc.loader) // 2
    start = {k: v.clone() for k, v in one.model.state_dict().items()}
    for k, v in acc.model.state_dict().items():
        torch.testing.assert_close(v, start[k], rtol=0, atol=0)   # same seed: same initial weights
    batches = []
    for batch in one.loader:
        batches.append(batch)
        if len(batches) == 2:
            break
    train_step(acc, batches)
    train_step(one, [{k: torch.cat([b[k] for b in batches]) for k in batches[0]}])
    moved = 0.0
    for k, v in one.model.state_dict().items():
        torch.testing.assert_close(acc.model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved = max(moved, (v - start[k]).abs().max().item())
    assert moved > 1e-3                                          # the step did move the weights


def test_early_stopping_after_patience_validations(small_store, tmp_path):
    t = _trainer(small_store, tmp_path, "train.epochs=10", "train.early_stopping.metric=val/loss",
                 "train.early_stopping.patience=2", "train.early_stopping.min_delta=1e9")
    summary = fit(t)
    assert len(summary["history"]) == 3     # best at the first, then 2 without improvement
    assert summary["steps"] == 3 * t.steps_per_epoch


def test_keeps_last_k_step_checkpoints_plus_last_best_final(small_store, tmp_path):
    t = _trainer(small_store, tmp_path, "train.max_steps=6", "train.checkpoint.every_steps=1",
                 "train.checkpoint.keep=2", "train.val_every=2")
    fit(t)
    names = sorted(p.name for p in (tmp_path / "train" / "checkpoints").iterdir())
    assert names == ["best.pt", "final.pt", "last.pt", "step-00000005.pt", "step-00000006.pt"]
    ck = load(tmp_path / "train" / "checkpoints" / "last.pt")
    assert ck["step"] == 6 and len(ck["rng"]) == 1 and ck["code_version"] != ""
    assert set(ck) >= {"model", "optimizers", "schedulers", "loader", "config", "wandb_run_id"}


def test_resume_auto_skips_a_corrupt_newest_checkpoint(small_store, tmp_path, capsys):
    fit(_trainer(small_store, tmp_path, "train.max_steps=4", "train.checkpoint.every_steps=2"))
    folder = tmp_path / "train" / "checkpoints"
    (folder / "step-00000099.pt").write_bytes(b"truncated")
    t = _trainer(small_store, tmp_path, "train.max_steps=6", "train.resume=auto")
    assert t.progress.step == 4
    assert "skipping unreadable checkpoint" in capsys.readouterr().out


def test_a_model_whose_optimizers_share_parameters_is_refused(small_store, tmp_path, monkeypatch):
    from models.base import OptimizerSpec
    from models.vae import VAE
    monkeypatch.setattr(VAE, "optimizers", lambda self: [OptimizerSpec("a", self.encoder),
                                                        OptimizerSpec("b", self)])
    with pytest.raises(UserError, match="optimizers 'a' and 'b' share parameters"):
        _trainer(small_store, tmp_path)


def test_seeds_differ_per_rank_and_repeat_per_run():
    from pipeline.train.run import seed_for
    assert seed_for(0, 0) == seed_for(0, 0) and seed_for(0, 0) != seed_for(0, 1)
    assert seed_for(0, 0, 1) != seed_for(0, 0, 0) and not math.isnan(seed_for(1, 2))


@pytest.mark.parametrize("check_s, acted_at", [(1.0, 12), (0.0, 5)])
def test_a_signal_is_agreed_on_at_the_next_check_spaced_by_signal_check_s(
        small_store, tmp_path, monkeypatch, check_s, acted_at):
    """Ranks agree at steps 1 and 2, then every signal_check_s by rank 0's measured step time. A
    clock advancing 0.1 s per agreement makes that 1 step per 0.1 s: with check_s 1.0 the third
    agreement is 10 steps after the second, at step 12; check_s 0 agrees at every step. The
    SIGTERM is real: sent to this process, caught by the trainer's own handler."""
    import types

    import pipeline.runtime.preemption as preemption_module
    t = _trainer(small_store, tmp_path, f"train.dist.signal_check_s={check_s}")
    batch = next(iter(t.loader))
    clock = iter(range(1, 1000))
    monkeypatch.setattr(preemption_module, "time", types.SimpleNamespace(
        perf_counter=lambda: 0.1 * next(clock)))
    acted = None
    with preemption_module.PreemptionFlag() as flag:
        t.preemption.flag = flag
        for step in range(1, 20):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # arrives before step 5
            train_step(t, [batch])
            t.progress.step = step
            if t.preemption.agreed:
                acted = step
                break
    assert acted == acted_at and flag.signum == signal.SIGTERM


def test_real_sigusr1_during_step_5_checkpoints_step_5_and_exits_75(small_store, tmp_path,
                                                                     monkeypatch, capsys):
    """`hpcforge train` (one process, in this one): a hook sends this process a real SIGUSR1 as
    step 5 starts; the trainer checkpoints step 5 and the command returns 75 (requeue me)."""
    from hpcforge import cli
    from pipeline.train import loop
    step = loop.train_step

    def train_step(run, batches):
        if run.progress.step + 1 == 5:
            os.kill(os.getpid(), signal.SIGUSR1)
        return step(run, batches)
    monkeypatch.setattr(loop, "train_step", train_step)
    path, overrides = small_store
    code = cli.main(["train", *overrides[1:], f"data.path={path}", f"output_dir={tmp_path}",
                     "train.dist.backend=none", "train.dist.nproc=1", "train.batch_size=16",
                     "train.max_steps=40", "train.dist.signal_check_s=0",
                     "train.logger.mode=disabled"])
    out = capsys.readouterr()
    assert code == 75, out.out[-2000:] + out.err[-2000:]
    last = tmp_path / "train" / "checkpoints" / "last.pt"
    assert load(last)["step"] == 5
    assert "SIGUSR1: checkpointed step 5 to " in out.out and "exit 75 (requeue me)" in out.out
    assert not (tmp_path / "train" / "checkpoints" / "final.pt").exists()


def test_image_hooks_add_physics_only_for_a_model_that_samples_on_a_source_with_observables():
    """The loop draws whatever hooks `build` chose; a VAE on Ising data gets the physics plots
    and their W1 distances, a classifier or a source without observables only its figures."""
    from models import MODELS
    from pipeline.train.image_hooks import draw_all, image_hooks, model_figures
    torch.manual_seed(0)
    vae = MODELS["vae"][1](MODELS["vae"][0](image_size=16))
    mlp = MODELS["mlp"][1](MODELS["mlp"][0]())
    assert image_hooks(mlp, "ising2d", True, None) == [model_figures]
    assert image_hooks(vae, "npy", True, None) == [model_figures]        # declares none
    assert image_hooks(vae, "ising2d", False, None) == [model_figures]   # no samples to compare
    hooks = image_hooks(vae, "ising2d", True, None)
    assert len(hooks) == 2
    vae.train()
    batch = {"x": torch.rand(8, 1, 16, 16).round()}
    state = torch.get_rng_state()
    images, metrics = draw_all(hooks, vae, batch)
    assert torch.equal(torch.get_rng_state(), state)           # training's RNG untouched
    assert not vae.training                                     # drawn in eval mode
    assert set(images) >= set(vae.figures(batch)) and len(images) > len(vae.figures(batch))
    assert metrics and all(k.startswith("physics/") and math.isfinite(v) for k, v in metrics.items())


def test_each_critic_update_draws_its_own_batch_and_each_schedule_counts_its_updates(small_store,
                                                                                    tmp_path):
    """WGAN-GP, n_critic=2 (Gulrajani et al. 2017, Algorithm 1): a step takes two batches, one per
    critic update, and the critic's cosine schedule spans its 2 updates a step, so after one of
    three steps both networks are a third of the way down their schedules."""
    from pipeline.train.loop import batch_groups
    from pipeline.train.optim import lr_factor
    store = (small_store[0], [o for o in small_store[1] if not o.startswith("model.")])
    t = _trainer(store, tmp_path, "model=wgan_gp", "model.image_size=16", "model.channels=[32,16]",
                 "model.n_critic=2", "train.schedule.name=cosine", "train.schedule.warmup_steps=0",
                 "train.schedule.min_lr_ratio=0.1", "train.max_steps=3")
    assert t.steps_per_epoch == len(t.loader) // 2
    seen: dict[str, list[bytes]] = {"critic": [], "generator": []}
    model_losses = t.model.losses

    def losses(batch, phase):
        seen[phase].append(batch["x"].numpy().tobytes())
        return model_losses(batch, phase)
    t.model.losses = losses
    group = next(batch_groups(t))
    assert len(group) == 2
    train_step(t, group)
    assert seen["critic"] == [b["x"].numpy().tobytes() for b in group]  # one fresh batch each
    assert seen["critic"][0] != seen["critic"][1] and len(seen["generator"]) == 1
    critic, generator = t.phases
    third = lr_factor(t.cfg.train.schedule, 1, 3, 1.0)
    for phase in (critic, generator):
        group_lr = phase.optimizer.param_groups[0]
        assert group_lr["lr"] == pytest.approx(third * group_lr["initial_lr"]), phase.name
    assert (critic.scheduler.last_epoch, generator.scheduler.last_epoch) == (2, 1)


def test_a_store_too_small_for_the_critics_fresh_batches_is_refused_in_one_line(small_store,
                                                                                 tmp_path, capsys):
    """WGAN-GP draws a batch group per critic update (n_critic=5): 4 batches of 128 per rank pass
    the CLI's one-batch check, and the run must then refuse them before training, not train for
    zero steps."""
    from hpcforge import cli
    path, overrides = small_store
    code = cli.main(["train", *overrides[1:], f"data.path={path}", f"output_dir={tmp_path}",
                     "model=wgan_gp", "model.image_size=16", "model.channels=[16,8]", "train.dist.backend=none",
                     "train.dist.nproc=1", "train.batch_size=128", "train.logger.mode=disabled"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0
    assert "model wgan_gp draws 5 batches of 128 per step (5 updates x train.accumulate=1)" in err
    assert "each rank's train split gives 4" in err
    assert not (tmp_path / "train" / "checkpoints").exists() or \
        not any((tmp_path / "train" / "checkpoints").iterdir())
