"""Electromagnetic calorimeter showers, CaloGAN-style (Paganini et al. 2018, arXiv:1705.02355).

Energy deposits in a (layers x eta x phi) grid of a lead sampling calorimeter, for electrons hitting
the centre of the front face at normal incidence, E log-uniform in [e_min, e_max]. A parameterised
shower (GFlash: Grindhammer, Rudowicz & Peters 1990, NIM A290 469; Grindhammer & Peters 1993,
hep-ex/0001020), sampled as discrete energy spots:

Longitudinal, in radiation lengths t: a Gamma profile per shower,
    dE/dt = E (beta t)^(alpha-1) beta e^(-beta t) / Gamma(alpha),   beta = (alpha - 1) / T,
T the depth of the maximum. (ln T, ln alpha) is bivariate normal per shower, with y = E / E_c:
    <ln T>     = ln(ln y - 0.812),                       sigma = (-1.40 + 1.26 ln y)^-1
    <ln alpha> = ln(0.81 + (0.458 + 2.26 / Z) ln y),     sigma = (-0.58 + 0.86 ln y)^-1
    corr(ln T, ln alpha) = 0.705 - 0.023 ln y
(the homogeneous-medium fits of hep-ex/0001020 applied to the absorber, as in Geant4's GFlash).
So the mean depth alpha / beta grows like ln E, by about one X0 per e-fold of energy.

Transverse, in Moliere radii R_M: an exponential core plus an exponential tail,
    dE/d^2r ~ (1 - w) e^(-r / r_c(tau)) / r_c^2 + w e^(-r / r_t) / r_t^2,   tau = t / T,
with a core that widens linearly with depth, like GFlash's r_c = z1 + z2 tau. The defaults put
about 90% of the energy inside 1 R_M, the definition of R_M.

Sampling fluctuations: the visible energy is carried by N spots of equal energy eps = f_s a^2 GeV,
N ~ Poisson(E / a^2) with E in GeV, so the deposit is f_s E on average with relative spread
a / sqrt(E) (the stochastic term). Deposits behind the last layer or outside the grid leak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline import physics
from pipeline.core.errors import ConfigError
from pipeline.physics import bins
from pipeline.sources.base import Variable, chunk_rng


@dataclass
class Params:
    layers: int = 8                     # longitudinal segments
    eta: int = 16                       # cells along eta (x)
    phi: int = 16                       # cells along phi (y)
    layer_depth: float = 3.5            # X0 per layer; 8 x 3.5 = 28 X0 contains 100 GeV showers
    cell_size: float = 0.5              # cell width in R_M; 16 cells span +-4 R_M
    e_min: float = 1.0                  # GeV, incident energy, log-uniform
    e_max: float = 100.0                # GeV
    z: float = 82.0                     # absorber atomic number (lead)
    critical_energy: float = 0.00743    # GeV, E_c of lead
    sampling_fraction: float = 0.2      # f_s: visible / total energy
    stochastic_term: float = 0.1        # a in sigma/E = a / sqrt(E / GeV)
    core_radius: float = 0.1            # r_c at the start, in R_M ...
    core_growth: float = 0.1            # ... plus this times tau = t / T
    tail_radius: float = 0.6            # r_t in R_M
    tail_fraction: float = 0.15         # w, energy share of the tail


# What pipeline.analysis.evaluate and the training figures read from a source
# (pipeline/sources/__init__.py)
OBSERVABLES = physics.Observables(physics.shower_scalars, physics.shower_profiles)
FEATURE_LABEL = "incident_energy"   # the variable the Fréchet feature CNN learns to predict
# evaluate's W1 / floor per incident-energy bin and the response E_visible / E (issue #15)
CONDITION_BINS = bins.ConditionBins(n_bins=4, response="total_energy",
                                      label="incident energy (GeV)", log=True)


def variables(p: Params) -> dict[str, Variable]:
    return {
        "energy_deposits": Variable((p.layers, p.eta, p.phi), "float32",
                                    "visible energy per cell (GeV)"),
        "incident_energy": Variable((), "float32", "energy of the incident electron (GeV)"),
    }


def _check(p: Params) -> None:
    # the GFlash spreads sigma(ln T) = 1 / (-1.4 + 1.26 ln y) need ln y well above 1.1
    e_floor = p.critical_energy * math.exp(2.0)
    if not e_floor <= p.e_min <= p.e_max:
        raise ConfigError(f"data.params.e_min/e_max: got [{p.e_min}, {p.e_max}] GeV; expected "
                          f"{e_floor:.3f} <= e_min <= e_max (the GFlash fits hold for "
                          f"E >= e^2 E_c); raise e_min")


def shower_shapes(energy: np.ndarray, p: Params, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-shower Gamma shape alpha and depth of maximum T (X0), GFlash fluctuations included."""
    ln_y = np.log(energy / p.critical_energy)
    mu_t = np.log(ln_y - 0.812)
    mu_a = np.log(0.81 + (0.458 + 2.26 / p.z) * ln_y)
    sd_t = 1.0 / (-1.4 + 1.26 * ln_y)
    sd_a = 1.0 / (-0.58 + 0.86 * ln_y)
    rho = 0.705 - 0.023 * ln_y
    g1, g2 = rng.standard_normal((2, energy.size))
    ln_t = mu_t + sd_t * g1
    ln_a = mu_a + sd_a * (rho * g1 + np.sqrt(1 - rho**2) * g2)
    # alpha <= 1 has no maximum (beta <= 0); it is > 4 sigma away at 1 GeV, so clip the rare case
    return np.maximum(np.exp(ln_a), 1.05), np.exp(ln_t)


