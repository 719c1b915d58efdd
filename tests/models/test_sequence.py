"""Sequence families (rnn, transformer): stateful truncated BPTT, attention masking, positional
encoding, and learning to forecast sines."""
from __future__ import annotations

import pytest
import torch

from models.rnn import RNN, RNNConfig
from models_testkit import (ends, frequencies, make, one_thread,  # one_thread: autouse
                            sines, train)


# --------------------------------------------------------------------------- rnn
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_stateful_rnn_gives_the_same_outputs_whole_or_in_consecutive_chunks(cell):
    torch.manual_seed(0)
    model = RNN(RNNConfig(input_size=2, hidden_size=8, num_layers=2, cell=cell, out_features=3,
                          stateful=True)).eval()
    x = torch.randn(3, 24, 2)
    whole = model(x)
    model.reset_state()
    chunks = torch.cat([model(x[:, t:t + 6]) for t in range(0, 24, 6)], dim=1)
    assert chunks.shape == whole.shape == (3, 24, 3)
    assert torch.allclose(whole, chunks, atol=1e-6)


def test_stateless_rnn_starts_every_chunk_from_zero():
    torch.manual_seed(0)
    model = RNN(RNNConfig(input_size=2, hidden_size=8)).eval()
    x = torch.randn(3, 12, 2)
    chunks = torch.cat([model(x[:, :6]), model(x[:, 6:])], dim=1)
    assert torch.allclose(model(x)[:, :6], chunks[:, :6])
    assert not torch.allclose(model(x)[:, 6:], chunks[:, 6:], atol=1e-3)


def test_stateful_rnn_truncates_backprop_at_batch_boundaries():
    torch.manual_seed(0)
    model = RNN(RNNConfig(input_size=1, hidden_size=4, cell="lstm", stateful=True))
    x, y = torch.randn(2, 10, 1), torch.randn(2, 10, 1)
    for t in (0, 5):  # a second backward would fail if the graph reached the first batch
        model.zero_grad()
        model.losses({"x": x[:, t:t + 5], "y": y[:, t:t + 5]}, "model")["loss"].backward()
        assert all(not s.requires_grad for s in model.state)
    h, c = model.state
    assert h.shape == c.shape == (1, 2, 4)
    model.reset_state()
    assert model.state is None


def test_stateful_rnn_keeps_training_and_evaluation_streams_apart():
    torch.manual_seed(0)
    model = RNN(RNNConfig(input_size=1, hidden_size=4, cell="gru", stateful=True))
    x = torch.randn(2, 12, 1)
    whole = model(x)
    model.reset_state()
    first = model(x[:, :6])
    with torch.no_grad():  # a validation pass in between, with its own batch size
        model.eval()(torch.randn(5, 6, 1))
    second = model.train()(x[:, 6:])
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-6)


def test_stateful_rnn_rejects_a_new_batch_size_until_reset():
    model = RNN(RNNConfig(input_size=1, hidden_size=4, stateful=True))
    model(torch.randn(4, 5, 1))
    with pytest.raises(ValueError, match="batch size 3 differs from the carried state's 4"):
        model(torch.randn(3, 5, 1))
    model.reset_state()
    assert model(torch.randn(3, 5, 1)).shape == (3, 5, 1)


def test_stateful_rnn_figures_leave_the_carried_state_alone():
    model = RNN(RNNConfig(input_size=1, hidden_size=4, cell="gru", stateful=True)).eval()
    x = torch.randn(2, 6, 1)
    model(x)
    before = model.state.clone()
    figs = model.figures({"x": torch.randn(8, 6, 1), "y": torch.randn(8, 6, 1)})
    assert figs["forecast"].shape == (1, 1, 24, 6)  # rows: 8 truth, 8 forecast, 8 error
    assert torch.equal(model.state, before)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_learns_next_step_of_sines_loss_falls_10x(cell):
    torch.manual_seed(0)
    s = sines()
    model = make("rnn", hidden_size=16, cell=cell)
    first, last = ends(train(model, {"x": s[:, :-1, None], "y": s[:, 1:, None]}, 60)["model"])
    assert last < first / 10


def test_rnn_many_to_one_classifies_frequency_loss_falls_10x():
    torch.manual_seed(0)
    x, y = frequencies(length=20, gap=0.6)
    model = make("rnn", hidden_size=16, cell="gru", output="many_to_one", out_features=2, loss="ce")
    first, last = ends(train(model, {"x": x[..., None], "y": y}, 60)["model"])
    assert last < first / 10


