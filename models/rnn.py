"""Recurrent networks (Elman RNN, LSTM of Hochreiter & Schmidhuber 1997, GRU of Cho et al. 2014)
over sequences (B, T, F), with a many-to-one head (last step) or a many-to-many head (every step).

Stateful mode: a long sequence folded into consecutive batches (row b of batch k+1 continues row b
of batch k) keeps its hidden state between batches, detached at each boundary so gradients flow
only within a batch (truncated BPTT, Williams & Peng 1990). Training and evaluation carry separate
states, so validating mid-stream leaves the training stream intact. Call `reset_state()` at the
start of every new sequence (e.g. each epoch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.base import Batch, check_shape
from models.figures import forecast_figure
from models.objectives import Supervised, check_loss, supervised_losses

State = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None  # (h) or (h, c) for the LSTM
CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@dataclass
class RNNConfig:
    input_size: int = 1                 # features F per time step
    hidden_size: int = 32
    num_layers: int = 1
    cell: Literal["rnn", "lstm", "gru"] = "lstm"
    dropout: float = 0.0                # between stacked layers (num_layers > 1)
    output: Literal["many_to_one", "many_to_many"] = "many_to_many"  # last step, or every step
    out_features: int = 1               # regression targets (mse) or classes (ce, hinge) per output
    loss: Literal["mse", "ce", "hinge"] = "mse"
    stateful: bool = False              # carry the hidden state across batches (truncated BPTT)


def detach(state: State) -> State:
    if isinstance(state, tuple):
        return tuple(s.detach() for s in state)  # type: ignore[return-value]
    return None if state is None else state.detach()


class RNN(Supervised):
    def __init__(self, cfg: RNNConfig):
        super().__init__()
        check_loss("rnn", cfg.loss, ("mse", "ce", "hinge"))
        if cfg.cell not in CELLS or cfg.output not in ("many_to_one", "many_to_many"):
            raise ValueError(f"rnn: cell {cfg.cell!r} / output {cfg.output!r}: expected a cell in "
                             f"{', '.join(CELLS)} and output many_to_one or many_to_many")
        self.cfg = cfg
        # (B, T, F) -> (B, T, hidden_size)
        self.rnn = CELLS[cfg.cell](cfg.input_size, cfg.hidden_size, cfg.num_layers,
                                   batch_first=True,
                                   dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        # (B, [T,] hidden_size) -> (B, [T,] out_features)
        self.head = nn.Linear(cfg.hidden_size, cfg.out_features)
        # carried state by mode (self.training); not buffers: it belongs to the data stream
        self.states: dict[bool, State] = {True: None, False: None}

    @property
    def state(self) -> State:
        """The hidden state carried into the next batch in the current mode."""
        return self.states[self.training]

    def reset_state(self) -> None:
        """Forget the carried hidden states (stateful mode); the next batch starts from zeros."""
        self.states = {True: None, False: None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, T, out_features) many-to-many, or (B, out_features) many-to-one."""
        check_shape("rnn input x", x, (None, None, self.cfg.input_size))
        state = self.state if self.cfg.stateful else None
        if state is not None:
            carried = (state[0] if isinstance(state, tuple) else state).shape[1]
            if carried != x.shape[0]:
                raise ValueError(f"rnn (stateful): batch size {x.shape[0]} differs from the "
                                 f"carried state's {carried}; keep the batch size fixed within a "
                                 f"sequence (drop the last partial batch) or call reset_state()")
        out, new_state = self.rnn(x, state)
        if self.cfg.stateful:
            self.states[self.training] = detach(new_state)  # truncated BPTT
        return self.head(out if self.cfg.output == "many_to_many" else out[:, -1])

    def losses(self, batch: Batch, phase: str) -> dict[str, torch.Tensor]:
        out = self(batch["x"])
        if self.cfg.loss != "mse" and out.dim() == 3:
            out = out.transpose(1, 2)  # per-step classes: (B, T, K) -> (B, K, T) against y (B, T)
        return supervised_losses(out, batch["y"], self.cfg.loss)

    @torch.no_grad()
    def figures(self, batch: Batch) -> dict[str, torch.Tensor]:
        if self.cfg.output != "many_to_many" or self.cfg.loss != "mse":
            return {}
        saved = dict(self.states)  # a figure must not advance the carried state
        self.states[self.training] = None
        pred = self(batch["x"][:8])[..., 0]
        self.states = saved
        return forecast_figure(pred, batch["y"][:8, :, 0])


def build(cfg: RNNConfig) -> RNN:
    return RNN(cfg)
