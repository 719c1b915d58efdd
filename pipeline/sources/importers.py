"""Importers: a user's own NetCDF, HDF5, .npy/.npz and Zarr data as a `prepare` source.

Each importer is a source like the generators (`Params`, `variables`, `generate`), plus
`n_available(p)`: the files are concatenated along the sample axis, in sorted name order, and
`generate(p, seed, chunk_index, start, n)` reads samples [start, start + n) of that sequence. Each
Dask task of `prepare` reads one such chunk straight from the files (h5py / xarray / memory-mapped
NumPy / Zarr slicing), so nothing is loaded whole and the read is spread over the workers.

    data.source = netcdf | hdf5 | npy | zarr
    data.params.path        a file, a directory or a glob
    data.params.variables   the per-sample arrays to import (e.g. [temperature, pressure])
    data.params.labels      optional per-sample label arrays (one value per sample, e.g. [class]);
                            a label stored as (N, 1) (or (N, 1, 1)) is taken as N scalars
    data.params.sample_axis the axis that indexes samples: a number, or a NetCDF dimension name
    data.params.label_from  optional label taken from each file's path (issue #16): parent_dir,
                            file_stem, or a regex with one group searched in the path; stored as
                            the int64 variable `label`, the class table {name: integer, names
                            sorted} in the store's attrs (StoreMeta.classes)

Physics data often sits as "many h5 files, each containing O(1000) events, organized into
directories by particle type" (CaloGAN: eplus/ gamma/ piplus/): data.params.path='calo/*/*.h5'
data.params.label_from=parent_dir reads, labels and (prepare's global shuffle) mixes them at once.

NetCDF files of both families are read: NetCDF-4 (HDF5 inside) through h5netcdf, NetCDF-3
classic and 64-bit offset (what `xarray.to_netcdf(engine="scipy")` and many older archives write)
through xarray's scipy engine; the first bytes of each file decide. CDF-5 files are refused with
the conversion that fixes them.

Layouts of .npy files: `x.npy` holds variable `x`; `x_000.npy, x_001.npy, y_000.npy, ...` hold parts
of `x` and `y` (the numeric suffix is the part; parts are concatenated). An .npz file holds its
keys.

Everything is checked before any work starts, from the files' headers only: files and variables
exist (the message lists what does), dtypes are numeric and agree across files, every file gives the
same per-sample shape (the message names both files), and all variables of a file hold the same
number of samples.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import UserError

NUMERIC_KINDS = "biuf"   # bool, signed, unsigned, float: what a network can take


@dataclass
class Params:
    path: str = ""                 # a file, a directory of files, or a glob ("data/*.nc")
    variables: list[str] = field(default_factory=list)  # per-sample arrays to import
    labels: list[str] = field(default_factory=list)     # optional labels, one value per sample
    sample_axis: int | str = 0     # axis of the samples: an index, or a NetCDF dimension name
    dtypes: dict[str, str] = field(default_factory=dict)  # cast a variable (same kind only)
    label_from: str = ""           # "" | parent_dir | file_stem | a regex with one group


@dataclass(frozen=True)
class Part:
    """One slice of the sample sequence: variable -> (file, key inside the file, sample axis)."""
    refs: dict[str, tuple[str, str | None, int]]
    n: int                         # samples it holds
    label: int | None = None       # its class from data.params.label_from, if set


@dataclass(frozen=True)
class Index:
    parts: tuple[Part, ...]
    offsets: np.ndarray            # first sample of each part; offsets[-1] = total
    variables: dict[str, Any]       # name -> sources.base.Variable
    classes: dict[str, int] | None = None   # data.params.label_from's class table


# --------------------------------------------------------------------------- formats
def _npy_header(file: str, key: str | None) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file or an .npz member, from its header alone."""
    if key is None:
        a = np.load(file, mmap_mode="r")
        return a.shape, a.dtype
    with zipfile.ZipFile(file) as z, z.open(key + ".npy") as m:
        version = np.lib.format.read_magic(m)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(m)
    return shape, dtype


def _names(fmt: str, file: str) -> list[str]:
    """The variables a file holds."""
    if fmt == "npy":
        with zipfile.ZipFile(file) as z:
            return sorted(n[:-4] for n in z.namelist() if n.endswith(".npy"))
    if fmt == "netcdf":
        with _open_netcdf(file) as ds:
            return sorted(str(v) for v in ds.variables)   # data and coordinate variables
    if fmt == "hdf5":
        import h5py
        out: list[str] = []
        with h5py.File(file, "r") as f:
            f.visititems(lambda name, obj: out.append(name) if isinstance(obj, h5py.Dataset) else None)
        return sorted(out)
    import zarr
    return sorted(zarr.open_group(file, mode="r").array_keys())


