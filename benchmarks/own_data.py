"""Data stored the way scientists store it, for the README's "Bring your own data" (issue 24).

    .venv/bin/python -m benchmarks.own_data calo data/calo           # the CaloGAN-style tree
    .venv/bin/python -m benchmarks.own_data netcdf data/fields.nc     # the NetCDF-3 surrogate file

`calo`: a tree `calo/{eplus,gamma,piplus}/*.h5` as CaloGAN keeps its showers (Paganini et al. 2018,
arXiv:1705.02355): each file holds `layer_0` (N, 3, 96), `layer_1` (N, 12, 12), `layer_2` (N, 12, 6)
in GeV and `energy` (N, 1), the incident energy in GeV. A toy of its physics, not Geant4: each
particle deposits its energy over the three layers in its own proportions (an electron or a photon
early, a photon a little later, a pion late and wider), as a Gaussian core of its own width with
sampling noise; so the particle is told apart by the layers' shares and shapes, not by one pixel,
and the energy by the deposits' sum.

`netcdf`: one NetCDF-3 classic file (scipy.io.netcdf_file, the format of many older archives and
of xarray's scipy engine) of (time, y, x) fields `u` and `v`, v being u after a few steps of
periodic diffusion: a u -> v surrogate task for a field-to-field network.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

PARTICLES = ("eplus", "gamma", "piplus")
LAYERS = {"layer_0": (3, 96), "layer_1": (12, 12), "layer_2": (12, 6)}
# share of the deposited energy in each layer, and the shower's width in cells, per particle
# (e+ and gamma differ little, as in a real calorimeter; each shower scatters around its particle's)
SHARES = {"eplus": (0.42, 0.46, 0.12), "gamma": (0.36, 0.50, 0.14), "piplus": (0.10, 0.35, 0.55)}
WIDTH = {"eplus": 1.0, "gamma": 1.1, "piplus": 2.2}


def _layer(rng: np.random.Generator, shape: tuple[int, int], e: np.ndarray,
           width: np.ndarray) -> np.ndarray:
    """(n, H, W) deposits: a Gaussian core of `width` (n,) cells at a jittered centre, total e
    (n,), with multiplicative sampling noise (a stochastic term of ~15 %/sqrt(E))."""
    n, (h, w) = len(e), shape
    yy, xx = np.mgrid[:h, :w]
    cy = (h - 1) / 2 + rng.normal(0, 0.5, n)[:, None, None]
    cx = (w - 1) / 2 + rng.normal(0, 0.5, n)[:, None, None]
    core = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width[:, None, None] ** 2))
    core /= core.sum(axis=(1, 2), keepdims=True)
    noise = rng.gamma(25.0, 1 / 25.0, core.shape)  # mean 1, sd 0.2 per cell
    return (core * noise * (e * (1 + rng.normal(0, 0.15, n) / np.sqrt(e)))[:, None, None]).astype(
        np.float32)


def write_calo_tree(root: Path, files: int = 2, per_file: int = 200, seed: int = 0) -> int:
    """`files` .h5 files of `per_file` showers in each particle's folder; returns the showers."""
    import h5py
    rng = np.random.default_rng(seed)
    for particle in PARTICLES:
        (Path(root) / particle).mkdir(parents=True, exist_ok=True)
        for i in range(files):
            energy = rng.uniform(10.0, 100.0, per_file)               # GeV
            shares = np.asarray(SHARES[particle]) * rng.uniform(0.75, 1.25, (per_file, 3))
            width = WIDTH[particle] * rng.uniform(0.75, 1.25, per_file)
            with h5py.File(Path(root) / particle / f"{particle}_{i}.h5", "w") as f:
                for j, (name, shape) in enumerate(LAYERS.items()):
                    f.create_dataset(name, data=_layer(rng, shape, energy * shares[:, j], width))
                f.create_dataset("energy", data=energy[:, None].astype(np.float32))
    return len(PARTICLES) * files * per_file


def write_netcdf3(path: Path, n: int = 400, size: int = 32, steps: int = 8, seed: int = 0) -> int:
    """(time, y, x) fields u (smooth random) and v (u after `steps` explicit diffusion steps,
    periodic, rate 0.2) in one NetCDF-3 classic file; returns the time steps written."""
    from scipy.io import netcdf_file
    rng = np.random.default_rng(seed)
    k = np.fft.fftfreq(size)
    decay = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) * 60.0)      # smooth fields
    u = np.fft.ifft2(np.fft.fft2(rng.normal(size=(n, size, size))) * decay).real
    u = (u / u.std()).astype(np.float32)
    v = u.copy()
    for _ in range(steps):
        lap = sum(np.roll(v, s, a) for s in (1, -1) for a in (1, 2)) - 4 * v
        v = v + 0.2 * lap
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with netcdf_file(str(path), "w", version=1) as f:
        f.createDimension("time", n)
        f.createDimension("y", size)
        f.createDimension("x", size)
        for name, data in (("u", u), ("v", v)):
            var = f.createVariable(name, "f4", ("time", "y", "x"))
            var[:] = data
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("calo", "netcdf"))
    p.add_argument("path", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.kind == "calo":
        print(f"{write_calo_tree(args.path, seed=args.seed)} showers under {args.path}")
    else:
        print(f"{write_netcdf3(args.path, seed=args.seed)} (u, v) fields in {args.path}")


if __name__ == "__main__":
    main()
