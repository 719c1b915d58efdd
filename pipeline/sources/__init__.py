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

and may declare, for `hpcforge evaluate` and the training figures (a source without them gets
none of what they enable; nothing outside the module names the source):
  OBSERVABLES       pipeline.physics.Observables of its main variable: W1 and figures;
  FEATURE_LABEL     the variable the Fréchet feature CNN is trained to predict;
  out_of_distribution(p) -> Params   a labelled outlier set for the anomaly ROC AUC;
  conditional_curves(x, cond) -> {name: array}   curves over the conditioning value (Ising: the
                    thermodynamic curves against T) compared for a conditional generator;
  CONDITION_BINS    pipeline.physics.bins.ConditionBins: W1 / floor per bin of a continuous
                    condition and a response (mean observable / condition), for a conditional
                    generator;
  LATENT_ENDPOINTS  the scalar observable whose lowest and highest samples end a latent
                    interpolation (pipeline/analysis/latent.py; default: the first OBSERVABLES
                    scalar);
  classes(p)        (importers) the class table of data.params.label_from, for the store's attrs.
Adding a source is its module plus one line in SOURCES.
"""
from __future__ import annotations

from typing import Any

from pipeline.sources import calo, darcy2d, digits, ising2d, lorenz96
from pipeline.sources.importers import IMPORTERS

SOURCES = {
    "ising2d": ising2d,     # 2-D Ising spins across T_c (Metropolis)
    "darcy2d": darcy2d,     # Darcy flow permeability -> pressure (FNO benchmark)
    "calo": calo,           # calorimeter showers (GFlash-style parameterisation)
    "lorenz96": lorenz96,   # chaotic Lorenz-96 trajectories (RK4)
    "digits": digits,       # scikit-learn's real 8x8 handwritten digits
    # a user's own files (pipeline/sources/importers.py)
    "netcdf": IMPORTERS["netcdf"],
    "hdf5": IMPORTERS["hdf5"],
    "npy": IMPORTERS["npy"],
    "zarr": IMPORTERS["zarr"],
}


def params_class(name: str) -> type:
    """The dataclass that types `data.params` for source `name`. The registry owns its names, so an
    unknown one is refused here, listing the sources (pipeline/config/__init__.py adds the key)."""
    if name not in SOURCES:
        raise LookupError(f"unknown source {name!r}; valid: {', '.join(sorted(SOURCES))}")
    return SOURCES[name].Params


def declared(name: str, what: str) -> Any:
    """What source `name` declares under `what` (OBSERVABLES, FEATURE_LABEL, out_of_distribution,
    conditional_curves; see above), or None: callers never name a source themselves."""
    return getattr(SOURCES.get(name), what, None)


def observables(name: str) -> Any:
    """The `physics.Observables` source `name` declared (its OBSERVABLES), or None if it declared
    none; an unknown name is refused. Looked up here, in the registry: physics defines what an
    observable is and the sources declare theirs, so physics never imports the sources
    (issue 27)."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {', '.join(sorted(SOURCES))}")
    return declared(name, "OBSERVABLES")


def describe(groups: set[str] | frozenset[str] = frozenset()) -> str:
    """The sources and importers, one example command each: the epilog of `hpcforge prepare
    --help`, built from SOURCES so that it names every one, whatever is added later. `groups`:
    the data config groups there are (configs/data/NAME.yaml), for the `data=NAME` form."""
    from pipeline.sources.importers import EXAMPLES, SUFFIXES
    lines = ["sources (data.source; each has a config group, configs/data/NAME.yaml):"]
    for name, source in SOURCES.items():
        if name in IMPORTERS:
            continue
        group = name in groups
        lines += [f"  {name:<9} {_summary(source.__doc__ or '')}",
                  f"            hpcforge prepare data={name}" if group else
                  f"            hpcforge prepare data.source={name}"]
    lines += ["", "importers (your own files; data.params.labels of shape (N, 1) are taken as N "
              "scalars):"]
    for name in IMPORTERS:
        lines += [f"  {name:<9} {'/'.join(SUFFIXES[name])} files, a folder of them or a glob",
                  f"            hpcforge prepare data=import_netcdf data.source={name} "
                  f"{EXAMPLES[name]}"]
    lines += ["", "labels from paths (data.params.label_from=parent_dir|file_stem|<regex with one "
              "group>; class table in the store's attrs), e.g. a CaloGAN eplus/ gamma/ piplus/ tree:",
              "            hpcforge prepare data=import_netcdf data.source=hdf5 "
              "data.params.path='calo/*/*.h5' data.params.label_from=parent_dir "
              "data.params.variables=[shower] data.params.labels=[] data.params.sample_axis=0 "
              "'data.params.dtypes={}' 'data.inputs={x: shower, y: label}'"]
    return "\n".join(lines + ["", "NetCDF-3 and NetCDF-4 are both read; see "
                              "pipeline/sources/importers.py for the .npy layouts."])


def _summary(doc: str, width: int = 120) -> str:
    """The first line of a docstring, or its first sentence if that runs on (cut to `width`)."""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    line = doc.strip().splitlines()[0]
    text = line if line.endswith(".") else first.split(". ")[0] + "."
    return text if len(text) <= width else text[:width - 3] + "..."
