"""What every source declares about the arrays it emits."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Variable:
    shape: tuple[int, ...]   # per sample, without the sample axis
    dtype: str               # numpy dtype name
    description: str = ""


def chunk_rng(seed: int, chunk_index: int) -> np.random.Generator:
    """The random stream of one chunk: a pure function of (seed, chunk_index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, chunk_index]))
