"""Latent-space exploration of generative checkpoints in `hpcforge evaluate` (issue #16).

For a model with a latent space (`decode_latent(z, batch)`: VAE, AAE, gan, dcgan, wgan_gp, cgan;
conditional ones at one fixed condition, the median of the evaluation split's):
  interpolation  between two points: two encoded test samples for a model that encodes
                 (`encode_latent`: VAE, AAE), two prior draws for a GAN. Both end points are the
                 candidates with the lowest and the highest value of the source's
                 LATENT_ENDPOINTS observable (Ising: |m|, an ordered and a disordered lattice), so
                 the path crosses what separates them. Spherical (slerp, Shoemake 1985; White 2016,
                 arXiv:1609.04468: a Gaussian latent's mass lies near a sphere, which a straight
                 line leaves) and linear, both drawn and measured;
  traversals     one latent dimension at a time from the prior's centre over -3..3 prior sigmas,
                 the others at 0: for the VAE the TRAVERSED dimensions of largest KL(q(z_d|x) || p)
                 (Higgins et al. 2017, beta-VAE: informative dimensions carry KL), else the first.
Along each path the source's observables are computed by the one conversion chain of evaluate
(physics.physical + the source's OBSERVABLES): for spins each point's decoded probabilities are
drawn SPIN_DRAWS times and the observable averaged. Per path and observable the eval JSON gets
  latent/<slerp|linear>/<observable>/monotonicity  share of the steps' total movement that goes
                 the way of the net change: 1 = monotone, ~0.5 = back and forth;
  latent/<slerp|linear>/<observable>/max_jump      the largest change between consecutive steps,
                 in the observable's units (a jump where |m| should move smoothly through T_c);
  latent/<slerp|linear>/<observable>/start, /end   its values at the two ends.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline import physics
from pipeline.analysis.shared import normalized
from pipeline.core import figures
from pipeline.sources import declared, observables

STEPS = 9              # points on an interpolation path, ends included
TRAVERSED = 4          # latent dimensions traversed (fewer if the latent space is smaller)
SIGMAS = np.linspace(-3, 3, 7)   # traversal offsets in prior standard deviations
CANDIDATES = 64        # test samples encoded (or prior draws) to choose the end points from
SPIN_DRAWS = 16        # Bernoulli draws per path point for a two-level variable


def explorable(model: torch.nn.Module) -> bool:
    return hasattr(model, "decode_latent")


def slerp(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (steps, D) between z0 and z1 (D,) at fractions t (steps,); the
    straight line when the two are (anti)parallel and the great circle is undefined."""
    cos = torch.dot(z0, z1) / (z0.norm() * z1.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1, 1))
    if torch.sin(omega).abs() < 1e-6:
        return linear(z0, z1, t)
    w0, w1 = torch.sin((1 - t) * omega) / torch.sin(omega), torch.sin(t * omega) / torch.sin(omega)
    return w0[:, None] * z0 + w1[:, None] * z1


def linear(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - t)[:, None] * z0 + t[:, None] * z1


PATHS = {"slerp": slerp, "linear": linear}


def path_metrics(values: np.ndarray) -> dict[str, float]:
    """monotonicity and max_jump (module docstring) of one observable along a path."""
    d = np.diff(np.asarray(values, np.float64))
    moved = float(np.abs(d).sum())
    toward = float(np.clip(d * np.sign(values[-1] - values[0]), 0, None).sum())
    return {"monotonicity": toward / moved if moved > 0 else 1.0, "max_jump": float(np.abs(d).max()),
            "start": float(values[0]), "end": float(values[-1])}