NETCDF_MAGIC = {b"CDF\x01": "scipy",       # NetCDF-3 classic
                b"CDF\x02": "scipy",       # NetCDF-3 64-bit offset
                b"\x89HDF": "h5netcdf"}    # NetCDF-4: an HDF5 file


def _netcdf_engine(file: str) -> str:
    """The xarray engine that reads `file`, from its first bytes (h5netcdf reads only NetCDF-4)."""
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic in NETCDF_MAGIC:
        return NETCDF_MAGIC[magic]
    if magic == b"CDF\x05":
        raise UserError(f"{file} is a NetCDF-3 CDF-5 (64-bit data) file, which neither h5netcdf "
                        f"nor scipy reads; convert it to NetCDF-4 (nccopy -k nc4 {file} out.nc) "
                        f"and point data.params.path at that")
    raise UserError(f"{file} is not a NetCDF file (it starts with {magic!r}; expected CDF\\x01, "
                    f"CDF\\x02 or an HDF5 signature); remove it from data.params.path or pick the "
                    f"data.source that matches it")


def _open_netcdf(file: str):
    import xarray as xr

    # decoding applies scale/offset and turns _FillValue into NaN, which validation then counts
    return xr.open_dataset(file, engine=_netcdf_engine(file), cache=False, decode_times=False)


def _header(fmt: str, file: str, key: str | None) -> tuple[tuple[int, ...], np.dtype, tuple]:
    """(shape, dtype, dimension names or ()) of one variable, without reading its data."""
    if fmt == "npy":
        return (*_npy_header(file, key), ())
    if fmt == "netcdf":
        with _open_netcdf(file) as ds:
            v = ds[key]
            return tuple(v.shape), v.dtype, tuple(str(d) for d in v.dims)
    if fmt == "hdf5":
        import h5py
        with h5py.File(file, "r") as f:
            return tuple(f[key].shape), f[key].dtype, ()
    import zarr
    a = zarr.open_group(file, mode="r")[key]
    return tuple(a.shape), a.dtype, ()


def _read(fmt: str, file: str, key: str | None, axis: int, lo: int, hi: int) -> np.ndarray:
    """Samples [lo, hi) of one variable, the sample axis moved first."""
    sel = (slice(None),) * axis + (slice(lo, hi),)
    if fmt == "npy" and key is None:
        out = np.load(file, mmap_mode="r")[sel]           # only these bytes are read
    elif fmt == "npy":
        with np.load(file) as z:                          # .npz members cannot be sliced on disk
            out = z[key][sel]
    elif fmt == "netcdf":
        with _open_netcdf(file) as ds:
            out = ds[key][sel].values
    elif fmt == "hdf5":
        import h5py
        with h5py.File(file, "r") as f:
            out = f[key][sel]
    else:
        import zarr
        out = zarr.open_group(file, mode="r")[key][sel]
    return np.ascontiguousarray(np.moveaxis(np.asarray(out), axis, 0))


# --------------------------------------------------------------------------- discovery
SUFFIXES = {"netcdf": (".nc", ".nc4", ".cdf", ".netcdf"), "hdf5": (".h5", ".hdf5", ".he5", ".hdf"),
            "npy": (".npy", ".npz"), "zarr": (".zarr",)}


