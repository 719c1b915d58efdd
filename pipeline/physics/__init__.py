"""Physical observables of generated and real samples, and the distances between their distributions.

NumPy for the observables; SciPy (W1, the Fréchet matrix square root) and scikit-learn (ROC AUC)
for the distances. Every observable takes samples in physical units, the sample axis first.

Each data source declares its own `OBSERVABLES` (an `Observables` built from the functions here)
next to its generator, in pipeline/sources/<name>.py: the per-sample scalars whose
distributions are compared (1-Wasserstein) and the per-sample profiles whose means are drawn
(figures.py). `compare` is the one chain denormalise -> observables -> W1 that training figures
and `hpcforge evaluate` share (issue 17), so callers never branch on the source themselves.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Arrays = dict[str, np.ndarray]


# --------------------------------------------------------------------------- Ising
def _lattice(spins: np.ndarray) -> np.ndarray:
    """(N, L, L) or (N, 1, L, L) -> (N, L, L)."""
    s = np.asarray(spins)
    return s[:, 0] if s.ndim == 4 else s


def ising_magnetization(spins: np.ndarray) -> np.ndarray:
    """Magnetisation per spin, sum(s) / L^2, of each configuration: (N,)."""
    return _lattice(spins).astype(np.float64).mean(axis=(-1, -2))


def ising_energy(spins: np.ndarray) -> np.ndarray:
    """Energy per spin H / L^2 with H = -sum_<ij> s_i s_j (J = 1), periodic, each bond once:
    (N,)."""
    s = _lattice(spins).astype(np.float64)
    bonds = s * np.roll(s, 1, axis=-1) + s * np.roll(s, 1, axis=-2)
    return -bonds.sum(axis=(-1, -2)) / (s.shape[-1] * s.shape[-2])


def to_spins(x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Spins +-1 from values in [-1, 1]: Bernoulli with P(+1) = (x + 1) / 2 when `rng` is given
    (a Bernoulli decoder's mean is a probability, not a spin), else the sign (ties to +1)."""
    x = np.asarray(x, np.float64)
    if rng is None:
        return np.where(x >= 0, 1, -1).astype(np.int8)
    p = np.clip((x + 1) / 2, 0, 1)
    return np.where(rng.random(x.shape) < p, 1, -1).astype(np.int8)


# --------------------------------------------------------------------------- calorimeter showers
def shower_total_energy(deposits: np.ndarray) -> np.ndarray:
    """Visible energy of each shower (N, layers, eta, phi) -> (N,)."""
    return np.asarray(deposits, np.float64).sum(axis=(1, 2, 3))


def longitudinal_profile(deposits: np.ndarray) -> np.ndarray:
    """Fraction of each shower's energy in each layer: (N, layers), rows sum to 1 (0 if empty)."""
    per_layer = np.asarray(deposits, np.float64).sum(axis=(2, 3))
    total = per_layer.sum(axis=1, keepdims=True)
    return np.divide(per_layer, total, out=np.zeros_like(per_layer), where=total > 0)


def radial_distance(eta: int, phi: int) -> np.ndarray:
    """Distance of each cell centre from the centre of the (eta, phi) face, in cells."""
    i = np.arange(eta) - (eta - 1) / 2
    j = np.arange(phi) - (phi - 1) / 2
    return np.hypot(i[:, None], j[None, :])


def radial_profile(deposits: np.ndarray) -> np.ndarray:
    """Fraction of each shower's energy (summed over layers) in unit-width rings around the
    centre of the face: (N, R), ring r holding cells at distance [r, r + 1) cells."""
    d = np.asarray(deposits, np.float64).sum(axis=1)              # (N, eta, phi)
    ring = radial_distance(*d.shape[1:]).astype(int).ravel()
    per_ring = np.stack([np.bincount(ring, weights=x.ravel(), minlength=ring.max() + 1) for x in d])
    total = per_ring.sum(axis=1, keepdims=True)
    return np.divide(per_ring, total, out=np.zeros_like(per_ring), where=total > 0)


