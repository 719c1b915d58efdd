"""Where a training run is (`Progress`): the step, the epoch and the counts that go on across a
resume. Its own module, below pipeline.train.run, so that the parts a Run holds
(pipeline.train.nonfinite) can name it without importing the Run.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Progress:
    """Where the run is; a checkpoint holds all of it, so a resumed run goes on exactly."""
    step: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    nonfinite_total: int = 0        # skipped steps in the whole run
    nonfinite_run: int = 0          # skipped steps in a row, ending now
    stop_best: float | None = None  # early stopping: the best value so far
    stop_bad: int = 0               # early stopping: validations since it