def _is_zarr(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def find_files(fmt: str, path: str) -> list[str]:
    """The input files, sorted; a UserError that lists what is there when none match."""
    if not path:
        raise UserError(f"data.params.path is empty; expected a {fmt} file, a directory of them "
                        f"or a glob (e.g. data.params.path='data/*{SUFFIXES[fmt][0]}')")
    p = Path(path)
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
    elif fmt == "zarr" and _is_zarr(p):
        files = [str(p)]
    elif p.is_dir():
        files = sorted(str(c) for c in p.iterdir() if c.name.endswith(SUFFIXES[fmt]))
    elif p.exists():
        files = [str(p)]
    else:
        near = p.parent if p.parent.is_dir() else None
        have = ", ".join(sorted(c.name for c in near.iterdir())[:20]) if near else "(no such folder)"
        raise UserError(f"data.params.path {path}: no such file or directory; {p.parent} has: "
                        f"{have or '(nothing)'}. Fix data.params.path")
    if not files:
        have = ", ".join(sorted(c.name for c in p.iterdir())[:20]) if p.is_dir() else "(nothing)"
        raise UserError(f"data.params.path {path}: no {'/'.join(SUFFIXES[fmt])} inputs; it has: "
                        f"{have or '(nothing)'}. Point it at {fmt} files or pick another data.source")
    return files


_PART = re.compile(r"^(?P<var>.+?)(?:_(?P<part>\d+))?$")


def _npy_parts(files: list[str]) -> list[dict[str, tuple[str, str | None]]]:
    """Group .npy files into parts by their numeric suffix; each .npz file is its own part."""
    npy: dict[int, dict[str, tuple[str, None]]] = {}
    parts: list[dict[str, tuple[str, str | None]]] = []
    for f in files:
        if f.endswith(".npz"):
            parts.append({name: (f, name) for name in _names("npy", f)})
            continue
        m = _PART.match(Path(f).stem)
        npy.setdefault(int(m["part"] or 0), {})[m["var"]] = (f, None)
    if npy and parts:
        raise UserError(f"data.params.path mixes .npy and .npz files ({files[0]}, ...); expected "
                        f"one kind; move the others away")
    return parts or [npy[k] for k in sorted(npy)]


def _raw_parts(fmt: str, files: list[str], wanted: list[str]) -> list[tuple[list[str], dict]]:
    """(files, {variable: (file, key)}) of each part: the variables found, of those wanted."""
    if fmt == "npy":
        return [(sorted({f for f, _ in p.values()}), p) for p in _npy_parts(files)]
    parts = []
    for f in files:
        have = set(_names(fmt, f))
        parts.append(([f], {name: (f, name) for name in wanted if name in have}))
    return parts


# --------------------------------------------------------------------------- labels from paths
PATH_LABEL = "label"           # the stored variable that data.params.label_from fills


def path_class(label_from: str, file: str) -> str:
    """The class name of one input file: its folder's name, its stem, or a regex's one group."""
    if label_from == "parent_dir":
        return Path(file).parent.name
    if label_from == "file_stem":
        return Path(file).stem
    try:
        rx = re.compile(label_from)
    except re.error as e:
        raise UserError(f"data.params.label_from='{label_from}' is not a regex ({e}); expected "
                        f"parent_dir, file_stem or a regex with one group, e.g. '/(\\w+)_run'") from None
    if rx.groups != 1:
        raise UserError(f"data.params.label_from='{label_from}' has {rx.groups} groups; expected "
                        f"exactly one (the class name), e.g. '([a-z]+)_\\d+\\.h5$'")
    m = rx.search(file)
    if m is None or not m.group(1):
        raise UserError(f"data.params.label_from='{label_from}' does not match {file}; fix the "
                        f"regex or remove the file from data.params.path")
    return m.group(1)


def part_classes(label_from: str, parts: list[tuple[list[str], dict]]) -> list[str]:
    """One class name per part; a part of several files (.npy variables) needs them to agree."""
    names = []
    for files, _ in parts:
        found = sorted({path_class(label_from, f) for f in files})
        if len(found) > 1:
            raise UserError(f"data.params.label_from='{label_from}' gives {found} for the files "
                            f"of one part ({', '.join(files)}); expected one class per part")
        names.append(found[0])
    return names


def class_table(names: list[str]) -> dict[str, int]:
    """name -> integer, in sorted name order: the same tree always gives the same numbers."""
    return {name: i for i, name in enumerate(sorted(set(names)))}


# --------------------------------------------------------------------------- checks
def _axis(fmt: str, p: Params, dims: tuple, name: str, file: str, ndim: int) -> int:
    axis = p.sample_axis
    if isinstance(axis, str) and not axis.lstrip("-").isdigit():
        if not dims:
            raise UserError(f"data.params.sample_axis={axis!r} names a dimension, but {fmt} "
                            f"variables have none; give the axis as a number (e.g. 0)")
        if axis not in dims:
            raise UserError(f"data.params.sample_axis={axis!r}: variable {name!r} in {file} has "
                            f"dimensions {list(dims)}; set sample_axis to one of them")
        return dims.index(axis)
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise UserError(f"data.params.sample_axis={axis}: variable {name!r} in {file} has only "
                        f"{ndim} axes; expected an axis in [0, {ndim})")
    return axis % ndim


def _out_dtype(p: Params, name: str, dtype: np.dtype, file: str) -> np.dtype:
    if dtype.kind not in NUMERIC_KINDS:
        raise UserError(f"variable {name!r} in {file} has dtype {dtype} (not numeric); expected "
                        f"bool, int, uint or float; remove it from data.params.variables/labels")
    if name not in p.dtypes:
        return dtype
    want = np.dtype(p.dtypes[name])
    if not np.can_cast(dtype, want, "same_kind"):
        raise UserError(f"data.params.dtypes.{name}={want}: variable {name!r} in {file} is {dtype}, "
                        f"which does not cast to {want} without changing kind; pick a dtype of "
                        f"kind {dtype.kind!r} or convert the file")
    return want


def _missing(fmt: str, files: list[str], part: dict, wanted: list[str]) -> None:
    absent = [w for w in wanted if w not in part]
    if absent:
        have = sorted(part) if fmt == "npy" else _names(fmt, files[0])
        raise UserError(f"variable(s) {absent} not in {', '.join(files)}; it has: "
                        f"{', '.join(have) or '(nothing)'}. Fix data.params.variables/labels")


def _scan_part(fmt: str, p: Params, files: list[str], part: dict, wanted: list[str]
               ) -> tuple[int, dict]:
    """Samples in one part, and per variable (per-sample shape, dtype, file, axis)."""
    _missing(fmt, files, part, wanted)
    info, counts = {}, {}
    for name in wanted:
        file, key = part[name]
        shape, dtype, dims = _header(fmt, file, key)
        axis = _axis(fmt, p, dims, name, file, len(shape)) if shape else None
        if axis is None:
            raise UserError(f"variable {name!r} in {file} is a scalar; expected an array with a "
                            f"sample axis (data.params.sample_axis={p.sample_axis})")
        counts[name] = shape[axis]
        info[name] = (shape[:axis] + shape[axis + 1:], np.dtype(dtype), file, axis)
    if len(set(counts.values())) > 1:
        raise UserError(f"variables disagree on the number of samples (axis "
                        f"{p.sample_axis}): {', '.join(f'{k}={v} in {info[k][2]}' for k, v in counts.items())}"
                        f"; expected equal counts in each part")
    return next(iter(counts.values())), info


def _compare(name: str, first: tuple, other: tuple, labels: list[str]) -> None:
    (shape0, dtype0, file0, _), (shape, dtype, file, _) = first, other
    if shape != shape0:
        raise UserError(f"variable {name!r} has per-sample shape {shape0} in {file0} but {shape} "
                        f"in {file}; expected the same shape in every file; fix or remove {file}")
    if dtype != dtype0:
        raise UserError(f"variable {name!r} is {dtype0} in {file0} but {dtype} in {file}; expected "
                        f"one dtype; convert the files or set data.params.dtypes.{name}=<dtype>")


@functools.lru_cache(maxsize=8)
def _scan(fmt: str, params_json: str) -> Index:
    # imported here: pipeline.sources (the registry) imports this module, and a Dask worker
    # may unpickle a task that names this module before it has imported the registry
    from pipeline.sources.base import Variable
    p = Params(**json.loads(params_json))
    wanted = list(p.variables) + list(p.labels)
    files = find_files(fmt, p.path)
    if not wanted:
        have = (sorted(_raw_parts(fmt, files, [])[0][1]) if fmt == "npy"
                else _names(fmt, files[0]))
        raise UserError(f"data.params.variables is empty; {files[0]} has: {', '.join(have)}. "
                        f"Name the arrays to import (data.params.variables=[a, b])")
    raw_parts = _raw_parts(fmt, files, wanted)
    classes, table = _path_classes(p, wanted, raw_parts)
    parts, infos = [], []
    for j, (where, raw) in enumerate(raw_parts):
        n, info = _scan_part(fmt, p, where, raw, wanted)
        parts.append(Part({k: (info[k][2], raw[k][1], info[k][3]) for k in wanted}, n,
                          classes[j] if classes else None))
        infos.append(info)
    for info in infos[1:]:
        for name in wanted:
            _compare(name, infos[0][name], info[name], p.labels)
    variables = {}
    for name in wanted:
        shape, dtype, file, _ = infos[0][name]
        if name in p.labels and math.prod(shape) == 1:
            shape = ()    # (N, 1): one value per sample, stored with a trailing axis
        if name in p.labels and shape != ():
            raise UserError(f"label {name!r} in {file} has per-sample shape {shape}; expected one "
                            f"value per sample; move it to data.params.variables")
        variables[_out_name(name)] = Variable(shape, str(_out_dtype(p, name, dtype, file)),
                                              f"{'label' if name in p.labels else 'variable'} "
                                              f"{name!r} imported from {fmt}")
    if classes:
        variables[PATH_LABEL] = Variable((), "int64", f"class of the file's path "
                                         f"(data.params.label_from={p.label_from!r})")
    offsets = np.concatenate([[0], np.cumsum([pt.n for pt in parts])])
    return Index(tuple(parts), offsets, variables, table)


def _path_classes(p: Params, wanted: list[str], raw_parts: list
                  ) -> tuple[list[int] | None, dict[str, int] | None]:
    """Each part's class number from data.params.label_from and the class table (None, None
    when it is not set)."""
    if not p.label_from:
        return None, None
    if PATH_LABEL in map(_out_name, wanted):
        raise UserError(f"data.params.label_from fills the variable {PATH_LABEL!r}, but "
                        f"data.params.variables/labels already import one of that name; drop it "
                        f"there or leave label_from unset")
    names = part_classes(p.label_from, raw_parts)
    table = class_table(names)
    return [table[name] for name in names], table


def _out_name(name: str) -> str:
    """Store name of an input variable: HDF5 paths (group/x) become group.x."""
    return name.strip("/").replace("/", ".")


# --------------------------------------------------------------------------- the source interface
class Importer:
    """The source interface over one file format (see the module docstring)."""
    Params = Params

    def __init__(self, fmt: str):
        self.fmt = fmt

    def index(self, p: Params) -> Index:
        return _scan(self.fmt, json.dumps(asdict(p), sort_keys=True))

    def variables(self, p: Params) -> dict[str, Any]:
        return self.index(p).variables

    def n_available(self, p: Params) -> int:
        return int(self.index(p).offsets[-1])

    def classes(self, p: Params) -> dict[str, int] | None:
        """The class table of data.params.label_from (StoreMeta.classes), or None without it."""
        return self.index(p).classes

    def generate(self, p: Params, seed: int, chunk_index: int, start: int, n: int
                 ) -> dict[str, np.ndarray]:
        """Samples [start, start + n) of the files' concatenation (seed and chunk unused)."""
        idx = self.index(p)
        first = int(np.searchsorted(idx.offsets, start, side="right") - 1)
        pieces: dict[str, list[np.ndarray]] = {_out_name(k): [] for k in idx.parts[0].refs}
        j = first
        while j < len(idx.parts) and idx.offsets[j] < start + n:
            lo = max(start, int(idx.offsets[j])) - int(idx.offsets[j])
            hi = min(start + n, int(idx.offsets[j + 1])) - int(idx.offsets[j])
            for name, (file, key, axis) in idx.parts[j].refs.items():
                pieces[_out_name(name)].append(_read(self.fmt, file, key, axis, lo, hi))
            if idx.parts[j].label is not None:
                pieces.setdefault(PATH_LABEL, []).append(np.full(hi - lo, idx.parts[j].label))
            j += 1
        return {k: np.concatenate(v).astype(idx.variables[k].dtype, copy=False)
                .reshape(-1, *idx.variables[k].shape) for k, v in pieces.items()}  # (N, 1) -> (N,)


IMPORTERS = {fmt: Importer(fmt) for fmt in ("netcdf", "hdf5", "npy", "zarr")}

# One example per format for `hpcforge prepare --help` (the config group `import_netcdf` + these).
EXAMPLES = {
    "netcdf": "data.params.path='era5/*.nc' data.params.variables=[t2m,u10] "
              "data.params.sample_axis=time 'data.params.dtypes={}' 'data.inputs={x: t2m}'",
    "hdf5": "data.params.path=events.h5 data.params.variables=[shower] data.params.labels=[energy] "
            "data.params.sample_axis=0 'data.params.dtypes={}' 'data.inputs={x: shower}'",
    "npy": "data.params.path=arrays/ data.params.variables=[u] data.params.sample_axis=0 "
           "'data.params.dtypes={}' 'data.inputs={x: u}'",
    "zarr": "data.params.path=fields.zarr data.params.variables=[u,v] data.params.sample_axis=0 "
            "'data.params.dtypes={}' 'data.inputs={x: u}'",
}
