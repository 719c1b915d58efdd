"""Imports point one way: hpcforge (the command) -> jobs -> pipeline -> models (issue #17).

An ast walk over every module of the five packages, function-local imports included (a lazy
`from jobs import records` inside a function is as much a dependency as one at the top). A
dependency that points up names the module, the line and the import, so the fix is obvious:
move the code that needs the upper layer up, or pass it down as an argument.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> the top-level packages of this repository it must never import
FORBIDDEN = {
    "models": {"pipeline", "jobs", "benchmarks", "hpcforge"},
    "pipeline": {"jobs", "benchmarks", "hpcforge"},
    "jobs": {"benchmarks", "hpcforge"},
    "benchmarks": {"jobs", "hpcforge"},
    "hpcforge": set(),
}


def imported_packages(source: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute import in `source`, at any depth of the tree."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def upward_imports(package: str) -> list[str]:
    """`path:line imports X` for each import from `package` into a layer above it."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imported_packages(path.read_text()):
            if module.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package):
    bad = upward_imports(package)
    assert not bad, (f"{package}/ may not import {', '.join(sorted(FORBIDDEN[package]))} "
                     f"(imports point hpcforge -> jobs -> pipeline -> models): " + "; ".join(bad))


def test_the_walk_sees_function_local_imports():
    source = "import os\n\ndef f():\n    from jobs import records\n    import hpcforge.cli\n"
    assert imported_packages(source) == [(1, "os"), (4, "jobs"), (5, "hpcforge.cli")]


def test_every_package_is_checked():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(FORBIDDEN), f"give {sorted(packages ^ set(FORBIDDEN))} a layer here"
