"""Lorenz-96: dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F, i = 0..N-1 cyclic (Lorenz 1996,
"Predictability: a problem partly solved", ECMWF seminar). F = 8, N = 40 is chaotic, with a leading
Lyapunov exponent of about 1.7 per time unit (Lorenz & Emanuel 1998, J. Atmos. Sci. 55 399).

Integrated with classic fourth-order Runge-Kutta, vectorised over samples. Every sample is its own
trajectory: it starts at x = F (an unstable fixed point) plus N(0, perturbation^2) noise and runs
`burn_in` steps onto the attractor before anything is recorded; frames are then kept every
`frame_every` steps.

Two modes, with the same variables so that the training loop never branches on the mode:
  windows     inputs = frames [0, window_in), targets = the next window_out frames
              (sequence-to-sequence forecasting);
  trajectory  inputs = frames [0, trajectory_length), targets = the same frames shifted by one
              (next-frame prediction over a long sequence, for stateful RNNs / truncated BPTT).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline import physics
from pipeline.core.errors import ConfigError
from pipeline.sources.base import Variable, chunk_rng


@dataclass
class Params:
    n_variables: int = 40           # N, sites on the ring (Lorenz 1996: 40)
    forcing: float = 8.0            # F; chaotic for F >~ 5 at N = 40
    dt: float = 0.01                # RK4 step, time units (1 unit ~ 5 days of weather)
    perturbation: float = 0.01      # std of the initial noise around x = F
    burn_in: int = 2000             # RK4 steps (20 time units) before the first frame
    frame_every: int = 5            # RK4 steps between recorded frames (0.05 time units)
    mode: Literal["windows", "trajectory"] = "windows"
    window_in: int = 16             # windows mode: input frames
    window_out: int = 16            # windows mode: target frames that follow them
    trajectory_length: int = 1000   # trajectory mode: frames per sample


def _frames(p: Params) -> tuple[int, int]:
    """(input frames, target frames) per sample in p's mode."""
    if p.mode == "windows":
        return p.window_in, p.window_out
    return p.trajectory_length, p.trajectory_length


# What pipeline.analysis.evaluate and the training figures read from a source
# (pipeline/sources/__init__.py)
OBSERVABLES = physics.Observables(physics.sequence_scalars)


def variables(p: Params) -> dict[str, Variable]:
    t_in, t_out = _frames(p)
    target = ("the window_out frames after the inputs" if p.mode == "windows"
              else "the input frames shifted one frame ahead")
    return {
        "inputs": Variable((t_in, p.n_variables), "float32", "state x(t), one frame per row"),
        "targets": Variable((t_out, p.n_variables), "float32", target),
    }


def tendency(x: np.ndarray, forcing: float) -> np.ndarray:
    """dx/dt for a (..., N) batch of states."""
    # cyclic padding, xp[j] = x_{j-2}: slices are cheaper than three np.roll copies
    xp = np.concatenate((x[..., -2:], x, x[..., :1]), axis=-1)
    return (xp[..., 3:] - xp[..., :-3]) * xp[..., 1:-2] - x + forcing


def rk4_step(x: np.ndarray, dt: float, forcing: float) -> np.ndarray:
    k1 = tendency(x, forcing)
    k2 = tendency(x + 0.5 * dt * k1, forcing)
    k3 = tendency(x + 0.5 * dt * k2, forcing)
    k4 = tendency(x + dt * k3, forcing)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def integrate(x: np.ndarray, steps: int, dt: float, forcing: float) -> np.ndarray:
    """The state after `steps` RK4 steps."""
    for _ in range(steps):
        x = rk4_step(x, dt, forcing)
    return x


def generate(p: Params, seed: int, chunk_index: int, start: int, n: int
             ) -> dict[str, np.ndarray]:
    """`n` independent trajectories, burned in, cut into (inputs, targets)."""
    t_in, t_out = _frames(p)
    if p.n_variables < 4 or min(t_in, t_out, p.frame_every) < 1:
        raise ConfigError(f"data.params: got n_variables={p.n_variables} (expected >= 4: the "
                          f"stencil spans i-2..i+1), {t_in} input / {t_out} target frames and "
                          f"frame_every={p.frame_every} (expected >= 1 each)")
    rng = chunk_rng(seed, chunk_index)
    x = p.forcing + p.perturbation * rng.standard_normal((n, p.n_variables))
    x = integrate(x, p.burn_in, p.dt, p.forcing)
    n_frames = t_in + t_out if p.mode == "windows" else t_in + 1
    frames = np.empty((n, n_frames, p.n_variables))
    for k in range(n_frames):
        if k:
            x = integrate(x, p.frame_every, p.dt, p.forcing)
        frames[:, k] = x
    if p.mode == "windows":
        inputs, targets = frames[:, :t_in], frames[:, t_in:]
    else:
        inputs, targets = frames[:, :-1], frames[:, 1:]
    return {"inputs": inputs.astype(np.float32), "targets": targets.astype(np.float32)}
