"""Importers on real NetCDF, HDF5, .npy/.npz and Zarr files, prepared by a real Dask cluster."""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from data_helpers import import_config, sample_hashes, stored

from pipeline.core.errors import UserError
from pipeline.data.prepare import prepare
from pipeline.data.store import open_store
from pipeline.sources import SOURCES

SIZES = (30, 20)   # samples in the two input files


def _data(n: int, offset: int) -> dict[str, np.ndarray]:
    """Distinct samples: field (n, 3, 4) float32 and label (n,) int64."""
    field = (np.arange(n * 12, dtype=np.float32).reshape(n, 3, 4) + 1000 * offset) / 7
    return {"field": field, "label": (np.arange(n) + offset) % 3}


def _parts() -> list[dict[str, np.ndarray]]:
    return [_data(SIZES[0], 0), _data(SIZES[1], SIZES[0])]


def write_netcdf(folder, parts, axis_last=False):
    import xarray as xr
    for i, p in enumerate(parts):
        field = np.moveaxis(p["field"], 0, 1) if axis_last else p["field"]
        dims = ("y", "time", "x") if axis_last else ("time", "y", "x")
        xr.Dataset({"field": (dims, field), "label": (("time",), p["label"])}) \
            .to_netcdf(folder / f"part{i}.nc", engine="h5netcdf")
    return folder / "*.nc"


def write_hdf5(folder, parts):
    import h5py
    for i, p in enumerate(parts):
        with h5py.File(folder / f"part{i}.h5", "w") as f:
            for k, v in p.items():
                f.create_dataset(k, data=v)
    return folder


def write_npy(folder, parts):
    for i, p in enumerate(parts):
        for k, v in p.items():
            np.save(folder / f"{k}_{i:03d}.npy", v)
    return folder


def write_npz(folder, parts):
    for i, p in enumerate(parts):
        np.savez(folder / f"part{i}.npz", **p)
    return folder


def write_zarr(folder, parts):
    for i, p in enumerate(parts):
        g = zarr.open_group(str(folder / f"part{i}.zarr"), mode="w")
        for k, v in p.items():
            g.create_array(k, data=v, chunks=(7, *v.shape[1:]))
    return folder


WRITERS = {"netcdf": write_netcdf, "hdf5": write_hdf5, "npy-files": write_npy,
           "npz-files": write_npz, "zarr": write_zarr}
SOURCE = {"npy-files": "npy", "npz-files": "npy"}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_import_holds_every_input_sample_once(kind, tmp_path, dask_address):
    parts = _parts()
    (tmp_path / "in").mkdir()
    path = WRITERS[kind](tmp_path / "in", parts)
    cfg = import_config(tmp_path, SOURCE.get(kind, kind), path, address=dask_address)
    store = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    expected = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert store.meta.n_samples == 50 and store.meta.splits == {"train": 35, "val": 10,
                                                                      "test": 5}  # (issue 24)
    got = stored(store)
    assert got["field"].dtype == np.float32 and got["label"].dtype == np.int64
    assert sample_hashes(got) == sample_hashes(expected)
    labels = store.split("train")["label"][:]
    assert store.stats("train", "label")["class_counts"] == {
        str(c): int((labels == c).sum()) for c in range(3)}


def test_netcdf_sample_axis_by_dimension_name(tmp_path, dask_address):
    parts = _parts()
    (tmp_path / "in").mkdir()
    path = write_netcdf(tmp_path / "in", parts, axis_last=True)       # field dims (y, time, x)
    cfg = import_config(tmp_path, "netcdf", path, "data.params.sample_axis=time",
                        "data.params.dtypes={field: float64}", address=dask_address)
    store = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    got = stored(store)
    assert got["field"].shape == (50, 3, 4) and got["field"].dtype == np.float64   # cast
    expected = {"field": np.concatenate([p["field"] for p in parts]).astype(np.float64),
                "label": np.concatenate([p["label"] for p in parts])}
    assert sample_hashes(got) == sample_hashes(expected)


