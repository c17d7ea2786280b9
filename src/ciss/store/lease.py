"""Leases: how a writer says "I am alive and I need this folder and these steps".

A lease is a file ``<root>/.leases/<name>.json`` that its writer keeps open with an exclusive
``flock`` for as long as it works. It records the folder (a job's ``.work/`` folder, an
export's staging), the steps the job needs (its parent: ``prune`` spares them), and pid, host,
start time and command line for the humans. A live writer holds the flock; a dead one (killed,
crashed, rebooted) cannot, whatever the age of its files: ``store verify``, ``prune`` and the
staging clean-up tell live from dead by trying the flock, not by the clock.

Recovery rule: a lease file whose flock is free belongs to a dead writer. Its folder is a
leftover (a ``.work`` checkpoint stays resumable by rerunning the command); the lease file
itself is removed by ``ciss store verify --repair`` or by the next lease of the same name.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ciss.errors import CissError

LEASES = ".leases"


@dataclass
class Lease:
    """A held lease (what ``Store.lease`` yields).

    Attributes:
        path: the folder it covers (None: a lease on steps only).
        steps: the store steps the holder needs kept whole.
        file: the lease file.
    """

    path: Path | None
    steps: list[int]
    file: Path
    fd: int = field(default=-1, repr=False)

    @property
    def name(self) -> str:
        return self.file.stem


@dataclass(frozen=True)
class LeaseInfo:
    """A lease file as another process sees it."""

    file: Path
    path: Path | None
    steps: list[int]
    pid: int | None
    host: str
    started: str
    argv: list[str]
    live: bool

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {self.started}"


def lease_name(root: Path, path: Path | None) -> str:
    """One lease file name per covered folder (its name plus a short hash of its place)."""
    if path is None:
        return f"steps-{os.getpid()}-{os.urandom(4).hex()}"
    where = os.path.abspath(path)
    return f"{Path(path).name.lstrip('.')}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def acquire(root: Path, path: Path | None, steps: list[int]) -> Lease:
    """Take the lease on ``path``.

    Raises:
        CissError: another live process holds a lease on the same folder.
    """
    folder = root / LEASES
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"{lease_name(root, path)}.json"
    while True:
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            info = _read(file)
            raise CissError(f"{path}: another ciss process (pid {info.get('pid')} on "
                            f"{info.get('host')}, since {info.get('started')}) is working "
                            "there; wait for it to finish or stop it")
        # the file may have been unlinked by its previous holder between open and flock
        try:
            same = os.fstat(fd).st_ino == os.stat(file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    record = {"path": None if path is None else os.path.abspath(path), "steps": list(steps),
              "pid": os.getpid(), "host": socket.gethostname(),
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "argv": sys.argv[:8]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return Lease(None if path is None else Path(path), list(steps), file, fd)


def release(lease: Lease) -> None:
    """Remove the lease file, then drop the flock (in that order: a waiter that opened the
    old file notices it was unlinked and retries)."""
    if lease.fd < 0:
        return
    with contextlib.suppress(FileNotFoundError):
        lease.file.unlink()
    os.close(lease.fd)
    lease.fd = -1


@contextlib.contextmanager
def held(root: Path, path: Path | None, steps: list[int]) -> Iterator[Lease]:
    lease = acquire(root, path, steps)
    try:
        yield lease
    finally:
        release(lease)


_process_leases: list[Lease] = []


def hold_for_process(root: Path, path: Path) -> Lease:
    """A lease released when the process exits (an export's staging folder)."""
    lease = acquire(root, path, [])
    if not _process_leases:
        atexit.register(lambda: [release(x) for x in _process_leases])
    _process_leases.append(lease)
    return lease


def drop_process_lease(path: Path) -> None:
    """Release the process-lifetime lease on ``path`` (its folder is gone)."""
    for lease in list(_process_leases):
        if lease.path is not None and os.path.abspath(lease.path) == os.path.abspath(path):
            release(lease)
            _process_leases.remove(lease)


def is_live(file: Path) -> bool:
    """Whether a live process holds the lease ``file`` (its flock is taken)."""
    try:
        fd = os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        for held_here in _process_leases:  # flock is per open file: ours would look free
            if held_here.file == file:
                return True
        if _try_lock(fd):
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        return True
    finally:
        os.close(fd)


def leases(root: Path) -> list[LeaseInfo]:
    """Every lease file of the store, live or dead."""
    folder = root / LEASES
    if not folder.is_dir():
        return []
    out = []
    for file in sorted(folder.glob("*.json")):
        info = _read(file)
        out.append(LeaseInfo(file, Path(info["path"]) if info.get("path") else None,
                             [int(s) for s in info.get("steps", [])], info.get("pid"),
                             info.get("host", "?"), info.get("started", "?"),
                             info.get("argv", []), is_live(file)))
    return out


_held = threading.local()  # root -> depth of this thread's store lock (re-entrant)


@contextlib.contextmanager
def store_lock(root: Path, on_acquire: Callable[[], object], timeout: float = 600.0
               ) -> Iterator[None]:
    """The store's writer lock (``Store.lock``): an flock on ``<root>/.lock``, re-entrant
    within a thread; ``on_acquire`` runs once the outermost acquisition holds it."""
    key = str(Path(root).resolve())
    depths = _held.__dict__.setdefault("depths", {})
    if depths.get(key):
        depths[key] += 1
        try:
            yield
        finally:
            depths[key] -= 1
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / ".lock", "a+") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as exc:
                if time.monotonic() > deadline:
                    raise CissError(f"{Path(root) / '.lock'}: another ciss process holds "
                                    "the store lock") from exc
                time.sleep(0.1)
        depths[key] = 1
        try:
            on_acquire()
            yield
        finally:
            depths[key] = 0
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
