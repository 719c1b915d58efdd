"""Supervised families (mlp, cnn, resnet, dilated_cnn, cnn1d, unet): each fits a small fixed batch,
plus the structure its config promises. Factors are stated in the test names."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import cnn
from models.blocks import BasicBlock
from models.objectives import relative_l2
from models_testkit import (ends, frequencies, make, one_thread,  # one_thread: autouse
                            sines, train)


def stripes(n: int = 16, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy horizontal (label 0) or vertical (label 1) stripes, (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    bars = (torch.arange(size) % 4 < 2).float()
    x = torch.where(y[:, None, None] == 0, bars[:, None].expand(n, size, size),
                    bars[None, :].expand(n, size, size))
    return (x + 0.3 * torch.randn(n, size, size, generator=g)).unsqueeze(1), y


def smooth_fields(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Random fields and their 5x5 box average: a local operator for dense models to learn."""
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0))
    return x, F.avg_pool2d(x, 5, 1, 2)

# --------------------------------------------------------------------------- mlp
@pytest.mark.parametrize("loss,out", [("ce", 3), ("hinge", 3), ("bce", 1), ("mse", 2)])
def test_mlp_fits_fixed_batch_loss_falls_20x(loss, out):
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    y = {"ce": torch.randint(0, 3, (32,)), "hinge": torch.randint(0, 3, (32,)),
         "bce": (x[:, 0] > 0).float(), "mse": torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin()], 1)}
    model = make("mlp", in_features=8, hidden=(32, 32), out_features=out, loss=loss)
    first, last = ends(train(model, {"x": x, "y": y[loss]}, 60)["model"])
    assert last < first / 20


def test_mlp_flattens_samples_of_in_features_values():
    model = make("mlp", in_features=64, out_features=10).eval()
    images = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(images), model(images.flatten(1)))


def test_mlp_hinge_is_multiclass_margin_loss():
    model = make("mlp", in_features=4, hidden=(8,), out_features=3, loss="hinge")
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    assert torch.allclose(model.losses({"x": x, "y": y}, "model")["loss"],
                          F.multi_margin_loss(model(x), y))


def test_mlp_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="out_features 1"):
        make("mlp", out_features=2, loss="bce")
    with pytest.raises(ValueError, match="relu, tanh, gelu, sigmoid"):
        make("mlp", activation="swish")


def test_labels_out_of_range_or_float_are_rejected():
    model = make("mlp", in_features=4, out_features=3)
    with pytest.raises(ValueError, match=r"in \[0, 3\), got values in \[0, 5\]"):
        model.losses({"x": torch.randn(2, 4), "y": torch.tensor([0, 5])}, "model")
    with pytest.raises(ValueError, match="expected integer class indices, got dtype torch.float32"):
        model.losses({"x": torch.randn(2, 4), "y": torch.tensor([0.0, 1.0])}, "model")
    int8 = torch.tensor([0, 2], dtype=torch.int8)  # stores keep small labels as int8
    assert torch.isfinite(model.losses({"x": torch.randn(2, 4), "y": int8}, "model")["loss"])


# --------------------------------------------------------------------------- cnn
def test_cnn_presets_set_the_architecture():
    lenet = make("cnn", preset="lenet5")
    assert [m.kernel_size for m in lenet.modules() if isinstance(m, nn.Conv2d)] == [(5, 5)] * 2
    assert any(isinstance(m, nn.AvgPool2d) for m in lenet.modules())
    assert any(isinstance(m, nn.Tanh) for m in lenet.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in lenet.modules())
    vgg = make("cnn", preset="vgg")
    assert sum(isinstance(m, nn.Conv2d) for m in vgg.modules()) == 6  # 3 stages x 2 convs
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg.modules()) == 3
    strided = make("cnn", downsample="stride", channels=(4, 8))
    assert [m.stride for m in strided.modules() if isinstance(m, nn.Conv2d)] == [(2, 2)] * 2
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in strided.modules())


@pytest.mark.parametrize("params", [dict(channels=(8, 16)), dict(preset="lenet5"),
                                    dict(channels=(8, 16), downsample="stride", loss="hinge")],
                         ids=["max", "lenet5", "stride-hinge"])
def test_cnn_learns_stripe_orientation_loss_falls_10x(params):
    torch.manual_seed(0)
    x, y = stripes()
    first, last = ends(train(make("cnn", n_outputs=2, **params), {"x": x, "y": y}, 40)["model"])
    assert last < first / 10


@pytest.mark.parametrize("family", ["cnn", "resnet"])
def test_a_one_channel_network_takes_fields_stored_without_a_channel_axis(family):
    """Issue 24: a CNN on a store's (N, 12, 12) layer failed on the missing channel axis; it is
    added for a one-channel network (B, H, W) -> (B, 1, H, W), the same output as with it."""
    params = dict(channels=(4, 8), n_outputs=3) if family == "cnn" else dict(
        stem_channels=4, channels=(4, 8), blocks_per_stage=(1, 1), n_outputs=3)
    model = make(family, **params).eval()
    x = torch.rand(5, 12, 12)
    torch.testing.assert_close(model(x), model(x.unsqueeze(1)))
    two = make(family, **{**params, "in_channels": 2})
    with pytest.raises(ValueError, match=r"expected shape \(\*, 2, \*, \*\), got \(5, 12, 12\)"):
        two(x)                                             # two channels: nothing to guess


def test_cnn_rejects_inputs_smaller_than_its_downsampling():
    with pytest.raises(ValueError, match=r"expected H, W >= 8 .* got \(2, 1, 4, 4\)"):
        make("cnn", channels=(4, 4, 4))(torch.rand(2, 1, 4, 4))