def shower_depth(deposits: np.ndarray) -> np.ndarray:
    """Energy-weighted mean layer index of each shower: (N,)."""
    prof = longitudinal_profile(deposits)
    return prof @ np.arange(prof.shape[1])


def shower_width(deposits: np.ndarray) -> np.ndarray:
    """Energy-weighted mean distance from the face centre, in cells: (N,)."""
    d = np.asarray(deposits, np.float64).sum(axis=1)
    r = radial_distance(*d.shape[1:])
    total = d.sum(axis=(1, 2))
    return np.divide((d * r).sum(axis=(1, 2)), total, out=np.zeros_like(total), where=total > 0)


# --------------------------------------------------------------------------- fields
def power_spectrum(fields: np.ndarray) -> np.ndarray:
    """Radially averaged power spectrum of 2-D fields (N, [C,] H, W) -> (N, K).

    |FFT|^2 of the mean-free field (channels averaged), averaged over integer wavenumber shells
    k = round(|k_vec|), k = 0 .. min(H, W) // 2; shells beyond the Nyquist circle are dropped.
    """
    f = np.asarray(fields, np.float64)
    f = f.mean(axis=1) if f.ndim == 4 else f
    h, w = f.shape[-2:]
    f = f - f.mean(axis=(-1, -2), keepdims=True)
    power = np.abs(np.fft.fft2(f)) ** 2 / (h * w)
    ky, kx = np.fft.fftfreq(h) * h, np.fft.fftfreq(w) * w
    shell = np.rint(np.hypot(ky[:, None], kx[None, :])).astype(int).ravel()
    k_max = min(h, w) // 2
    counts = np.bincount(shell, minlength=k_max + 1)[:k_max + 1]
    spec = np.stack([np.bincount(shell, weights=p.ravel(), minlength=k_max + 1)[:k_max + 1]
                     for p in power])
    return spec / np.maximum(counts, 1)


def field_mean(fields: np.ndarray) -> np.ndarray:
    return np.asarray(fields, np.float64).reshape(len(fields), -1).mean(axis=1)


def field_std(fields: np.ndarray) -> np.ndarray:
    return np.asarray(fields, np.float64).reshape(len(fields), -1).std(axis=1)


