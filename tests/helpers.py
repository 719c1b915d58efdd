"""Helpers shared by the test modules (importable as `helpers`: pytest puts tests/ on sys.path).

Kept out of conftest.py because several test folders have a conftest.py of their own, and only one
module can be imported under the name `conftest`.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests write offline runs only, never upload
os.environ.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")

# Small but real: 16x16 lattices, short burn-in; 640 samples in 10 generation tasks, 4 shards.
SMALL = ["data.params.lattice=16", "data.params.burn_in=40", "data.params.decorrelation=4",
         "data.n_samples=640", "data.chunk_size=64", "data.shard_size=128",
         "data.dask.n_workers=2", "data.dask.progress=false", "model.image_size=16"]


def small(tmp: Path, *extra: str) -> list[str]:
    return [f"output_dir={tmp}", *SMALL, *extra]


@contextlib.contextmanager
def ctrl_c_reaches_children() -> Iterator[None]:
    """Processes started inside take SIGINT as a terminal's foreground job does, however this
    pytest was started. A background job of a shell script (`make test > log &`, nohup) starts
    with SIGINT ignored; an ignored signal stays ignored across fork and exec, and Python then
    installs no KeyboardInterrupt: the Ctrl-C tests' SIGINT did nothing, the prepare ran to its
    end and exited 0 with nothing on stderr (measured). Here this process catches SIGINT while
    it starts them, and a caught signal is reset to the default in a child, where Python makes
    it KeyboardInterrupt."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def hpcforge(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "hpcforge", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def files_holding(root: Path, secrets: list[str]) -> list[str]:
    """'path: secret' for every file under `root` that holds one of `secrets`: in its bytes, in a
    member of a zip (a torch checkpoint is one) or in a checkpoint's unpickled config."""
    import json
    import zipfile
    hits = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        blobs = [path.read_bytes()]
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                blobs += [z.read(name) for name in z.namelist()]
        if path.suffix == ".pt":
            from pipeline.core.checkpoint import load
            blobs.append(json.dumps(load(path).get("config"), default=str).encode())
        hits += [f"{path.relative_to(root)}: {s}" for s in secrets
                 if any(s.encode() in b for b in blobs)]
    return hits


LOOPBACK_ADDRS = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def listening(pids) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes `pids` hold (the tests
    run as root, so psutil sees every process's sockets)."""
    import psutil
    pids = set(pids)
    return sorted((c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
                  if c.status == psutil.CONN_LISTEN and c.pid in pids)


def network_address() -> tuple[str, str]:
    """A non-loopback interface of this machine and its IPv4 address (eth0 here)."""
    import socket

    import psutil
    import pytest
    up = {name for name, st in psutil.net_if_stats().items() if st.isup}
    for name, addrs in sorted(psutil.net_if_addrs().items(), key=lambda kv: kv[0] not in up):
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return name, a.address
    pytest.skip("this machine has no network interface with an IPv4 address")


def process_tree(pid: int) -> list[int]:
    """`pid` and every process under it."""
    import psutil
    try:
        me = psutil.Process(pid)
        return [pid, *(p.pid for p in me.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def wandb_cores() -> list:
    """The W&B services (wandb-core) this process started: wandb's service is its direct child."""
    import psutil
    return [p for p in psutil.Process().children() if p.name() == "wandb-core"]


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at `path` with mount `options` (the tests run as root); unmounted
    afterwards whatever happens (lazily: a killed child may still hold a file there)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def copy_checkout(dest: Path) -> Path:
    """The files git would ship (tracked, and untracked but not ignored) copied to `dest`: no
    build/ or other ignored local file can make an install from it look complete."""
    import shutil
    import subprocess
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest

