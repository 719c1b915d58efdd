"""Every family against the `models.base.Trainable` contract, over the configurations in
models_testkit.CASES: output shapes, gradients per phase, input checks, figures."""
from __future__ import annotations

import math
import re

import pytest
import torch

from models.base import InputShapeError
from models_testkit import CASES, one_thread  # one_thread: autouse


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test here taking `case` runs once per configuration in CASES."""
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", CASES, ids=[f"{c.family}-{c.tag}" for c in CASES])


def test_output_has_expected_shape(case):
    model = case.build()
    out = case.output(model, case.make_batch())
    assert tuple(out.shape) == case.shape
    assert torch.isfinite(out).all()


def test_each_phase_trains_only_its_own_network_with_finite_gradients(case):
    """Per phase: "loss" is a finite scalar; every parameter of the phase's module gets a finite
    gradient; no other parameter gets one (D's phase does not reach G, G's phase leaves D alone)."""
    model = case.build()
    batch = case.make_batch()
    specs = model.optimizers()
    assert list(model.schedule) == [s.name for s in specs]
    for spec in specs:
        model.zero_grad(set_to_none=True)
        terms = model.losses(batch, spec.name)
        assert terms["loss"].dim() == 0 and torch.isfinite(terms["loss"])
        assert all(torch.isfinite(v).all() for v in terms.values())
        terms["loss"].backward()
        own = {id(p) for p in spec.module.parameters()}
        for name, p in model.named_parameters():
            if id(p) in own:
                assert p.grad is not None, f"phase {spec.name}: no gradient for {name}"
                assert torch.isfinite(p.grad).all(), f"phase {spec.name}: non-finite grad of {name}"
            else:
                assert p.grad is None, f"phase {spec.name}: gradient leaked into {name}"
    owned = [id(p) for s in specs for p in s.module.parameters()]
    assert set(owned) == {id(p) for p in model.parameters()}, "a parameter no optimizer trains"
    # Horovod's DistributedOptimizer hooks each parameter it is given: one optimizer per parameter
    assert len(owned) == len(set(owned)), "a parameter in two optimizers"


def test_wrong_input_shape_names_expected_and_got(case):
    model = case.build()
    batch = case.make_batch()
    batch["x"] = torch.rand(case.bad_x)
    got = re.escape(str(case.bad_x))
    with pytest.raises(InputShapeError, match=r"expected shape \(.*\), got " + got):
        model.losses(batch, model.optimizers()[0].name)


def test_unknown_phase_or_single_optimizer_named_model(case):
    model = case.build()
    names = [s.name for s in model.optimizers()]
    if len(names) == 1:
        assert names == ["model"]
    else:
        with pytest.raises(ValueError, match="unknown phase 'nope'"):
            model.losses(case.make_batch(), "nope")


def test_figures_are_images_in_unit_interval(case):
    model = case.build().eval()
    figs = model.figures(case.make_batch())
    for name, image in figs.items():
        assert image.dim() == 4 and image.shape[1] in (1, 3), f"{name}: {tuple(image.shape)}"
        assert image.min() >= 0 and image.max() <= 1, name
        assert math.prod(image.shape) > 0


def test_figures_hold_the_expected_image(case):
    """Generative and dense models log images; classifiers and many-to-one models log none."""
    figs = case.build().figures(case.make_batch())
    if case.figure is None:
        assert figs == {}
    else:
        assert case.figure in figs

