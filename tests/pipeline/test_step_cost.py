"""The per-step pieces made cheaper for issue 28 keep their meaning: the one-kernel non-finite
check, the lr schedule that only counts while constant, and metric sums taken at log steps."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import ScheduleConfig
from pipeline.train import nonfinite
from pipeline.train.log_window import Sums
from pipeline.train.optim import build_scheduler, lr_factor


def _params(*grads: torch.Tensor) -> list[torch.nn.Parameter]:
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_check_finds_one_bad_value_among_real_and_complex_gradients(bad):
    finite = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64),
              torch.randn(2, 2, dtype=torch.complex64)]
    params = _params(*finite)
    ok = nonfinite.check(params)
    assert ok.shape == () and ok.dtype == torch.float32 and ok.item() == 0.0
    assert all(torch.equal(p.grad, g) for p, g in zip(params, finite))  # values unchanged
    for i in range(len(finite)):
        poisoned = [g.clone() for g in finite]
        poisoned[i].view(-1)[1] = bad
        assert nonfinite.check(_params(*poisoned)).item() == 1.0, i
    one_kind = _params(torch.randn(4), torch.randn(3))
    one_kind[1].grad[0] = bad
    assert nonfinite.check(one_kind, one_kind=True).item() == 1.0
    assert nonfinite.check(_params(torch.randn(4)), one_kind=True).item() == 0.0


@pytest.mark.parametrize("cfg", [ScheduleConfig(), ScheduleConfig(warmup_steps=3),
                                 ScheduleConfig(name="cosine", warmup_steps=2),
                                 ScheduleConfig(name="step", step_size=2, gamma=0.5)])
def test_the_schedule_gives_lambdalrs_lrs_and_state_at_every_step(cfg):
    """Constant after warm-up: step only counts; the lrs and the checkpointed state are what
    torch's LambdaLR gives for the same factor."""
    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ours, theirs = opt(), opt()
    mine = build_scheduler(ours, cfg, total=10, scale=2.0)
    ref = torch.optim.lr_scheduler.LambdaLR(theirs, lambda s: lr_factor(cfg, s, 10, 2.0))
    for _ in range(12):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"])
        ours.step(), theirs.step()
        mine.step(), ref.step()
    state, expected = mine.state_dict(), ref.state_dict()
    assert state.keys() == expected.keys()
    assert state["last_epoch"] == expected["last_epoch"] == 12
    assert state["_last_lr"] == pytest.approx(expected["_last_lr"])
    again = build_scheduler(opt(), cfg, total=10, scale=2.0)
    again.load_state_dict(state)  # a resumed run goes on counting from there
    assert again.last_epoch == 12
    if cfg.name == "constant":
        assert mine._constant_from == cfg.warmup_steps
    else:
        assert mine._constant_from == math.inf


def test_sums_average_each_key_over_the_steps_that_have_it_across_folds():
    sums = Sums()
    n = Sums.FOLD * 2 + 7  # crosses two folds
    for step in range(1, n + 1):
        metrics = {"model/loss": torch.tensor(float(step)), "opt/model/lr": 0.5 * step}
        if step % 10 == 0:  # a log step's extra entries
            metrics["opt/model/grad_norm"] = torch.tensor(float(step), dtype=torch.float64)
        sums.add(metrics)
    means = sums.means()
    assert means["model/loss"] == pytest.approx((n + 1) / 2)
    assert means["opt/model/lr"] == pytest.approx(0.5 * (n + 1) / 2)
    tens = list(range(10, n + 1, 10))
    assert means["opt/model/grad_norm"] == pytest.approx(sum(tens) / len(tens))
    assert sums.means() == {}  # cleared
