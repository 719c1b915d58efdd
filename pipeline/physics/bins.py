"""The bins of a continuous condition (incident energy): what a source declares (CONDITION_BINS)
and how values fall into them. The data sources use it to declare their bins, evaluation
(pipeline/analysis/binned.py) to judge a generator per bin, so it sits below both."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConditionBins:
    """What a source with a continuous condition asks evaluate to report per bin."""
    n_bins: int = 4                 # quantile bins of the test split's condition
    response: str = ""              # a scalar observable whose mean / condition is the response
    label: str = "condition"        # the condition's name and unit, for the figure's axis
    log: bool = False               # a log axis for the condition (log-uniform energies)


def edges(cond: np.ndarray, n_bins: int) -> np.ndarray:
    """n_bins + 1 edges at the quantiles of `cond`, the first its minimum and the last its
    maximum."""
    return np.quantile(np.asarray(cond, np.float64), np.linspace(0, 1, n_bins + 1))


def index(cond: np.ndarray, bin_edges: np.ndarray) -> np.ndarray:
    """The bin of each value: [e_k, e_k+1) for every bin but the last, which holds its maximum;
    values outside the edges go to the nearest end bin."""
    k = np.searchsorted(bin_edges, np.asarray(cond, np.float64), side="right") - 1
    return np.clip(k, 0, len(bin_edges) - 2)