def test_n_samples_takes_the_first_samples_and_refuses_more_than_exist(tmp_path):
    (tmp_path / "in").mkdir()
    path = write_npz(tmp_path / "in", _parts())
    cfg = import_config(tmp_path, "npy", path, "data.n_samples=40")
    src = SOURCES["npy"]
    assert src.n_available(cfg.data.params) == 50
    got = src.generate(cfg.data.params, 0, 0, 25, 10)                 # straddles the two files
    np.testing.assert_array_equal(got["label"], (np.arange(25, 35)) % 3)
    cfg = import_config(tmp_path, "npy", path, "data.n_samples=51")
    with pytest.raises(UserError, match=r"data.n_samples=51: the npy input holds 50 samples; "
                                        r"expected <= 50; set data.n_samples=0"):
        prepare(cfg.data, cfg.to_dict())


# --------------------------------------------------------------------------- bad input
def _scan(tmp_path, source, path, *extra):
    cfg = import_config(tmp_path, source, path, *extra)
    return SOURCES[source].variables(cfg.data.params)


def test_missing_files_list_what_exists(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"in: no \.h5/.*inputs; it has: notes\.txt"):
        _scan(tmp_path, "hdf5", tmp_path / "in")
    with pytest.raises(UserError, match=r"nothere\.nc: no such file or directory; .* has: in"):
        _scan(tmp_path, "netcdf", tmp_path / "nothere.nc")


def test_missing_variable_lists_the_variables_there(tmp_path):
    (tmp_path / "in").mkdir()
    write_hdf5(tmp_path / "in", _parts())
    with pytest.raises(UserError, match=r"variable\(s\) \['pressure'\] not in .*part0\.h5; "
                                        r"it has: field, label\. Fix data\.params\.variables"):
        _scan(tmp_path, "hdf5", tmp_path / "in", "data.params.variables=[pressure]")


def test_shapes_that_differ_between_files_name_both_files(tmp_path):
    (tmp_path / "in").mkdir()
    parts = _parts()
    parts[1]["field"] = np.zeros((20, 3, 5), np.float32)
    write_npz(tmp_path / "in", parts)
    with pytest.raises(UserError, match=r"'field' has per-sample shape \(3, 4\) in .*part0\.npz "
                                        r"but \(3, 5\) in .*part1\.npz; expected the same shape"):
        _scan(tmp_path, "npy", tmp_path / "in")


def test_dtypes_that_differ_or_are_not_numeric_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    parts = _parts()
    parts[1]["field"] = parts[1]["field"].astype(np.float64)
    write_zarr(tmp_path / "a", parts)
    with pytest.raises(UserError, match=r"'field' is float32 in .*part0\.zarr but float64 in "
                                        r".*part1\.zarr; .*data\.params\.dtypes\.field=<dtype>"):
        _scan(tmp_path, "zarr", tmp_path / "a")
    (tmp_path / "b").mkdir()
    parts = _parts()
    parts[0]["label"] = np.array([str(i) for i in range(30)])
    write_npz(tmp_path / "b", parts[:1])
    with pytest.raises(UserError, match=r"'label' in .*part0\.npz has dtype <U2 \(not numeric\)"):
        _scan(tmp_path, "npy", tmp_path / "b")
    (tmp_path / "c").mkdir()
    write_npz(tmp_path / "c", _parts())
    with pytest.raises(UserError, match=r"data\.params\.dtypes\.field=int8: .* is float32"):
        _scan(tmp_path, "npy", tmp_path / "c", "data.params.dtypes={field: int8}")


def test_variables_of_one_file_must_agree_on_samples_and_labels_be_scalar(tmp_path):
    (tmp_path / "a").mkdir()
    np.savez(tmp_path / "a" / "p.npz", field=np.zeros((5, 2), np.float32), label=np.zeros(4, int))
    with pytest.raises(UserError, match=r"disagree on the number of samples .*field=5 .*label=4"):
        _scan(tmp_path, "npy", tmp_path / "a")
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "b" / "p.npz", field=np.zeros((5, 2), np.float32), label=np.zeros((5, 2)))
    with pytest.raises(UserError, match=r"label 'label' .* per-sample shape \(2,\); expected one"):
        _scan(tmp_path, "npy", tmp_path / "b")
    with pytest.raises(UserError, match=r"sample_axis='time' names a dimension, but npy"):
        _scan(tmp_path, "npy", tmp_path / "b", "data.params.sample_axis=time")