# --------------------------------------------------------------------------- distances
def wasserstein1(u: np.ndarray, v: np.ndarray) -> float:
    """1-Wasserstein distance between the empirical distributions of two 1-D samples
    (`scipy.stats.wasserstein_distance`, exact for step CDFs)."""
    from scipy.stats import wasserstein_distance
    u, v = np.ravel(u).astype(np.float64), np.ravel(v).astype(np.float64)
    if not (len(u) and len(v)):
        raise ValueError(f"wasserstein1: empty sample (sizes {len(u)} and {len(v)})")
    return float(wasserstein_distance(u, v))


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a (N, D) and b (M, D):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017, arXiv:1706.08500)."""
    from scipy import linalg
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet_distance: expected two (N >= 2, D) feature sets with the same D, "
                         f"got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    # eps on the diagonal: features that are constant in both sets (dead ReLUs) make the
    # covariances singular, and sqrtm of a singular product is ill-defined (pytorch-fid does the
    # same)
    offset = np.eye(a.shape[1]) * eps
    s_a = np.atleast_2d(np.cov(a, rowvar=False)) + offset
    s_b = np.atleast_2d(np.cov(b, rowvar=False)) + offset
    covmean = linalg.sqrtm(s_a @ s_b)
    covmean = np.real(covmean)  # tiny imaginary parts are numerical noise
    d = float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))
    return max(d, 0.0)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (scikit-learn's `roc_auc_score`): the probability that a random
    positive (label 1) scores above a random negative, ties counting one half."""
    from sklearn.metrics import roc_auc_score
    scores, labels = np.ravel(scores).astype(np.float64), np.ravel(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not (n_pos and n_neg):
        raise ValueError(f"roc_auc: need both classes, got {n_pos} positives and {n_neg} negatives")
    return float(roc_auc_score(labels, scores))


# --------------------------------------------------------------------------- per source
def no_profiles(x: np.ndarray) -> Arrays:
    return {}


@dataclass(frozen=True)
class Observables:
    """What to compare for one source's main variable (samples in physical units); a source
    module declares it as its OBSERVABLES."""
    scalars: Callable[[np.ndarray], Arrays]    # name -> (N,) per-sample values, compared by W1
    profiles: Callable[[np.ndarray], Arrays] = no_profiles  # name -> (N, K) curves, mean drawn
    binary: bool = False                       # two-level variable (spins): sample it, see to_spins


def ising_scalars(s: np.ndarray) -> Arrays:
    m = ising_magnetization(s)
    return {"magnetization": m, "abs_magnetization": np.abs(m), "energy": ising_energy(s)}


def shower_scalars(d: np.ndarray) -> Arrays:
    return {"total_energy": shower_total_energy(d), "shower_depth": shower_depth(d),
            "shower_width": shower_width(d)}


def shower_profiles(d: np.ndarray) -> Arrays:
    return {"longitudinal_profile": longitudinal_profile(d), "radial_profile": radial_profile(d)}


def field_scalars(f: np.ndarray) -> Arrays:
    return {"mean": field_mean(f), "std": field_std(f)}


def field_profiles(f: np.ndarray) -> Arrays:
    return {"power_spectrum": power_spectrum(f)}


def sequence_scalars(x: np.ndarray) -> Arrays:
    """Sequences (N, T, sites): mean state and mean energy x^2 / 2 (Lorenz-96's)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    return {"mean": x.mean(1), "energy": 0.5 * (x ** 2).mean(1)}


# --------------------------------------------------------------------------- comparison
@dataclass(frozen=True)
class Comparison:
    """Real and generated samples of one source in physical units, their per-sample scalar
    observables and the W1 distance of each ("w1/<name>")."""
    observables: Observables
    real: np.ndarray
    generated: np.ndarray
    real_scalars: Arrays
    generated_scalars: Arrays
    distances: dict[str, float]

    def profiles(self) -> tuple[Arrays, Arrays]:
        """(real, generated) per-sample profiles; empty when the source declares none."""
        return self.observables.profiles(self.real), self.observables.profiles(self.generated)


def physical(obs: Observables, x: np.ndarray, affine: tuple[np.ndarray, np.ndarray] | None = None,
             rng: np.random.Generator | None = None) -> np.ndarray:
    """Samples in physical units: denormalised when `affine` (the loader's normalisation) is given.
    A two-level variable (spins) follows the one spin-conversion rule of pipeline/physics/thermo.py
    whoever asks (training figures, evaluate): drawn with P(+1) = (x + 1) / 2, from `rng` or a
    fixed-seed generator, never thresholded (exact +-1 values stay what they are)."""
    x = denormalize(x, affine) if affine is not None else np.asarray(x)
    if not obs.binary:
        return x
    return to_spins(x, rng if rng is not None else np.random.default_rng(0))


def compare(obs: Observables, real: np.ndarray, generated: np.ndarray) -> Comparison:
    """W1 between the distributions of each scalar observable of `real` and `generated`
    (both in physical units, see `physical`): the one chain behind training figures and
    `hpcforge evaluate` (issue 17)."""
    r, g = obs.scalars(real), obs.scalars(generated)
    w1 = {f"w1/{k}": wasserstein1(r[k], g[k]) for k in r}
    return Comparison(obs, np.asarray(real), np.asarray(generated), r, g, w1)


# --------------------------------------------------------------------------- units
def denormalize(x: np.ndarray, affine: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Normalised samples (N, C, ...) back to physical units, per channel."""
    shift, scale = (np.atleast_1d(a) for a in affine)
    x = np.asarray(x, np.float64)
    view = (1, -1) + (1,) * (x.ndim - 2) if x.ndim >= 2 else (-1,)
    return x * scale.reshape(view) + shift.reshape(view)