# --------------------------------------------------------------------------- transformer
def test_positional_encoding_is_sinusoidal():
    model = make("transformer", d_model=16, n_heads=2)
    pe = model.pos.pe
    pos = torch.arange(pe.shape[0]).float()
    assert torch.allclose(pe[:, 0], torch.sin(pos), atol=1e-5)
    assert torch.allclose(pe[:, 1], torch.cos(pos), atol=1e-5)
    assert torch.allclose(pe[:, 14], torch.sin(pos / 10000 ** (14 / 16)), atol=1e-5)


def test_transformer_order_matters_only_through_the_positional_encoding():
    """Mean-pooled self-attention is permutation invariant; the encoding breaks that."""
    torch.manual_seed(0)
    model = make("transformer", d_model=16, n_heads=2, loss="ce", n_classes=3).eval()
    x = torch.randn(2, 8, 1)
    rev = x.flip(1)
    assert not torch.allclose(model(x), model(rev), atol=1e-4)
    model.pos.pe.zero_()
    assert torch.allclose(model(x), model(rev), atol=1e-5)


def test_causal_attention_hides_the_future():
    torch.manual_seed(0)
    model = make("transformer", d_model=16, n_heads=2, causal=True).eval()
    x = torch.randn(2, 8, 1)
    later = x.clone()
    later[:, 5:] += 1.0
    h, h_later = (model.blocks(model.pos(model.embed(t))) for t in (x, later))
    assert torch.allclose(h[:, :5], h_later[:, :5], atol=1e-6)
    assert not torch.allclose(h[:, 5:], h_later[:, 5:], atol=1e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_attention_matches_the_explicit_softmax_it_replaced(causal):
    """forward (scaled_dot_product_attention) = proj(softmax(QK^T/sqrt(d) + mask) V), the
    hand-written attention before issue #16, and `weights` is that softmax."""
    torch.manual_seed(0)
    attn = make("transformer", d_model=16, n_heads=4, causal=causal).blocks[0].attn
    x = torch.randn(2, 7, 16)
    q, k, v = attn.qkv(x).view(2, 7, 3, 4, 4).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / 2.0                        # sqrt(d_head = 4)
    if causal:
        scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    ref = scores.softmax(-1)
    assert torch.allclose(attn.weights(x), ref, atol=1e-6)
    assert torch.allclose(attn(x), attn.proj((ref @ v).transpose(1, 2).reshape(2, 7, 16)), atol=1e-5)


def test_attention_dropout_acts_only_in_training():
    torch.manual_seed(0)
    attn = make("transformer", d_model=16, n_heads=4, dropout=0.5).blocks[0].attn
    x = torch.randn(2, 7, 16)
    assert not torch.allclose(attn.train()(x), attn(x))              # two dropout draws differ
    assert torch.equal(attn.eval()(x), attn(x))


def test_attention_maps_of_chosen_layers_are_causal_row_stochastic_and_what_forward_applies():
    torch.manual_seed(0)
    model = make("transformer", d_model=16, n_heads=2, n_layers=3, causal=True).eval()
    x = torch.randn(2, 6, 1)
    maps = model.attention_maps(x, layers=[0, 2])
    assert sorted(maps) == [0, 2] and maps[2].shape == (2, 2, 6, 6)
    assert torch.allclose(maps[2].sum(-1), torch.ones(2, 2, 6), atol=1e-6)
    below = torch.ones(6, 6, dtype=torch.bool).tril()
    assert (maps[2][..., ~below] == 0).all() and (maps[2][..., below] > 0).all()
    h1 = model.blocks[1](model.blocks[0](model.pos(model.embed(x))))   # layer 2's input
    block = model.blocks[2]
    _, _, v = block.attn.heads(block.ln1(h1))
    mixed = (maps[2] @ v).transpose(1, 2).reshape(2, 6, 16)
    assert torch.allclose(block.attn(block.ln1(h1)), block.attn.proj(mixed), atol=1e-5)
    assert not torch.allclose(maps[0], maps[2], atol=1e-3)
    with pytest.raises(ValueError, match=r"layers \[3\] out of range; the model has layers 0..2"):
        model.attention_maps(x, layers=[3])


def test_transformer_rejects_sequences_longer_than_max_len():
    model = make("transformer", d_model=16, n_heads=2, max_len=10)
    with pytest.raises(ValueError, match=r"T <= max_len 10, got \(1, 11, 1\)"):
        model(torch.randn(1, 11, 1))


def test_transformer_learns_to_forecast_sines_loss_falls_10x():
    torch.manual_seed(0)
    s = sines()
    model = make("transformer", d_model=16, n_heads=2, n_layers=1, d_ff=32, horizon=8)
    batch = {"x": s[:, :32, None], "y": s[:, 32:, None]}
    first, last = ends(train(model, batch, 60, lr=3e-3)["model"])
    assert last < first / 10
