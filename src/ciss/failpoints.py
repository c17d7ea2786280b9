"""Named failpoints in the write paths (the technique etcd and TiKV use).

A failpoint is a named place in code that writes to the store, a checkpoint or a deployment
pointer. ``CISS_FAILPOINT=name:action[,name:action...]`` makes the process fail there, so a
test can kill a command at exactly that write and then run what a user would run next.
Actions: ``kill`` (SIGKILL: no clean-up, no ``finally``), ``error`` (an ``OSError`` EIO) and
``enospc`` (an ``OSError`` "No space left on device"). With the variable unset a failpoint
costs one truth test of an empty dict.

This module imports nothing from ciss: every layer may call it.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "CISS_FAILPOINT"
ACTIONS = ("kill", "error", "enospc")


def parse(spec: str) -> dict[str, str]:
    """``"a:kill,b:enospc"`` -> ``{"a": "kill", "b": "enospc"}``.

    Raises:
        ValueError: an entry without ``:`` or an unknown action.
    """
    active: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, sep, action = entry.partition(":")
        if not sep or action not in ACTIONS:
            raise ValueError(f"{ENV}={spec!r}: expected name:{'|'.join(ACTIONS)}")
        active[name] = action
    return active


_active: dict[str, str] = parse(os.environ.get(ENV, ""))


def configure(spec: str) -> None:
    """Replace the active failpoints (tests running commands in-process)."""
    global _active
    _active = parse(spec)


def failpoint(name: str, path: os.PathLike | str | None = None) -> None:
    """Fail here if ``name`` is active; ``path`` names the file the error is about."""
    if not _active:
        return
    action = _active.get(name)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "error":
        raise OSError(errno.EIO, f"failpoint {name}: injected I/O error", path)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
