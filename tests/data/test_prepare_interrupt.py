"""Ctrl-C in `hpcforge prepare` (issue 24, point 5): a terminal sends SIGINT to the whole process
group, the Dask worker processes included, which each printed ~30 lines of traceback before the
CLI's one line. A real prepare subprocess with a real LocalCluster, interrupted while its workers
are reading a user's HDF5 tree: one line, exit 130, no process of the group left behind, and no
store at data.path that looks complete (the .partial beside it is what the same command resumes)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from benchmarks.own_data import write_calo_tree
from helpers import ROOT, ctrl_c_reaches_children

LINE = ("hpcforge: interrupted; the same command resumes a prepare (a training run with "
        "train.resume=auto)\n")


def _wait_for_work(scratch, proc, timeout: float = 240) -> None:
    """Until pass 1 has written a chunk (workers are mid-prepare), or fail."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if (scratch / "chunks").is_dir() and any((scratch / "chunks").iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    pytest.fail("prepare wrote no chunk in time")


def _group(pgid: int) -> list[str]:
    return subprocess.run(["ps", "-o", "pid,args", "--no-headers", "-g", str(pgid)],
                          capture_output=True, text=True).stdout.splitlines()


def _group_gone(pgid: int, timeout: float = 10) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_ctrl_c_in_prepare_is_one_line_exit_130_and_leaves_no_complete_looking_store(tmp_path):
    write_calo_tree(tmp_path / "calo", files=2, per_file=2000)          # 12000 showers
    store = tmp_path / "calo.zarr"
    with ctrl_c_reaches_children():
        proc = subprocess.Popen(
            [sys.executable, "-m", "hpcforge", "prepare", "-e", "calo_tree_pid",
             f"output_dir={tmp_path}", f"data.path={store}", "data.chunk_size=64",
             f"data.params.path={tmp_path / 'calo' / '*' / '*.h5'}", "data.dask.progress=false"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)  # its own process group, as a terminal's foreground job
    _wait_for_work(tmp_path / "calo.zarr.scratch", proc)
    os.killpg(proc.pid, signal.SIGINT)                                 # what Ctrl-C sends
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == LINE, err[-3000:]
    assert _group_gone(proc.pid), _group(proc.pid)                     # workers did not outlive it
    assert not store.exists() and (tmp_path / "calo.zarr.partial").is_dir()
