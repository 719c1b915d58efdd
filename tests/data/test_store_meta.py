"""StoreMeta: a prepared store's attrs["hpcforge"], typed and read in one place (issue 17)."""
from __future__ import annotations

import json

import pytest
import zarr

from pipeline.core.errors import UserError
from pipeline.data.store import LATER, PROVENANCE, StoreMeta, open_store


def _attrs(path) -> dict:
    return json.loads(json.dumps(dict(zarr.open_group(str(path), mode="r").attrs)["hpcforge"]))


def test_store_meta_round_trips_a_prepared_stores_attrs(small_store):
    path, _ = small_store
    attrs = _attrs(path)
    meta = open_store(path).meta
    assert isinstance(meta, StoreMeta) and meta == StoreMeta.from_attrs(attrs)
    assert meta.to_dict() == attrs                              # every key, every value
    assert meta.source == "ising2d" and meta.splits == {"train": 512, "val": 128, "test": 0}
    assert meta.stats["train"]["spins"] == attrs["stats"]["train"]["spins"] and meta.complete is True
    assert meta.extra == {}                                     # this version knows every key


def test_provenance_is_the_dataset_dict_checkpoints_have_always_held(small_store):
    """Checkpoints embed {source, splits, checksums, shuffle} as a plain dict: same keys, same values."""
    attrs = _attrs(small_store[0])
    prov = open_store(small_store[0]).meta.provenance()
    assert prov == {k: attrs[k] for k in ("source", "splits", "checksums", "shuffle")}
    assert tuple(prov) == PROVENANCE and json.loads(json.dumps(prov)) == prov


def test_older_and_newer_stores_keep_what_they_have(small_store):
    attrs = _attrs(small_store[0])
    first_v1 = {k: v for k, v in attrs.items() if k not in LATER}   # before importers came
    meta = StoreMeta.from_attrs(first_v1)
    assert meta.invalid is None and meta.content is None and meta.to_dict() == first_v1
    newer = {**attrs, "lineage": {"parent": "x.zarr"}}             # a key of a later version
    assert StoreMeta.from_attrs(newer).extra == {"lineage": {"parent": "x.zarr"}}
    assert StoreMeta.from_attrs(newer).to_dict() == newer


def test_metadata_missing_a_key_is_one_error_naming_it(small_store):
    attrs = {k: v for k, v in _attrs(small_store[0]).items() if k not in ("splits", "stats")}
    with pytest.raises(UserError, match=r"/x.zarr: its metadata \(attrs\['hpcforge'\]\) lacks "
                                        r"splits, stats; prepare it again"):
        StoreMeta.from_attrs(attrs, "/x.zarr")
