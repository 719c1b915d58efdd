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


# ------------------------------------------------------------------ import circles (issue #27)
def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the repository's packages."""
    found = {}
    for package in FORBIDDEN:
        for path in (root / package).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the repository modules it imports, at any depth of its tree. `from pkg import
    mod` depends on pkg.mod alone (Python runs pkg's __init__ first for any submodule, so a
    child's edge to its own package is not a choice the code made)."""
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files}
                targets |= subs if len(subs) == len(node.names) else subs | {base}
        deps = set()
        for target in targets:
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (scipy's csgraph)."""
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components
    names = sorted(graph)
    index = {n: i for i, n in enumerate(names)}
    rows = [index[a] for a in names for b in graph[a]]
    cols = [index[b] for a in names for b in graph[a]]
    adjacency = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, label = connected_components(adjacency, directed=True, connection="strong")
    groups: dict[int, set[str]] = {}
    for n, lab in zip(names, label):
        groups.setdefault(int(lab), set()).add(n)
    return [g for g in groups.values() if len(g) > 1]


def test_no_import_circle():
    """No module imports, through any chain, one that imports it back (issue #27: there were three
    circles of 12, 10 and 3 modules). A circle is named by its modules."""
    found = [sorted(c) for c in circles(import_graph(module_files()))]
    assert not found, "import circle(s) among: " + " | ".join(" <-> ".join(c) for c in found) + \
        " (break it at its cause: move the shared code below both, or pass it in as an argument)"



# ------------------------------------------------------- pipeline's subpackages (issue #27)
# subpackage -> the subpackages it may import; imports point one way (bottom to top):
# physics -> core -> sources -> config -> data, runtime -> train -> analysis
PIPELINE_LAYERS = {
    "physics": set(),                                   # observables, bins: numpy alone
    "core": {"physics"},                                # errors, checkpoint files, figures, ...
    "sources": {"core", "physics"},                     # the simulators and importers
    "config": {"core", "sources"},                      # the config dataclasses (typed by sources)
    "data": {"config", "core", "physics", "sources"},   # stores, loader, prepare on Dask
    "runtime": {"config", "core"},                      # ranks, signals, watchdog, W&B
    "train": {"config", "core", "data", "physics", "runtime", "sources"},
    "analysis": {"config", "core", "data", "physics", "runtime", "sources", "train"},
}


def layer_of(module: str) -> str | None:
    """`pipeline.train.loop` -> `train`; pipeline itself -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "pipeline" and len(parts) > 1 else None


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    """`a imports b` for each pipeline import between subpackages that PIPELINE_LAYERS does not
    allow (an import within one subpackage is always allowed)."""
    bad = []
    for module, deps in sorted(graph.items()):
        here = layer_of(module)
        for dep in sorted(deps):
            there = layer_of(dep)
            if here and there and here != there and there not in PIPELINE_LAYERS.get(here, set()):
                bad.append(f"{module} imports {dep} ({here} may import only "
                           f"{', '.join(sorted(PIPELINE_LAYERS.get(here, ()))) or 'nothing'})")
    return bad


def test_every_pipeline_module_sits_in_one_subpackage_and_imports_point_one_way():
    files = module_files()
    loose = sorted(m for m in files if m.startswith("pipeline.") and m.count(".") == 1
                   and layer_of(m) not in PIPELINE_LAYERS)
    assert not loose, f"modules outside pipeline's subpackages: {loose}"
    packages = {layer_of(m) for m in files if layer_of(m)}
    assert packages == set(PIPELINE_LAYERS), sorted(packages ^ set(PIPELINE_LAYERS))
    bad = wrong_way_imports(import_graph(files))
    assert not bad, "imports against pipeline's layers: " + "; ".join(bad)


def test_the_layers_themselves_have_no_circle():
    """The allowed directions form a DAG: a circle there would allow a circle of modules."""
    assert not circles({k: set(v) for k, v in PIPELINE_LAYERS.items()})


def test_an_import_against_the_layers_is_named():
    graph = {"pipeline.core.errors": set(), "pipeline.train.loop": {"pipeline.core.errors"},
             "pipeline.core.figures": {"pipeline.train.loop"}}
    assert wrong_way_imports(graph) == [
        "pipeline.core.figures imports pipeline.train.loop (core may import only physics)"]

def test_a_planted_circle_is_found_and_named(tmp_path):
    for package in FORBIDDEN:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "a.py").write_text("from pipeline import b\n")
    (tmp_path / "pipeline" / "b.py").write_text("def f():\n    from pipeline.c import g\n")
    (tmp_path / "pipeline" / "c.py").write_text("import pipeline.a\n")
    (tmp_path / "pipeline" / "d.py").write_text("from pipeline import a, b\n")   # no circle
    (tmp_path / "models" / "m.py").write_text("from models import n\n")           # child ->
    (tmp_path / "models" / "n.py").write_text("from models import m\n")           # and back
    found = circles(import_graph(module_files(tmp_path)))
    assert sorted(map(sorted, found)) == [["models.m", "models.n"],
                                          ["pipeline.a", "pipeline.b", "pipeline.c"]]
