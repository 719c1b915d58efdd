"""2-D Darcy flow: pressure u solving -div(a grad u) = f on the unit square, u = 0 on the boundary.

The distribution of the Darcy benchmark of the Fourier Neural Operator paper (Li et al. 2020,
arXiv:2010.08895, sec. 5.2): a = psi(z), z a Gaussian random field with covariance
(-Laplacian + 9 I)^-2 (Neumann), psi = 12 where z >= 0 and 3 elsewhere, f = 1.

Fields live on the s x s nodes of the closed unit square, x_i = i / (s - 1), boundary included, as
in the FNO data (their s = 421, 241, 85); u is 0 on the boundary rows and columns.

Sampling z: as the FNO script GRF.m (alpha = 2, tau = 3), a cosine (Karhunen-Loeve) series
    z = idct2( xi_k * (pi^2 |k|^2 + 9)^-1 ),   xi_k ~ N(0, 1),   k = (k1, k2) in {0..s-1}^2,
with the constant mode k = 0 set to 0 (z has mean 0). GRF.m also multiplies by s * tau^(alpha-1) =
3 s; we drop that constant factor: it cannot change the sign of z, so a is the same.

Solving: 5-point finite volumes on the node-centred control volumes [x - h/2, x + h/2]^2 of the
(s - 2)^2 interior nodes; the coefficient of the face between two nodes is the harmonic mean of a
at the two nodes (exact flux continuity for a piecewise-constant a, the usual choice for
high-contrast media). Integrating over a control volume gives, with h = 1 / (s - 1),
    sum_faces a_f (u_P - u_N) = h^2 f,
a symmetric positive-definite sparse system solved directly (SuperLU, scipy.sparse.linalg.splu).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.sparse
import scipy.sparse.linalg

from pipeline import physics
from pipeline.core.errors import ConfigError
from pipeline.sources.base import Variable, chunk_rng

# FNO benchmark constants (Li et al. 2020, sec. 5.2)
TAU2 = 9.0                 # tau^2 in (-Laplacian + tau^2 I)^-alpha, tau = 3
A_HIGH, A_LOW = 12.0, 3.0  # psi: permeability where z >= 0, and where z < 0


@dataclass
class Params:
    resolution: int = 32    # s: nodes per side, boundary included (FNO: 421, 241, 85)
    forcing: float = 1.0    # f, constant source term (FNO: 1)


# What pipeline.analysis.evaluate and the training figures read from a source
# (pipeline/sources/__init__.py)
OBSERVABLES = physics.Observables(physics.field_scalars, physics.field_profiles)


def variables(p: Params) -> dict[str, Variable]:
    s = p.resolution
    return {
        "permeability": Variable((1, s, s), "float32", "a(x), 12 where the GRF >= 0 else 3"),
        "pressure": Variable((1, s, s), "float32", "u(x), -div(a grad u) = f, u = 0 on boundary"),
    }


def sample_permeability(s: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, s, s) thresholded Gaussian random fields, values in {3, 12}."""
    k = np.arange(s)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    coef = 1.0 / (np.pi**2 * k2 + TAU2)   # sqrt of the covariance eigenvalues, (pi^2|k|^2+9)^-1
    coef[0, 0] = 0.0
    xi = rng.standard_normal((n, s, s))
    z = scipy.fft.idctn(xi * coef, type=2, norm="ortho", axes=(1, 2))
    return np.where(z >= 0, A_HIGH, A_LOW)


def assemble(a: np.ndarray, forcing: float = 1.0) -> tuple[scipy.sparse.csc_matrix, np.ndarray]:
    """The finite-volume system A u = b of one (s, s) field a, over the (s-2)^2 interior nodes."""
    s = a.shape[0]
    h = 1.0 / (s - 1)
    m = s - 2
    # harmonic-mean face coefficients between node (i, j) and its +x / +y neighbours
    fx = 2 * a[1:, :] * a[:-1, :] / (a[1:, :] + a[:-1, :])   # (s-1, s): faces between rows
    fy = 2 * a[:, 1:] * a[:, :-1] / (a[:, 1:] + a[:, :-1])   # (s, s-1): faces between columns
    north, south = fx[:-1, 1:-1], fx[1:, 1:-1]               # (m, m) each, for interior nodes
    west, east = fy[1:-1, :-1], fy[1:-1, 1:]
    idx = np.arange(m * m).reshape(m, m)
    rows = [idx.ravel()]
    cols = [idx.ravel()]
    vals = [(north + south + west + east).ravel()]
    # off-diagonals only between two interior nodes; boundary neighbours have u = 0
    for coef, here, there in (
        (south[:-1, :], idx[:-1, :], idx[1:, :]),
        (north[1:, :], idx[1:, :], idx[:-1, :]),
        (east[:, :-1], idx[:, :-1], idx[:, 1:]),
        (west[:, 1:], idx[:, 1:], idx[:, :-1]),
    ):
        rows.append(here.ravel())
        cols.append(there.ravel())
        vals.append(-coef.ravel())
    ij = (np.concatenate(rows), np.concatenate(cols))
    A = scipy.sparse.csc_matrix((np.concatenate(vals), ij), shape=(m * m, m * m))
    b = np.full(m * m, forcing * h * h)
    return A, b


def solve(a: np.ndarray, forcing: float = 1.0) -> np.ndarray:
    """Pressure u (s, s), float64, zero on the boundary, for one permeability field a (s, s)."""
    s = a.shape[0]
    A, b = assemble(a, forcing)
    u = np.zeros((s, s))
    u[1:-1, 1:-1] = scipy.sparse.linalg.splu(A).solve(b).reshape(s - 2, s - 2)
    return u


def generate(p: Params, seed: int, chunk_index: int, start: int, n: int
             ) -> dict[str, np.ndarray]:
    """`n` independent (permeability, pressure) pairs."""
    if p.resolution < 3:
        raise ConfigError(f"data.params.resolution: {p.resolution} leaves no interior node; "
                          f"expected >= 3 (FNO uses 85, 241, 421; default 32)")
    a = sample_permeability(p.resolution, chunk_rng(seed, chunk_index), n)
    u = np.stack([solve(ai, p.forcing) for ai in a])
    return {
        "permeability": a[:, None].astype(np.float32),
        "pressure": u[:, None].astype(np.float32),
    }
