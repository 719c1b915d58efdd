"""Built-in dataset generators. `SOURCES` maps a `data.source` name to its module.

Each source module provides:
  Params            a dataclass of the generator's physical parameters (`data.params` in YAML);
  variables(p)      {name: Variable(shape, dtype)} — the per-sample arrays it emits;
  generate(p, seed, chunk_index, start, n) -> {name: ndarray (n, *shape)}
                    samples [start, start + n) of the dataset, chunk `chunk_index` of the
                    pipeline; a pure function of its arguments, so the dataset is identical
                    whatever the number of Dask workers that computed it. Simulators draw from
                    chunk_rng(seed, chunk_index) and may ignore `start`; sources with a fixed
                    order (digits, importers) read positions from `start`.
  n_available(p)    (importers only) how many samples the input holds.
"""
from __future__ import annotations

from pipeline.data.importers import IMPORTERS
from pipeline.data.sources import calo, darcy2d, digits, ising2d, lorenz96

SOURCES = {
    "ising2d": ising2d,     # 2-D Ising spins across T_c (Metropolis)
    "darcy2d": darcy2d,     # Darcy flow permeability -> pressure (FNO benchmark)
    "calo": calo,           # calorimeter showers (GFlash-style parameterisation)
    "lorenz96": lorenz96,   # chaotic Lorenz-96 trajectories (RK4)
    "digits": digits,       # scikit-learn's real 8x8 handwritten digits
    # a user's own files (pipeline/data/importers.py)
    "netcdf": IMPORTERS["netcdf"],
    "hdf5": IMPORTERS["hdf5"],
    "npy": IMPORTERS["npy"],
    "zarr": IMPORTERS["zarr"],
}
