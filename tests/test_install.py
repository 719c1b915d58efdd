"""hpcforge installed like a package (issue 26, point 5): a wheel, not the checkout, runs from any
folder, with the configs shipped inside it as `hpcforge/configs`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import ROOT, copy_checkout, small


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(the wheel, the folder it is installed into, an environment that imports from there only)."""
    tmp = tmp_path_factory.mktemp("install")
    # Built from a copy of the files git would ship: no build/ left in the checkout, and no
    # ignored local file can make the wheel look complete.
    src = tmp / "src"
    copy_checkout(src)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", str(src), "-w", str(tmp / "dist")],
                       cwd=tmp, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel, = (tmp / "dist").glob("hpcforge-*.whl")
    site = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(site), str(wheel)], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in os.environ.items() if k != "HPCFORGE_CONFIG_DIR"}
    return wheel, site, {**env, "PYTHONPATH": str(site)}


def test_the_wheel_holds_every_package_and_every_config(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = [d for d in ROOT.iterdir() if (d / "__init__.py").is_file() and d.name != "tests"]
    packages = sorted(p.parent.relative_to(ROOT).as_posix()
                      for top in tops for p in top.rglob("__init__.py"))
    missing = [f"{p}/__init__.py" for p in packages if f"{p}/__init__.py" not in names]
    configs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    missing += [c for c in configs if f"hpcforge/{c}" not in names]
    assert not missing, f"not in {wheel.name}: {missing}"


def test_the_installed_copy_prepares_and_trains_the_demo_from_any_folder(installed, tmp_path):
    _, site, env = installed
    r = _run(["-c", "import hpcforge, pipeline.config as c; print(hpcforge.__file__); "
              "print(c.CONFIG_DIR)"], tmp_path, env)
    assert r.returncode == 0, r.stderr
    module, config_dir = r.stdout.split()
    # the installed copy, not the checkout (the venv holds an editable install of it too)
    assert Path(module).is_relative_to(site) and Path(config_dir) == site / "hpcforge" / "configs"

    out = tmp_path / "out"
    r = _run(["-m", "hpcforge", "prepare", "-e", "demo", *small(out)], tmp_path, env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "data" / "ising2d.zarr" / "zarr.json").is_file()
    r = _run(["-m", "hpcforge", "train", "-e", "demo", *small(out), "train.epochs=1",
              "train.dist.nproc=1", "train.dist.backend=none"], tmp_path, env)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["steps"] > 0 and Path(summary["checkpoint"]).is_file()
    assert not (tmp_path / "configs").exists()
