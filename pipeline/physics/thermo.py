"""Thermodynamic curves of 2-D Ising samples, per temperature: <|m|>(T), <E>(T), the specific heat
C(T) and the susceptibility chi(T), real against generated (issue #15: a temperature-conditional
generator must reproduce them through T_c, also at temperatures held out of training; the SpinGAN
thesis, Zhang 2021 and Lee et al. 2024, arXiv:2412.03764, compare generators on these curves).

Per-spin energy e = H / N and magnetisation m = sum(s) / N of each configuration (N = L^2 sites,
J = k_B = 1, periodic boundaries; `pipeline.physics`). The fluctuation formulas are the per-spin
ones of Newman & Barkema (1999), eqs. 3.15 and 3.16 written with per-spin observables:
    C(T)   = N * Var(e) / T^2
    chi(T) = N * Var(|m|) / T
(|m| rather than m: a finite lattice flips its global sign, so <m> = 0 at every T.)

The one spin-conversion rule. A generator's output, denormalised into the data's units, is a
value x in [-1, 1] read as the probability P(s = +1) = (x + 1) / 2, and spins are drawn from it
(`spins_from_output`, which is `physics.to_spins` with a generator). A model that decides its spins
itself returns exactly -1 or +1, for which the draw is deterministic; thresholding at 0 is not used,
because it turns a Bernoulli decoder's blurry probabilities into spuriously ordered lattices.
Training figures and `hpcforge evaluate` both convert through `physics.physical`, which applies it.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from pipeline import physics

T_CRITICAL = 2.0 / np.log(1.0 + np.sqrt(2.0))  # Onsager 1944
QUANTITIES = {  # key: axis label
    "abs_magnetization": "<|m|>",
    "energy": "<E> per spin",
    "specific_heat": "C = N Var(E) / T^2",
    "susceptibility": "chi = N Var(|m|) / T",
}


def spins_from_output(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The spin-conversion rule (module docstring): denormalised output in [-1, 1] -> +-1 int8."""
    return physics.to_spins(x, rng)


def curves(spins: np.ndarray, temperatures: np.ndarray) -> dict[str, np.ndarray]:
    """Per-temperature means and fluctuations of +-1 configurations (N, [1,] L, L) with their
    temperatures (N,). Returns "T" (sorted distinct temperatures), "count" and QUANTITIES."""
    s = np.asarray(spins)
    t = np.asarray(temperatures, np.float64).reshape(-1)
    if len(s) != len(t):
        raise ValueError(f"thermo: {len(s)} configurations but {len(t)} temperatures; expected one "
                         f"temperature per configuration")
    n_sites = s.shape[-1] * s.shape[-2]
    e, m = physics.ising_energy(s), np.abs(physics.ising_magnetization(s))
    grid = np.unique(np.round(t, 6))
    out = {k: np.empty(len(grid)) for k in ("count", *QUANTITIES)}
    for i, temp in enumerate(grid):
        at = np.isclose(t, temp, atol=1e-6)
        out["count"][i] = at.sum()
        out["abs_magnetization"][i], out["energy"][i] = m[at].mean(), e[at].mean()
        out["specific_heat"][i] = n_sites * e[at].var() / temp ** 2
        out["susceptibility"][i] = n_sites * m[at].var() / temp
    out["T"] = grid
    return out


def curve_errors(real: dict[str, np.ndarray], generated: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean over temperatures of |generated - real| / max|real| for each quantity: one number per
    curve, 0 for a perfect generator, comparable across quantities of different scales."""
    if not np.allclose(real["T"], generated["T"]):
        raise ValueError("thermo: real and generated curves are on different temperature grids; "
                         "generate at the real samples' temperatures")
    return {f"thermo/{k}": float(np.mean(np.abs(generated[k] - real[k]))
                                 / max(np.abs(real[k]).max(), 1e-12)) for k in QUANTITIES}


def curve_figure(real: dict[str, np.ndarray], generated: dict[str, np.ndarray],
                 held_out: Sequence[float] = ()) -> Figure:
    """Four panels, real (line) against generated (filled markers; hollow at temperatures held
    out of training) over T, T_c dashed."""
    fig = Figure(figsize=(12.8, 2.8), dpi=100, layout="constrained")
    held = np.isclose(generated["T"][:, None], np.asarray(held_out, np.float64)).any(axis=1)
    for ax, (key, label) in zip(fig.subplots(1, 4), QUANTITIES.items()):
        ax.plot(real["T"], real[key], "-", color="#1f77b4", label="real (Monte Carlo)")
        for mask, face, name in ((~held, "#d62728", "generated"), (held, "none", "held-out T")):
            if mask.any():
                ax.plot(generated["T"][mask], generated[key][mask], "o", ms=4, color="#d62728",
                        mfc=face, label=name)
        ax.axvline(T_CRITICAL, ls="--", color="grey", lw=0.8)
        ax.set_xlabel("T")
        ax.set_title(label, fontsize=9)
    fig.axes[0].legend(fontsize=7)
    return fig
