"""The fno family (models/fno.py, on neuraloperator's FNO): one set of weights at any resolution, a
short run that learns a smoothing operator, and its weights surviving a save and load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models_testkit import ends, make, one_thread, train  # one_thread: autouse

TINY = dict(modes=4, width=8, n_layers=2)


def smooth_fields(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fields and their 5x5 box average: a low-pass operator, what Fourier layers express."""
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    return x, F.avg_pool2d(x, 5, 1, 2)


def test_fno_maps_fields_at_any_resolution_with_the_same_weights():
    model = make("fno", in_channels=2, out_channels=3, **TINY).eval()
    for size in (15, 16, 33):  # odd sizes too: the FNO paper's 85 x 85 grid needs no padding
        assert model(torch.rand(2, 2, size, size)).shape == (2, 3, size, size)
    with pytest.raises(ValueError, match=r"fno input x: expected shape \(\*, 2, \*, \*\), got \(2, 1, 16, 16\)"):
        model(torch.rand(2, 1, 16, 16))


def test_fno_learns_a_smoothing_operator_loss_falls_10x_and_rel_l2_3x():
    torch.manual_seed(0)
    x, y = smooth_fields()
    model = make("fno", **TINY)
    rel_before = model.losses({"x": x, "y": y}, "model")["rel_l2"].item()
    first, last = ends(train(model, {"x": x, "y": y}, 60)["model"])
    assert last < first / 10
    assert model.losses({"x": x, "y": y}, "model")["rel_l2"].item() < rel_before / 3


def test_fno_weights_round_trip_through_a_saved_state_dict(tmp_path):
    torch.manual_seed(0)
    x, y = smooth_fields(4)
    trained = make("fno", **TINY)
    train(trained, {"x": x, "y": y}, 3)
    torch.save(trained.state_dict(), tmp_path / "fno.pt")
    fresh = make("fno", **TINY)
    assert not torch.equal(fresh.eval()(x), trained.eval()(x))
    fresh.load_state_dict(torch.load(tmp_path / "fno.pt", weights_only=True))
    assert torch.equal(fresh.eval()(x), trained.eval()(x))


def test_fno_config_errors_name_the_field():
    with pytest.raises(ValueError, match="fno: modes 0: expected >= 1"):
        make("fno", modes=0)
    with pytest.raises(ValueError, match="fno: loss 'ce': expected one of mse"):
        make("fno", loss="ce")