# --------------------------------------------------------------------------- NaN/Inf policy
def _with_nans(tmp_path):
    (tmp_path / "in").mkdir()
    parts = _parts()
    parts[0]["field"][3, 1, 2] = np.nan
    parts[0]["field"][4, 0, 0] = np.inf
    parts[1]["field"][10, 2, 3] = -np.inf                   # global sample 40
    return write_npz(tmp_path / "in", parts)


def test_nan_inf_fail_by_default_with_count_and_first_location(tmp_path, dask_address):
    cfg = import_config(tmp_path, "npy", _with_nans(tmp_path), address=dask_address)
    with pytest.raises(UserError, match=r"variable 'field' has 2 NaN/Inf values in 2 of samples "
                                        r"\[0, 16\), first at sample 3 index \[1, 2\]; .*"
                                        r"data.invalid=drop .* data.invalid=fill"):
        prepare(cfg.data, cfg.to_dict(), log=lambda *a: None)
    # the fix works as printed (issue 24): the failed prepare's partial store is not in its way
    cfg = import_config(tmp_path, "npy", tmp_path / "in", "data.invalid=drop", address=dask_address)
    said = []
    assert open_store(prepare(cfg.data, cfg.to_dict(), log=said.append)).meta.n_samples == 47
    assert any("data.invalid: 'fail' there, 'drop' now" in line for line in said), said


def test_nan_inf_drop_removes_those_samples_and_records_counts(tmp_path, dask_address):
    cfg = import_config(tmp_path, "npy", _with_nans(tmp_path), "data.invalid=drop",
                        address=dask_address)
    store = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    assert store.meta.n_samples == 47 and sum(store.meta.splits.values()) == 47
    got = stored(store)
    assert np.isfinite(got["field"]).all()
    keep = np.setdiff1d(np.arange(50), [3, 4, 40])
    parts = _parts()
    expected = {k: np.concatenate([p[k] for p in parts])[keep] for k in parts[0]}
    assert sample_hashes(got) == sample_hashes(expected)
    assert store.meta.invalid == {"policy": "drop", "variables": {
        "field": {"values": 3, "samples": 3, "first": [3, 1, 2]}}}


def test_nan_inf_fill_replaces_values(tmp_path, dask_address):
    cfg = import_config(tmp_path, "npy", _with_nans(tmp_path), "data.invalid=fill",
                        "data.fill_value=-1.5", address=dask_address)
    store = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    got = stored(store)
    assert len(got["field"]) == 50 and np.isfinite(got["field"]).all()
    assert (got["field"] == -1.5).sum() == 3
    assert store.meta.invalid["variables"]["field"]["values"] == 3


# --------------------------------------------------------------------------- NetCDF-3, (N, 1) labels
@pytest.mark.parametrize("fmt", ["NETCDF3_CLASSIC", "NETCDF3_64BIT"])
def test_netcdf3_file_imports_with_the_values_of_its_netcdf4_twin(fmt, tmp_path, dask_address):
    """NetCDF-3 (what xarray's scipy engine and many archives write) has no HDF5 inside: h5netcdf
    cannot open it; the importer tells the families apart by their first bytes."""
    import xarray as xr
    parts = _parts()
    stores = {}
    for engine, kw in (("h5netcdf", {}), ("scipy", {"format": fmt})):
        folder = tmp_path / engine
        folder.mkdir()
        for i, p in enumerate(parts):
            xr.Dataset({"field": (("time", "y", "x"), p["field"]), "label": (("time",), p["label"])}
                       ).to_netcdf(folder / f"part{i}.nc", engine=engine, **kw)
        cfg = import_config(tmp_path / f"out-{engine}", "netcdf", folder / "*.nc",
                            "data.params.dtypes={label: int64}",   # NetCDF-3 holds no int64
                            address=dask_address)
        stores[engine] = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    assert (tmp_path / "scipy" / "part0.nc").read_bytes()[:4] in (b"CDF\x01", b"CDF\x02")
    three, four = stored(stores["scipy"]), stored(stores["h5netcdf"])
    assert three["label"].dtype == np.int64 and three["field"].dtype == np.float32
    for k in four:
        np.testing.assert_array_equal(three[k], four[k])
    assert stores["scipy"].meta.checksums == stores["h5netcdf"].meta.checksums
    expected = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert sample_hashes(three) == sample_hashes(expected)


