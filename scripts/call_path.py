"""How many of the product's modules one command passes through, and how often it comes back (issue #27).

    .venv/bin/python scripts/call_path.py train -e demo train.max_steps=2 train.dist.backend=none ...

Runs `hpcforge ARGS` in this process under `sys.setprofile` and records, for every Python call and
return inside the product packages (hpcforge/, jobs/, pipeline/, models/), the module that holds
the running code. Consecutive events in one module are one *stay*. The report counts:

- modules: distinct modules visited;
- stays: how many times control moved from one module to another (plus the first);
- re-entries: stays in a module that had been left before (the "climbs back");
- returns: moves caused by a function returning to its caller's module.

Module bodies run by imports are not counted, only function calls. Third-party code (torch, dask, zarr ...) is transparent: a call from pipeline.train.loop through torch
back into pipeline.train.loop is one stay. The numbers depend on the command and its steps, so compare
two trees with the same command line.
"""
from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("hpcforge", "jobs", "pipeline", "models")


def module_of(filename: str, cache: dict[str, str | None]) -> str | None:
    """Dotted module name of a product file, None for anything else."""
    if filename in cache:
        return cache[filename]
    name = None
    try:
        rel = Path(filename).resolve().relative_to(ROOT)
    except ValueError:
        rel = None
    if rel is not None and rel.parts and rel.parts[0] in PACKAGES and rel.suffix == ".py":
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
    cache[filename] = name
    return name


def trace(argv: list[str]) -> dict:
    cache: dict[str, str | None] = {}
    stays: list[tuple[str, str]] = []      # (module, how we got there: call / return)

    def profile(frame, event, arg):
        if event not in ("call", "return"):
            return
        if frame.f_code.co_name == "<module>":    # an import running a module's body
            return
        if event == "call":
            mod = module_of(frame.f_code.co_filename, cache)
        else:   # where control goes on return: the first product frame below this one
            caller = frame.f_back
            mod = None
            while caller is not None and mod is None:
                if caller.f_code.co_name != "<module>":
                    mod = module_of(caller.f_code.co_filename, cache)
                caller = caller.f_back
        if mod is not None and (not stays or stays[-1][0] != mod):
            stays.append((mod, event))

    from hpcforge.cli import main
    sys.setprofile(profile)
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    finally:
        sys.setprofile(None)
    seen: set[str] = set()
    reentries = 0
    for mod, _ in stays:
        reentries += mod in seen
        seen.add(mod)
    return {"command": "hpcforge " + " ".join(argv), "exit": rc, "modules": len(seen),
            "stays": len(stays), "re_entries": reentries,
            "returns": sum(1 for _, how in stays if how == "return"),
            "per_module": dict(Counter(m for m, _ in stays).most_common())}


if __name__ == "__main__":
    os.chdir(ROOT)
    result = trace(sys.argv[1:])
    print(json.dumps(result, indent=1))