def generate(p: Params, seed: int, chunk_index: int, start: int, n: int
             ) -> dict[str, np.ndarray]:
    """`n` independent showers."""
    _check(p)
    rng = chunk_rng(seed, chunk_index)
    energy = np.exp(rng.uniform(math.log(p.e_min), math.log(p.e_max), n))
    alpha, t_max = shower_shapes(energy, p, rng)
    beta = (alpha - 1) / t_max
    spots = rng.poisson(energy / p.stochastic_term**2)          # N per shower
    shower = np.repeat(np.arange(n), spots)                     # shower index of each spot
    # longitudinal: depth t ~ Gamma(alpha, 1 / beta) of its shower
    t = rng.gamma(alpha[shower], 1.0 / beta[shower])
    # transverse: radius from a 2-D exponential, r ~ Gamma(2, r0), core or tail
    tail = rng.random(shower.size) < p.tail_fraction
    r_core = p.core_radius + p.core_growth * t / t_max[shower]
    r0 = np.where(tail, p.tail_radius, r_core)
    r = rng.gamma(2.0, r0)
    angle = rng.uniform(0.0, 2 * np.pi, shower.size)
    # bin: (layer, eta, phi) cell of each spot; spots outside the grid leak
    layer = np.floor(t / p.layer_depth).astype(np.int64)
    ix = np.floor(r * np.cos(angle) / p.cell_size + p.eta / 2).astype(np.int64)
    iy = np.floor(r * np.sin(angle) / p.cell_size + p.phi / 2).astype(np.int64)
    inside = (layer < p.layers) & (ix >= 0) & (ix < p.eta) & (iy >= 0) & (iy < p.phi)
    cell = ((shower * p.layers + layer) * p.eta + ix) * p.phi + iy
    counts = np.bincount(cell[inside], minlength=n * p.layers * p.eta * p.phi)
    eps = p.sampling_fraction * p.stochastic_term**2           # GeV per spot
    deposits = (counts * eps).reshape(n, p.layers, p.eta, p.phi)
    return {
        "energy_deposits": deposits.astype(np.float32),
        "incident_energy": energy.astype(np.float32),
    }