def test_a_file_that_is_not_netcdf_is_refused_with_its_first_bytes(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.nc").write_text("hello, world")
    with pytest.raises(UserError, match=r"notes\.nc is not a NetCDF file \(it starts with "
                                        r"b'hell'; expected CDF\\x01, CDF\\x02 or an HDF5"):
        _scan(tmp_path, "netcdf", tmp_path / "in")


def test_label_stored_as_n_by_1_imports_as_n_scalars(tmp_path, dask_address):
    """Many HDF5 files keep a per-event value as (N, 1); it is one value per sample."""
    import h5py
    parts = _parts()
    (tmp_path / "in").mkdir()
    for i, p in enumerate(parts):
        with h5py.File(tmp_path / "in" / f"part{i}.h5", "w") as f:
            f.create_dataset("field", data=p["field"])
            f.create_dataset("label", data=p["label"].reshape(-1, 1))      # (N, 1)
    cfg = import_config(tmp_path, "hdf5", tmp_path / "in", address=dask_address)
    assert SOURCES["hdf5"].variables(cfg.data.params)["label"].shape == ()
    store = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    got = stored(store)
    assert got["label"].shape == (50,)
    expected = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert sample_hashes(got) == sample_hashes(expected)
    assert sum(store.stats("train", "label")["class_counts"].values()) == 35  # 50 - val - test


# --------------------------------------------------------------------------- labels from paths (issue #16)
PARTICLES = {"eplus": 3, "gamma": 2, "piplus": 2}     # files per particle folder


def write_calogan_tree(root) -> dict[float, str]:
    """eplus/ gamma/ piplus/ folders of small .h5 files, CaloGAN-style, each event's 'energy'
    unique across the tree; returns energy -> particle, to check every label after the shuffle."""
    import h5py
    truth, energy = {}, 0.0
    for particle, n_files in PARTICLES.items():
        (root / particle).mkdir(parents=True)
        for i in range(n_files):
            e = energy + np.arange(6, dtype=np.float64)           # 6 events per file
            shower = np.repeat(e[:, None, None], 12, 1).reshape(6, 3, 4).astype(np.float32)
            with h5py.File(root / particle / f"{particle}_{i}.h5", "w") as f:
                f.create_dataset("energy", data=e)
                f.create_dataset("shower", data=shower)
            truth.update({float(v): particle for v in e})
            energy += 6
    return truth


def calo_config(tmp_path, label_from, *extra, address=None):
    return import_config(tmp_path, "hdf5", tmp_path / "calo" / "*" / "*.h5",
                         "data.params.variables=[shower, energy]", "data.params.labels=[]",
                         f"data.params.label_from={label_from}", "data.inputs={x: shower, y: label}",
                         *extra, address=address)


def test_calogan_tree_becomes_one_shuffled_store_labelled_by_folder(tmp_path, dask_address):
    truth = write_calogan_tree(tmp_path / "calo")
    cfg = calo_config(tmp_path, "parent_dir", address=dask_address)
    store = open_store(prepare(cfg.data, cfg.to_dict(), log=lambda *a: None))
    assert store.meta.classes == {"eplus": 0, "gamma": 1, "piplus": 2}           # sorted names
    assert zarr.open_group(str(store.path), mode="r").attrs["hpcforge"]["classes"] == store.meta.classes
    got = stored(store)
    assert got["label"].dtype == np.int64 and len(got["label"]) == len(truth) == 42
    names = {v: k for k, v in store.meta.classes.items()}
    assert [names[int(c)] for c in got["label"]] == [truth[float(e)] for e in got["energy"]]
    assert (got["shower"][:, 0, 0] == got["energy"]).all()                      # rows stay whole
    train_energy = store.split("train")["energy"][:]
    assert not (np.diff(train_energy) > 0).all()                               # globally shuffled


def test_a_classifier_with_another_class_count_than_the_store_is_refused_before_any_rank(
        tmp_path, dask_address):
    """Issue 24: out_features=10 on a 3-class store trained without a word."""
    from helpers import hpcforge
    write_calogan_tree(tmp_path / "calo")
    cfg = calo_config(tmp_path, "parent_dir", address=dask_address)
    store = prepare(cfg.data, cfg.to_dict(), log=lambda *a: None)
    r = hpcforge("train", "--nproc", "2", f"output_dir={tmp_path / 'run'}", f"data.path={store}",
                 "data.inputs={x: shower, y: label}", "model=mlp", "model.in_features=12",
                 "model.out_features=10", "train.batch_size=4", "train.dist.backend=horovod")
    assert r.returncode == 2 and r.stdout == "", r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stderr == (f"hpcforge: error: model.out_features=10, but the store at data.path="
                        f"{store} holds 3 classes in data.inputs.y=label (eplus, gamma, piplus); "
                        f"set model.out_features=3\n")
    assert not (tmp_path / "run").exists()


def test_label_from_file_stem_and_regex(tmp_path):
    write_calogan_tree(tmp_path / "calo")
    stem = calo_config(tmp_path, "file_stem")
    assert SOURCES["hdf5"].classes(stem.data.params) == {
        f"{p}_{i}": j for j, (p, i) in enumerate(sorted((p, i) for p, n in PARTICLES.items()
                                                           for i in range(n)))}
    rx = calo_config(tmp_path, r"'/([a-z]+)_\d+\.h5$'")
    params = rx.data.params
    assert SOURCES["hdf5"].classes(params) == {"eplus": 0, "gamma": 1, "piplus": 2}
    got = SOURCES["hdf5"].generate(params, 0, 0, 24, 12)                 # gamma_1, piplus_0
    np.testing.assert_array_equal(got["label"], [1] * 6 + [2] * 6)
    assert SOURCES["hdf5"].variables(params)["label"].dtype == "int64"


def test_label_from_refuses_a_regex_without_one_group_and_names_a_path_it_misses(tmp_path):
    write_calogan_tree(tmp_path / "calo")
    (tmp_path / "in").mkdir()
    write_hdf5(tmp_path / "in", _parts())
    with pytest.raises(UserError, match=r"label_from='\[a-z\]\+' has 0 groups; expected exactly one"):
        _scan(tmp_path, "hdf5", tmp_path / "calo" / "*" / "*.h5", "data.params.labels=[]",
              "data.params.label_from='[a-z]+'")
    with pytest.raises(UserError, match=r"label_from='\(a\)\(b\)' has 2 groups"):
        _scan(tmp_path, "hdf5", tmp_path / "calo" / "*" / "*.h5", "data.params.labels=[]",
              "data.params.label_from='(a)(b)'")
    miss = str(tmp_path / "calo" / "eplus" / "eplus_0.h5")
    with pytest.raises(UserError) as e:
        _scan(tmp_path, "hdf5", tmp_path / "calo" / "*" / "*.h5",
              "data.params.labels=[]", r"data.params.label_from='(gamma|piplus)_\d'")
    assert str(e.value) == (rf"data.params.label_from='(gamma|piplus)_\d' does not match {miss}; "
                            f"fix the regex or remove the file from data.params.path")
    with pytest.raises(UserError, match=r"fills the variable 'label', but data.params.variables/labels"):
        _scan(tmp_path, "hdf5", tmp_path / "in", "data.params.label_from=parent_dir")  # has 'label'

