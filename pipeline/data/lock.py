"""One `prepare` per store: an exclusive lock file `<data.path>.lock` next to the store.

Two prepares of one path would share `.partial` and `.scratch`: the second would "resume" the live
one, or wipe it, and mix the chunks of two configs. The lock is taken atomically (O_CREAT|O_EXCL,
which local disks, NFSv3+ and Lustre honour) and names its holder (host, pid, the process's start
time, since when), so a second prepare refuses with one line that names it. A holder that is gone
(same host and its pid not running, or running but started at another time: the pid was reused)
left a stale lock, which is taken over with a message; a lock from another host cannot be checked
from here and is reported with the command that clears it. Released on every exit that runs
Python's `finally` (errors, Ctrl-C); after a SIGKILL the next prepare takes the stale lock over.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import UserError

ATTEMPTS = 50          # tries to create the lock while a stale one is being taken over
RETRY_S = 0.1          # pause between tries
WRITING_S = 10.0       # an empty lock file younger than this is being written by its holder


def _started(pid: int) -> str | None:
    """The kernel's start time of process `pid` (field 22 of /proc/PID/stat), None if none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]   # fields after "(comm)" start at field 3


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _started(pid),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": os.urandom(8).hex()}


def _read(lock: Path) -> dict | None:
    """The holder recorded in `lock`; {} while it is being written (or unreadable); None if gone."""
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(lock: Path, holder: dict) -> bool | None:
    """Whether the holder still runs: True, False, or None (another host: cannot tell)."""
    if not holder:   # created but not written yet, or left empty by a crash right after create
        return time.time() - lock.stat().st_mtime < WRITING_S
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass         # running, as another user
    return holder.get("started") in (None, _started(pid))


def _create(lock: Path, me: dict) -> bool:
    """Create `lock` holding `me`, atomically; False if it exists."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
    except OSError as e:         # a full disk: leave no empty lock behind, and name it
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(lock)) from e
    os.close(fd)
    return True


def _break(lock: Path, stale: dict) -> bool:
    """Remove a stale lock, unless another prepare replaced it meanwhile: under a second
    O_EXCL file, so that of several prepares finding the same stale lock only one removes it."""
    breaker = lock.with_name(lock.name + ".break")
    try:
        fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if time.time() - breaker.stat().st_mtime > WRITING_S:   # its owner died within this
            breaker.unlink(missing_ok=True)
        return False
    try:
        if _read(lock) == stale:
            lock.unlink(missing_ok=True)
            return True
        return False
    finally:
        os.close(fd)
        breaker.unlink(missing_ok=True)


def _who(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since "
            f"{holder.get('since', '?')}")


def _refuse(lock: Path, store: Path, holder: dict, alive: bool | None) -> UserError:
    if alive:
        return UserError(f"data.path {store} is being prepared by {_who(holder)} (lock {lock}); "
                         f"wait for it to finish or stop it, or choose another data.path")
    return UserError(f"data.path {store} is locked by {_who(holder)}, which this host cannot "
                     f"check; if that prepare is no longer running, remove the lock (rm {lock}) "
                     f"and run again")


def acquire(lock: Path, store: Path, log) -> dict:
    """Take the lock for `store` (taking over a stale one); UserError if someone holds it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = _me()
    for _ in range(ATTEMPTS):
        if _create(lock, me):
            return me
        holder = _read(lock)
        if holder is None:
            continue                       # released just now: try again
        alive = _alive(lock, holder)
        if alive or alive is None:
            if alive and not holder:       # being written: look again in a moment
                time.sleep(RETRY_S)
                continue
            raise _refuse(lock, store, holder, alive)
        if _break(lock, holder):
            log(f"taking over {lock} from {_who(holder)}, which is no longer running")
        time.sleep(RETRY_S)
    raise UserError(f"could not take the lock {lock} after {ATTEMPTS} tries (other prepares keep "
                    f"taking it over); make sure no other prepare of {store} runs, remove "
                    f"{lock} and run again")


def check_free(store: Path) -> None:
    """For readers (`hpcforge train`): UserError naming the holder while a prepare that still
    runs (or one on another host, which cannot be checked) holds `store`'s lock; a stale lock
    is no reason to wait (issue 25: during a prepare, train said ".partial" or "damaged")."""
    store = Path(store)
    lock = store.with_name(store.name + ".lock")
    holder = _read(lock)
    if holder is None:
        return
    alive = _alive(lock, holder)
    if alive is not False:
        raise _refuse(lock, store, holder, alive)


def release(lock: Path, me: dict) -> None:
    """Remove the lock if it is still ours (a stale-lock takeover may have replaced it)."""
    holder = _read(lock)
    if holder and holder.get("token") == me["token"]:
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def store_lock(lock: Path, store: Path, log) -> Iterator[None]:
    """Hold the lock of `store` for the body; released on every exit path (Ctrl-C included)."""
    me = acquire(lock, store, log)
    try:
        yield
    finally:
        release(lock, me)
