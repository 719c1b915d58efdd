"""The handwritten digits that scikit-learn ships: 1797 real 8 x 8 images, labels 0-9.

`sklearn.datasets.load_digits` (the UCI "Optical Recognition of Handwritten Digits" test set,
Alpaydin & Kaynak 1998); bundled with scikit-learn, so nothing is downloaded. Its 17 grey levels
0..16 are scaled to [0, 1].

Order: one permutation of the 1797 images, a function of `seed` only, read cyclically; a chunk
asked for samples [start, start + n) holds those positions, whatever the chunk size. So a dataset
of up to 1797 samples holds each image at most once, and sample q >= 1797 repeats sample q - 1797:
a larger dataset repeats images, and its train / validation split then shares them.

Optional upscaling to `size` x `size`: nearest (pixel replication) or bilinear (pixel centres at
half-integers, edges clamped: PyTorch's align_corners=False).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline import physics
from pipeline.core.errors import ConfigError
from pipeline.sources.base import Variable

NATIVE = 8   # sklearn's images are 8 x 8


@dataclass
class Params:
    size: int = 8                  # output side in pixels: 8 (native), 16, 32, ...
    interpolation: Literal["nearest", "bilinear"] = "nearest"   # when size != 8


# What pipeline.analysis.evaluate and the training figures read from a source
# (pipeline/sources/__init__.py)
OBSERVABLES = physics.Observables(physics.field_scalars, physics.field_profiles)
FEATURE_LABEL = "label"   # the variable the Fréchet feature CNN learns to predict


def variables(p: Params) -> dict[str, Variable]:
    return {
        "image": Variable((1, p.size, p.size), "float32", "grey level in [0, 1], 1 = ink"),
        "label": Variable((), "int64", "the digit, 0-9"),
    }


@functools.cache
def load() -> tuple[np.ndarray, np.ndarray]:
    """All images (1797, 8, 8) float32 in [0, 1] and labels (1797,) int64, in sklearn's order."""
    from sklearn.datasets import load_digits  # heavy import, only where used
    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def order(seed: int) -> np.ndarray:
    """The dataset's permutation of sklearn's indices; depends on the seed only."""
    return np.random.default_rng(seed).permutation(load()[1].size)


def _interp_matrix(src: int, dst: int, mode: str) -> np.ndarray:
    """(dst, src) weights resampling one axis; pixel i covers [i, i + 1) on both grids."""
    centres = (np.arange(dst) + 0.5) * src / dst   # dst pixel centres, in src coordinates
    w = np.zeros((dst, src))
    if mode == "nearest":
        w[np.arange(dst), np.floor(centres).astype(int)] = 1.0   # the src pixel that holds it
        return w
    c = np.clip(centres - 0.5, 0, src - 1)   # relative to src pixel centres, edges clamped
    lo = np.floor(c).astype(int)
    hi = np.minimum(lo + 1, src - 1)
    frac = c - lo
    np.add.at(w, (np.arange(dst), lo), 1 - frac)
    np.add.at(w, (np.arange(dst), hi), frac)
    return w


def resize(images: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(n, 8, 8) -> (n, size, size), separable: W x W^T."""
    if size == images.shape[-1]:
        return images
    w = _interp_matrix(images.shape[-1], size, mode)
    return np.einsum("ij,njk,lk->nil", w, images, w)


def generate(p: Params, seed: int, chunk_index: int, start: int, n: int
             ) -> dict[str, np.ndarray]:
    """Images at positions [start, start + n) of the seeded cyclic order."""
    if p.size < 1:
        raise ConfigError(f"data.params.size: {p.size}; expected >= 1 (8 is native)")
    images, labels = load()
    perm = order(seed)
    idx = perm[(start + np.arange(n)) % perm.size]
    image = resize(images[idx], p.size, p.interpolation)
    return {"image": image[:, None].astype(np.float32), "label": labels[idx]}
