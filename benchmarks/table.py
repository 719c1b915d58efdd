"""One row of the benchmark table, shared by every benchmark module (`hpcforge bench`).

Its own module so that the benchmarks that make rows (attention, torch_compile, ...) and the runner
that collects them (benchmarks/run.py) both import it, and neither imports the other (issue #27).
"""
from __future__ import annotations


def row(name, case, value, baseline, unit, target, what, ratio: float | None = None) -> dict:
    """One table row; `ratio` is value / baseline unless given (a median of paired ratios)."""
    ratio = value / baseline if ratio is None else ratio
    return {"benchmark": name, "case": case, "value": round(value, 2), "baseline": round(baseline, 2),
            "unit": unit, "ratio": round(ratio, 3), "target": target, "what": what}