class Explorer:
    """The latent paths of one evaluation (pipeline.analysis.evaluate.Evaluation): its model, store
    normalisation, metrics and figures."""

    def __init__(self, ev: Any, arrays: dict[str, np.ndarray]):
        self.ev, self.model = ev, ev.model
        self.obs = observables(ev.store.meta.source)
        self.batch = fixed_condition(self.model, arrays)
        # the split's first samples (the store is globally shuffled): the same whatever the loader
        self.x = torch.as_tensor(normalized(ev.store, ev.split, ev.var, ev.cfg.data.normalize, CANDIDATES))
        self.gen = torch.Generator().manual_seed(ev.cfg.train.seed)

    def batch_of(self, n: int) -> dict[str, torch.Tensor]:
        return {k: v.expand(n) for k, v in self.batch.items()}

    def decode(self, z: torch.Tensor) -> np.ndarray:
        return self.model.decode_latent(z, self.batch_of(len(z))).cpu().numpy()

    def scalars(self, decoded: np.ndarray) -> dict[str, np.ndarray]:
        """Per-point observables in physical units, averaged over SPIN_DRAWS draws of spins."""
        draws = SPIN_DRAWS if self.obs.binary else 1
        runs = [self.obs.scalars(physics.physical(self.obs, decoded, self.ev.affine, self.ev.rng))
                for _ in range(draws)]
        return {k: np.mean([r[k] for r in runs], axis=0) for k in runs[0]}

    def candidates(self) -> torch.Tensor:
        if hasattr(self.model, "encode_latent"):
            return self.model.encode_latent(self.x, self.batch_of(len(self.x)))
        return torch.randn(CANDIDATES, self.model.latent_dim, generator=self.gen)

    def endpoints(self) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The candidates with the lowest and highest LATENT_ENDPOINTS observable, and its name."""
        z = self.candidates()
        values = self.scalars(self.decode(z))
        name = declared(self.ev.store.meta.source, "LATENT_ENDPOINTS") or next(iter(values))
        order = np.argsort(values[name])
        return z[order[0]], z[order[-1]], name

    def interpolate(self) -> None:
        z0, z1, by = self.endpoints()
        t = torch.linspace(0, 1, STEPS)
        images, along = {}, {}
        for kind, path in PATHS.items():
            decoded = self.decode(path(z0, z1, t))
            images[kind], along[kind] = decoded, self.scalars(decoded)
            for obs_name, values in along[kind].items():
                self.ev.metrics.update({f"latent/{kind}/{obs_name}/{k}": v
                                        for k, v in path_metrics(values).items()})
        self.ev.figures["latent_interpolation"] = figures.image_rows(
            images, [f"{f:.2f}" for f in t.tolist()],
            f"latent interpolation, lowest to highest {by} of {CANDIDATES} "
            f"{'encoded test samples' if hasattr(self.model, 'encode_latent') else 'prior draws'}")
        self.ev.figures["latent_path_observables"] = figures.along_paths(t.numpy(), along)

    def dimensions(self) -> list[int]:
        """The TRAVERSED dimensions to traverse: largest KL first for a model that reports it."""
        k = min(TRAVERSED, self.model.latent_dim)
        if not hasattr(self.model, "latent_kl"):
            return list(range(k))
        kl = self.model.latent_kl(self.x, self.batch_of(len(self.x)))
        dims = torch.argsort(kl, descending=True)[:k].tolist()
        self.ev.metrics.update({f"latent/kl/dim{d}": float(kl[d]) for d in dims})
        return dims

    def traverse(self) -> None:
        dims, rows = self.dimensions(), {}
        for d in dims:
            z = torch.zeros(len(SIGMAS), self.model.latent_dim)
            z[:, d] = torch.as_tensor(SIGMAS, dtype=z.dtype)
            rows[f"z{d}"] = self.decode(z)
        self.ev.figures["latent_traversals"] = figures.image_rows(
            rows, [f"{s:+.0f}σ" for s in SIGMAS], "latent traversals from the prior's centre")


def fixed_condition(model: torch.nn.Module, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """{"cond": the median of the split's conditions (1,)} for a conditional model, else {}."""
    if not model.conditional or "cond" not in arrays:
        return {}
    cond = np.sort(arrays["cond"])
    return {"cond": torch.as_tensor(cond[len(cond) // 2: len(cond) // 2 + 1])}


@torch.no_grad()
def explore(ev: Any, arrays: dict[str, np.ndarray]) -> None:
    """Interpolations and traversals of `ev.model` into ev.metrics / ev.figures (module docstring);
    a note instead when the source declares no observables to follow along the path."""
    if observables(ev.store.meta.source) is None:
        ev.notes.append(f"no observables for source {ev.store.meta.source!r}; latent paths skipped")
        return
    explorer = Explorer(ev, arrays)
    explorer.interpolate()
    explorer.traverse()
