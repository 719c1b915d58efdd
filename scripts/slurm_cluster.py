"""A real Slurm cluster on this one machine, for the tests: two fake nodes (n1, n2), accounting.

    python scripts/slurm_cluster.py up [--dir D]    # start it, print `export SLURM_CONF=...`
    python scripts/slurm_cluster.py down [--dir D]  # stop exactly the daemons `up` started

Debian 12's munge, slurmctld, slurmd, slurm-client, slurmdbd and MariaDB (installed with apt if
missing), each daemon started by hand in the foreground (no systemd) with private sockets, ports,
state and logs under one directory, so it never touches a system Slurm or MariaDB. Each setting
has its reason next to it. Stopping kills only the pids this module started, never by name.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

APT_PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client", "slurmdbd", "mariadb-server"]
NODES = ("n1", "n2")
PARTITION = "debug"
CPUS_PER_NODE = 2
REAL_MEMORY_MB = 4000
DEFAULT_DIR = Path("/tmp/hpcforge-slurm")


def log(msg: str) -> None:
    print(f"[slurm-cluster] {msg}", flush=True)


# --------------------------------------------------------------------------- install
def missing_packages() -> list[str]:
    out = []
    for p in APT_PACKAGES:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True)
        if "install ok installed" not in r.stdout:
            out.append(p)
    return out


def install() -> None:
    """apt-get the Debian packages that are missing (root only; about 15 s)."""
    missing = missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"Slurm packages missing ({' '.join(missing)}) and not root: "
                           f"run `apt-get install -y --no-install-recommends {' '.join(missing)}`")
    log(f"apt: installing {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env, capture_output=True)


# --------------------------------------------------------------------------- config files
def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Layout:
    root: Path
    ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root).resolve()

    def p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def conf(self) -> Path:
        return self.p("etc", "slurm.conf")

    @property
    def munge_socket(self) -> Path:
        return self.p("munge", "munge.socket")

    @property
    def db_socket(self) -> Path:
        return self.p("mysql", "mysqld.sock")


def slurm_conf(lay: Layout, tmpfs: str | None = None) -> str:
    host = socket.gethostname()
    ports = lay.ports
    lines = [
        "ClusterName=hpcforge",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ports['slurmctld']}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={lay.munge_socket}",
        f"StateSaveLocation={lay.p('state', 'ctld')}",
        f"SlurmdSpoolDir={lay.p('state', 'spool-%n')}",
        f"SlurmctldPidFile={lay.p('run', 'slurmctld.pid')}",
        f"SlurmdPidFile={lay.p('run', 'slurmd-%n.pid')}",
        f"SlurmctldLogFile={lay.p('log', 'slurmctld.log')}",
        f"SlurmdLogFile={lay.p('log', 'slurmd-%n.log')}",
        # No cgroups in a container without systemd: track processes by parent pid.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        # srun wires OpenMPI (Horovod) through PMIx; pmi2 did not wire up Debian's OpenMPI 4.1.
        "MpiDefault=pmix",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "KillWait=5",
        # Start jobs at once; cancel jobs whose dependency can never be met (afterok of a failure).
        "SchedulerParameters=batch_sched_delay=0,kill_invalid_depend",
        "MinJobAge=600",
        "JobRequeue=1",
        # Accounting: without it submitit sees state UNKNOWN and result() of a cancelled job hangs.
        "AccountingStorageType=accounting_storage/slurmdbd",
        "AccountingStorageHost=127.0.0.1",
        f"AccountingStoragePort={ports['slurmdbd']}",
        f"AccountingStoragePass={lay.munge_socket}",  # the munge socket for talking to slurmdbd
        "JobCompType=jobcomp/none",
        # Each node gets its own copy of this file, differing only in TmpFS (see below).
        "DebugFlags=NO_CONF_HASH",
        # The fake nodes share the host's cores; trust the node lines instead of the hardware.
        "SlurmdParameters=config_overrides",
    ]
    if tmpfs:
        # Two slurmds on one host would otherwise create the same PMIx directory under /tmp.
        lines.append(f"TmpFS={tmpfs}")
    for i, node in enumerate(NODES):
        lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 "
                     f"Port={ports[node]} CPUs={CPUS_PER_NODE} RealMemory={REAL_MEMORY_MB} State=UNKNOWN")
    lines.append(f"PartitionName={PARTITION} Nodes={','.join(NODES)} Default=YES "
                 f"MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def slurmdbd_conf(lay: Layout) -> str:
    return "\n".join([
        "AuthType=auth/munge",
        f"AuthInfo=socket={lay.munge_socket}",
        "DbdHost=localhost",
        "DbdAddr=127.0.0.1",
        f"DbdPort={lay.ports['slurmdbd']}",
        "SlurmUser=root",
        f"PidFile={lay.p('run', 'slurmdbd.pid')}",
        f"LogFile={lay.p('log', 'slurmdbd.log')}",
        "StorageType=accounting_storage/mysql",
        "StorageHost=127.0.0.1",
        f"StoragePort={lay.ports['mariadb']}",
        "StorageUser=slurm",
        "StoragePass=slurm",
        "StorageLoc=slurm_acct_db",
    ]) + "\n"


# --------------------------------------------------------------------------- daemons
class Cluster:
    """Start and stop the daemons; `env` is what clients (sbatch, submitit) need."""

    def __init__(self, root: Path = DEFAULT_DIR):
        self.lay = Layout(root)
        self.pids: dict[str, int] = {}

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.lay.conf)}

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        if user:
            cmd = ["runuser", "-u", user, "--", *cmd]
        out = open(self.lay.p("log", f"{name}.console"), "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=self._client_env(), start_new_session=True)
        self.pids[name] = proc.pid
        self._save_pids()

    def _save_pids(self) -> None:
        self.lay.p("run", "pids.json").write_text(json.dumps(self.pids))

    def _wait(self, what: str, check, timeout: float = 60) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if check():
                return
            for name, pid in self.pids.items():
                if not _alive(pid):
                    raise RuntimeError(f"{name} (pid {pid}) exited while waiting for {what}; see "
                                       f"{self.lay.p('log')}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}; see {self.lay.p('log')}")

    def _ok(self, *cmd: str) -> bool:
        return subprocess.run(cmd, capture_output=True, env=self._client_env()).returncode == 0

    def up(self) -> dict[str, str]:
        """Start everything (about 15 s); on any failure stop what was started, then raise."""
        try:
            return self._up()
        except BaseException:
            self.down()
            raise

    def _up(self) -> dict[str, str]:
        t0 = time.monotonic()
        install()
        lay = self.lay
        if lay.root.exists():
            shutil.rmtree(lay.root)
        for d in ("etc", "run", "log", "state/ctld", "mysql", "munge", "tmp"):
            lay.p(*d.split("/")).mkdir(parents=True, exist_ok=True)
        lay.root.chmod(0o755)  # munged (as user munge) must traverse it
        lay.ports = dict(zip(("slurmctld", "slurmdbd", "mariadb", *NODES), free_ports(3 + len(NODES))))
        self._start_munge()
        self._start_mariadb()
        self._write_configs()
        # slurmdbd has no -f: it reads slurmdbd.conf next to $SLURM_CONF.
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait("slurmdbd", lambda: _port_open(lay.ports["slurmdbd"]))
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(lay.conf)])
        self._wait("slurmctld", lambda: self._ok("scontrol", "ping"))
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f",
                                           str(lay.p("etc", f"slurm-{node}.conf"))])
        self._wait("nodes idle", self._nodes_idle)
        self._wait("cluster in accounting", lambda: b"hpcforge" in subprocess.run(
            ["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"], capture_output=True,
            env=self._client_env()).stdout)
        log(f"up in {time.monotonic() - t0:.1f} s: nodes {', '.join(NODES)}, partition "
            f"{PARTITION}; SLURM_CONF={lay.conf}")
        return self.env

    def _start_munge(self) -> None:
        lay = self.lay
        # munged wants its key private and its socket's directory searchable by every client.
        lay.p("munge-key").mkdir()
        key = lay.p("munge-key", "munge.key")
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for path, mode in ((lay.p("munge-key"), 0o700), (key, 0o400), (lay.p("munge"), 0o755)):
            shutil.chown(path, "munge", "munge")
            path.chmod(mode)
        self._spawn("munged", ["munged", "-F", f"--socket={lay.munge_socket}", f"--key-file={key}",
                               f"--pid-file={lay.p('munge', 'munged.pid')}",
                               f"--log-file={lay.p('munge', 'munged.log')}",
                               f"--seed-file={lay.p('munge', 'munged.seed')}"], user="munge")
        self._wait("munged", lambda: subprocess.run(
            f"munge -n -S {lay.munge_socket} | unmunge -S {lay.munge_socket}", shell=True,
            capture_output=True).returncode == 0)

    def _start_mariadb(self) -> None:
        lay = self.lay
        data = lay.p("mysql", "data")
        subprocess.run(["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={data}",
                        "--auth-root-authentication-method=socket", "--skip-test-db"],
                       check=True, capture_output=True)
        self._spawn("mariadb", [
            "mariadbd", "--no-defaults", "--user=root", f"--datadir={data}",
            f"--socket={lay.db_socket}", f"--port={lay.ports['mariadb']}",
            "--bind-address=127.0.0.1", f"--pid-file={lay.p('mysql', 'mariadbd.pid')}",
            f"--log-error={lay.p('log', 'mariadb.log')}",
            "--innodb-buffer-pool-size=128M", "--innodb-lock-wait-timeout=900",  # slurmdbd's advice
            "--innodb-flush-log-at-trx-commit=2"])  # test data: durability is not the point
        sql = ["mariadb", "--no-defaults", "-S", str(lay.db_socket), "-u", "root"]
        self._wait("mariadb", lambda: self._ok(*sql, "-e", "select 1"))
        subprocess.run([*sql, "-e",
                        "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
                        "CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
                        "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"],
                       check=True, capture_output=True)

    def _write_configs(self) -> None:
        lay = self.lay
        dbd = lay.p("etc", "slurmdbd.conf")
        dbd.write_text(slurmdbd_conf(lay))
        dbd.chmod(0o600)  # slurmdbd refuses a readable password file
        lay.conf.write_text(slurm_conf(lay))
        for node in NODES:
            tmpfs = lay.p("tmp", node)
            tmpfs.mkdir(exist_ok=True)
            tmpfs.chmod(0o1777)
            lay.p("etc", f"slurm-{node}.conf").write_text(slurm_conf(lay, str(tmpfs)))
        lay.p("etc", "ports.json").write_text(json.dumps(lay.ports))

    def _nodes_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                           env=self._client_env())
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in NODES)

    def down(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started, by pid."""
        pids_file = self.lay.p("run", "pids.json")
        if not self.pids and pids_file.exists():
            self.pids = json.loads(pids_file.read_text())
        if "slurmctld" in self.pids and _alive(self.pids["slurmctld"]):
            subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True,
                           env=self._client_env(), timeout=30)
            time.sleep(1)  # let the slurmstepds end the job steps
        for name in ("slurmd-n2", "slurmd-n1", "slurmctld", "slurmdbd", "mariadb", "munged"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                _stop(pid)
        pids_file.unlink(missing_ok=True)
        log("down")

    def running(self) -> bool:
        return self.lay.conf.exists() and self._ok("scontrol", "ping")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _stop(pid: int, grace: float = 15) -> None:
    """SIGTERM the process group we started (runuser forwards to munged), then SIGKILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    t0 = time.monotonic()
    while time.monotonic() - t0 < grace:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                return
        except ChildProcessError:  # not our child (started by another `up`): poll
            if not _alive(pid):
                return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args()
    c = Cluster(args.dir)
    if args.action == "up":
        env = c.up()
        print(f"export SLURM_CONF={env['SLURM_CONF']}")
    elif args.action == "down":
        c.down()
    else:
        print("running" if c.running() else "not running")


if __name__ == "__main__":
    main()
