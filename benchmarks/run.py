"""`make bench`: run every benchmark, print one table of ratios, write it to JSON.

Each benchmark measures its subject and its baseline in the same run, on the same machine, so the
ratio means something on a laptop and on a cluster node alike.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def _versions() -> dict[str, str]:
    from pipeline.trainer import versions
    out = versions()
    try:
        from mpi4py import MPI
        out["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    except Exception as e:  # report, do not fail the table
        out["mpi"] = f"unavailable ({e})"
    return out


def bench_allreduce(quick: bool) -> list[dict]:
    from pipeline.launch import mpirun_command
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "allreduce.json"
        cmd = mpirun_command(2, [str(out), "5" if quick else "30"], module="benchmarks.allreduce")
        env = {**os.environ, "OMPI_MCA_btl_vader_single_copy_mechanism": "none"}
        subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parent.parent)
        return json.loads(out.read_text())


BENCHMARKS = {"allreduce": bench_allreduce}


def table(rows: list[dict]) -> str:
    head = f"{'benchmark':<12} {'case':<22} {'value':>10} {'baseline':>10} {'unit':<6} {'ratio':>7}  target"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['benchmark']:<12} {r['case']:<22} {r['value']:>10} {r['baseline']:>10} "
                     f"{r['unit']:<6} {r['ratio']:>7}  {r['target']}")
    return "\n".join(lines)


def main(quick: bool = False, out: str = "outputs/bench/results.json") -> int:
    rows = []
    for name, fn in BENCHMARKS.items():
        print(f"[bench] {name} ...", flush=True)
        rows += fn(quick)
    env = {"cores": os.cpu_count(), "machine": platform.machine(), "quick": quick,
           "versions": _versions()}
    print(table(rows))
    print(f"cores={env['cores']} " + " ".join(f"{k}={v}" for k, v in env["versions"].items()))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    print(f"[bench] written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv))
