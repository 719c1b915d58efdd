"""Bad outputs: a path we may not write, and stores that are not ours (a full disk: test_prepare_faults)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import zarr

from pipeline.config import load_config
from pipeline.core.errors import UserError
from pipeline.data.prepare import Paths, _hpcforge_meta, prepare
from pipeline.data.store import open_store

SMALL = ["data.params.lattice=8", "data.params.burn_in=5", "data.params.decorrelation=1",
         "data.n_samples=256", "data.chunk_size=64", "data.shard_size=64", "data.dask.progress=false"]


def test_permission_denied_is_a_clear_error(tmp_path, dask_address):
    if os.geteuid() == 0:      # root writes anywhere on disk, but not under /sys
        target = Path("/sys/hpcforge-test/set.zarr")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        target = tmp_path / "ro" / "set.zarr"
    cfg = load_config("demo", [f"output_dir={tmp_path}", *SMALL, f"data.path={target}",
                               f"data.dask.scheduler={dask_address}"])
    # refused before any work (pipeline/rundir.check_writable, issue 24): one line naming the key
    with pytest.raises(UserError, match=r"data\.path=.*set\.zarr: cannot write in .*(hpcforge-test|ro) "
                                        r"\((Permission denied|Operation not permitted)\); set data\.path "
                                        r"to a folder you can write to"):
        prepare(cfg.data, cfg.to_dict(), log=lambda *a: None)
    assert not target.exists() and not target.with_name("set.zarr.partial").exists()


def test_a_foreign_directory_is_never_replaced_even_with_overwrite(tmp_path):
    target = tmp_path / "mine.zarr"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    cfg = load_config("demo", [f"output_dir={tmp_path}", *SMALL, f"data.path={target}",
                               "data.overwrite=true"])
    with pytest.raises(UserError, match=r"mine\.zarr exists and is not an hpcforge store of format "
                                        r"version 1; refusing to replace it even with "
                                        r"data.overwrite=true"):
        prepare(cfg.data, cfg.to_dict())
    assert (target / "thesis.tex").read_text() == "precious"


def test_a_foreign_partial_or_another_version_is_refused(tmp_path):
    cfg = load_config("demo", [f"output_dir={tmp_path}", *SMALL])
    paths = Paths.of(cfg.data.path)
    zarr.open_group(str(paths.partial), mode="w").attrs["hpcforge"] = {
        "format": "hpcforge-zarr", "format_version": 0}
    with pytest.raises(UserError, match=r"\.partial exists but was not written by this hpcforge "
                                        r"\(format 'hpcforge-zarr' version 1\); remove it"):
        prepare(cfg.data, cfg.to_dict())
    old = tmp_path / "old.zarr"
    root = zarr.open_group(str(old), mode="w")
    root.attrs["hpcforge"] = {"format": "hpcforge-zarr", "format_version": 0, "complete": True}
    with pytest.raises(UserError, match=r"has store format version 0, this hpcforge reads 1; "
                                        r"prepare it again"):
        open_store(old)
