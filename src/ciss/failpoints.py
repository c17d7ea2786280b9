"""Named failpoints in the write paths (the technique etcd and TiKV use).

A failpoint is a named place in code that writes to the store, a checkpoint or a deployment
pointer. ``CISS_FAILPOINT=name:action[,name:action...]`` makes the process fail there, so a
test can kill a command at exactly that write and then run what a user would run next.
Actions: ``kill`` (SIGKILL: no clean-up, no ``finally``), ``error`` (an ``OSError`` EIO) and
``enospc`` (an ``OSError`` "No space left on device"). ``action@N`` fails at the N-th time the
point is reached (1-based), so a loop's later writes can be hit too. With the variable unset a
failpoint costs one truth test of an empty dict.

Every name is declared once in ``POINTS`` (name -> the write it precedes), so tests list them
and a typo at a call site fails loudly instead of never firing.

This module imports nothing from ciss: every layer may call it.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "CISS_FAILPOINT"
TRACE_ENV = "CISS_FAILPOINT_TRACE"  # a file: every failpoint reached is appended to it
ACTIONS = ("kill", "error", "enospc")

# name -> what happens right after it (the write a kill there interrupts)
POINTS: dict[str, str] = {
    # store/store.py: write_step, the one commit of a new step
    "store.step.staged": "the new step is complete in .staging; next: its rename into steps/",
    "store.step.committed": "the step is in steps/; next: its work folder is removed",
    # store/store.py: card rewrites after the commit (add_artifact, update_card, prune)
    "store.artifact.written": "an artifact is written under a temporary name; next: rename",
    "store.artifact.renamed": "an artifact is in place; next: the card records it",
    "store.card.intent": "manifest names the card's next hash; next: the card is replaced",
    "store.card.replaced": "the card is replaced; next: the manifest forgets the old hash",
    # store/store.py: small files
    "store.atomic.tmp_written": "a temporary file is complete; next: os.replace onto the target",
    "store.pointer.written": "deployed.json is replaced; next: its event is appended",
    "store.pending.recorded": "a pending removal is recorded; next: the card forgets",
    "store.pending.card_done": "the card forgot the files; next: the files are deleted",
    "store.pending.files_removed": "the files are gone; next: the pending record is removed",
    # store/prune.py
    "prune.history_dropped": "deployed.json's history forgot pruned steps; next: their cards",
    # updater/checkpoint.py
    "checkpoint.tmp_written": "the new checkpoint is complete beside the old; next: swap",
    "checkpoint.old_aside": "the old checkpoint is renamed .old; next: the new one goes in",
    "checkpoint.before_old_removed": "the new checkpoint is in place; next: .old is deleted",
    # updater/memory.py (through the store's pending record)
    "memory.clear.pending": "the clear is recorded as pending; next: the card forgets it",
    # runtime/deploy.py
    "deploy.gated": "the gate passed, outside the lock; next: the lock and the re-check",
    "deploy.rechecked": "the step's files were re-checked under the lock; next: the pointer",
    "rollback.verified": "the rollback target was verified; next: the pointer moves back",
    # runtime/collect.py: ciss serve --collect (off the request path; never fails a request)
    "collect.item.staging": "an item's .tmp- folder exists; next: its files are written",
    "collect.item.staged": "an item is complete in its .tmp- folder; next: rename into items/",
}


def parse(spec: str) -> dict[str, tuple[str, int]]:
    """``"a:kill,b:enospc@2"`` -> ``{"a": ("kill", 1), "b": ("enospc", 2)}``.

    Raises:
        ValueError: an entry without ``:``, an unknown action or name, or a bad count.
    """
    active: dict[str, tuple[str, int]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        name, sep, action = entry.partition(":")
        action, at, count = action.partition("@")
        if not sep or action not in ACTIONS or (at and not count.isdigit()):
            raise ValueError(f"{ENV}={spec!r}: expected name:{'|'.join(ACTIONS)}[@N]")
        if name not in POINTS:
            raise ValueError(f"{ENV}={spec!r}: unknown failpoint {name!r} "
                             f"(see ciss.failpoints.POINTS)")
        active[name] = (action, int(count) if at else 1)
    return active


_active: dict[str, tuple[str, int]] = parse(os.environ.get(ENV, ""))
_trace: str = os.environ.get(TRACE_ENV, "")
_hits: dict[str, int] = {}


def configure(spec: str) -> None:
    """Replace the active failpoints and reset their counts (tests running in-process)."""
    global _active
    _active = parse(spec)
    _hits.clear()


def failpoint(name: str, path: os.PathLike | str | None = None) -> None:
    """Fail here if ``name`` is active; ``path`` names the file the error is about."""
    if not _active and not _trace:
        return
    if name not in POINTS:
        raise KeyError(f"failpoint {name!r} is not declared in ciss.failpoints.POINTS")
    if _trace:  # tests list the failpoints a command passes (tests/test_failpoints.py)
        with open(_trace, "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if name not in _active:
        return
    action, at = _active[name]
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != at:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "error":
        raise OSError(errno.EIO, f"failpoint {name}: injected I/O error", str(path or ""))
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path or ""))
