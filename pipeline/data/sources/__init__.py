"""Built-in dataset generators. `SOURCES` maps a `data.source` name to its module.

Each source module provides:
  Params            a dataclass of the generator's physical parameters (`data.params` in YAML);
  variables(p)      {name: Variable(shape, dtype)} — the per-sample arrays it emits;
  generate(p, seed, chunk_index, n) -> {name: ndarray (n, *shape)}
                    a pure function of its arguments, so the dataset is identical whatever the
                    number of Dask workers that computed it.
"""
from __future__ import annotations

from pipeline.data.sources import calo, darcy2d, digits, ising2d, lorenz96

SOURCES = {
    "ising2d": ising2d,     # 2-D Ising spins across T_c (Metropolis)
    "darcy2d": darcy2d,     # Darcy flow permeability -> pressure (FNO benchmark)
    "calo": calo,           # calorimeter showers (GFlash-style parameterisation)
    "lorenz96": lorenz96,   # chaotic Lorenz-96 trajectories (RK4)
    "digits": digits,       # scikit-learn's real 8x8 handwritten digits
}