def test_cnn_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="custom, lenet5, vgg"):
        cnn.resolve(cnn.CNNConfig(preset="alexnet"))


# --------------------------------------------------------------------------- resnet
def test_resnet_shortcut_is_identity_unless_shape_changes():
    model = make("resnet", stem_channels=8, channels=(8, 16, 16), blocks_per_stage=(2, 2, 1))
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 5
    projected = [not isinstance(b.shortcut, nn.Identity) for b in blocks]
    assert projected == [False, False, True, False, True]  # first block of stages 2 and 3
    conv = blocks[2].shortcut[0]
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    assert model(torch.rand(2, 1, 16, 16)).shape == (2, 10)


def test_resnet_depth_mismatch_raises():
    with pytest.raises(ValueError, match="blocks_per_stage"):
        make("resnet", channels=(8, 16), blocks_per_stage=(1,))


def test_resnet_learns_stripe_orientation_loss_falls_10x():
    torch.manual_seed(0)
    x, y = stripes()
    model = make("resnet", stem_channels=8, channels=(8, 16), blocks_per_stage=(1, 1), n_outputs=2)
    first, last = ends(train(model, {"x": x, "y": y}, 40)["model"])
    assert last < first / 10


# --------------------------------------------------------------------------- dilated
def test_dilated_keeps_resolution_and_receptive_field_is_1_plus_2_sum_dilations():
    torch.manual_seed(0)
    model = make("dilated_cnn", width=4, dilations=(1, 2, 4)).eval()
    x = torch.rand(1, 1, 33, 33, requires_grad=True)
    out = model(x)
    assert out.shape == (1, 1, 33, 33)
    out[0, 0, 16, 16].backward()
    seen = (x.grad[0, 0].abs() > 0).nonzero()
    extent = seen.max(0).values - seen.min(0).values + 1
    assert extent.tolist() == [15, 15]  # 1 + 2 * (1 + 2 + 4)


def test_dilated_dense_learns_a_smoothing_operator_loss_falls_10x():
    torch.manual_seed(0)
    x, y = smooth_fields()
    model = make("dilated_cnn", width=8, dilations=(1, 2))
    first, last = ends(train(model, {"x": x, "y": y}, 60)["model"])
    assert last < first / 10


# --------------------------------------------------------------------------- cnn1d
def test_cnn1d_forecasts_the_next_window_of_sines_loss_falls_10x():
    torch.manual_seed(0)
    s = sines()
    model = make("cnn1d", seq_len=32, channels=(8, 16), loss="mse", horizon=8)
    first, last = ends(train(model, {"x": s[:, None, :32], "y": s[:, None, 32:]}, 60)["model"])
    assert last < first / 10


def test_cnn1d_classifies_frequency_loss_falls_10x():
    torch.manual_seed(0)
    x, y = frequencies()
    model = make("cnn1d", seq_len=32, channels=(8, 16), n_classes=2)
    first, last = ends(train(model, {"x": x[:, None], "y": y}, 40)["model"])
    assert last < first / 10


def test_cnn1d_rejects_a_seq_len_its_pooling_cannot_halve():
    with pytest.raises(ValueError, match="seq_len 30 must be divisible by 2\\*\\*2"):
        make("cnn1d", seq_len=30, channels=(4, 8))


# --------------------------------------------------------------------------- unet
def test_unet_reports_relative_l2_error():
    torch.manual_seed(0)
    model = make("unet", base_width=4, depth=2)
    x, y = smooth_fields(4)
    terms = model.losses({"x": x, "y": y}, "model")
    out = model(x)  # train-mode BN: same batch, same statistics, same output
    expected = ((out - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1)).mean()
    assert torch.allclose(terms["rel_l2"], expected, rtol=1e-5)
    assert torch.allclose(relative_l2(y, y), torch.tensor(0.0))


def test_unet_learns_field_to_field_loss_and_rel_l2_fall_10x_and_3x():
    torch.manual_seed(0)
    x, y = smooth_fields()
    model = make("unet", base_width=8, depth=2)
    rel_before = model.losses({"x": x, "y": y}, "model")["rel_l2"].item()
    first, last = ends(train(model, {"x": x, "y": y}, 60)["model"])
    assert last < first / 10
    assert model.losses({"x": x, "y": y}, "model")["rel_l2"].item() < rel_before / 3


def test_unet_segmentation_learns_thresholding_loss_falls_5x():
    torch.manual_seed(0)
    x, _ = smooth_fields()
    y = (x[:, 0] > 0.5).long()
    model = make("unet", base_width=4, depth=2, out_channels=2, loss="ce")
    first, last = ends(train(model, {"x": x, "y": y}, 60)["model"])
    assert last < first / 5


def test_unet_rejects_sizes_not_divisible_by_2_pow_depth():
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 8, got \(1, 1, 12, 12\)"):
        make("unet", base_width=4, depth=3)(torch.rand(1, 1, 12, 12))


def test_mse_takes_one_scalar_per_sample_for_one_output():
    """A regression of a per-sample quantity the store keeps as (N,) (a shower's incident energy)
    against one output (B, 1): the same loss as the (B, 1) target; other shapes still refused."""
    from models.base import InputShapeError
    from models.objectives import supervised_losses
    out, y = torch.randn(8, 1), torch.randn(8)
    assert supervised_losses(out, y, "mse")["loss"] == F.mse_loss(out, y[:, None])
    with pytest.raises(InputShapeError, match=r"target y: expected shape \(8, 2\)"):
        supervised_losses(torch.randn(8, 2), y, "mse")
