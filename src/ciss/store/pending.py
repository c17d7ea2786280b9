"""Pending records: multi-file changes of a step that the next command finishes.

A writer holding the store lock records what it is about to do in ``.pending/<id>.json``
before it touches a step, and removes the record when done. A kill in between leaves the
record; the next command that takes the lock (``Store.lock``), or ``ciss store verify
--repair``, finishes it by the rule of its kind, judged against the card (the only thing
readers trust):

- ``remove`` (``Store.remove_artifacts``: memory clear, prune): files the card no longer
  names are deleted; a file the card still names was never given up and stays.
- ``add`` (``Store.add_artifact``): a new artifact that reached its place before the card
  named it is deleted (the command is simply run again); a *replaced* one is rolled forward:
  the file is complete and matches the record's sum, so the card records that sum.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shutil
import uuid
from pathlib import Path

import ciss.store.events as events
import ciss.store.integrity as integrity
from ciss.errors import CissError
from ciss.failpoints import failpoint
from ciss.store.files import atomic_write_text, digest
from ciss.store.integrity import CARD

PENDING = ".pending"


def record(store, entry: dict) -> Path:
    """Write a pending record (callers hold the lock); returns its path."""
    path = store.root / PENDING / f"{uuid.uuid4().hex[:12]}.json"
    path.parent.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(path, json.dumps({**entry, "at": stamp}) + "\n")
    return path


def records(store) -> list[tuple[Path, dict]]:
    """Every pending record, oldest name first (an unreadable one as ``{}``)."""
    folder = store.root / PENDING
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            out.append((p, json.loads(p.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            out.append((p, {}))
    return out


def _delete(step_dir: Path, target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    else:
        target.unlink(missing_ok=True)
        if target.parent != step_dir and target.parent.is_dir() and not any(
                target.parent.iterdir()):
            target.parent.rmdir()  # engines/ once its last plan is gone


def finish(store, path: Path, entry: dict) -> None:
    """Finish one record by its kind's rule (module docstring); callers hold the lock."""
    step = entry.get("step")
    folder = store.step_dir(step) if isinstance(step, int) else None
    if folder is not None and (folder / CARD).exists():
        card = store.card(step, verify=False)
        for name in entry.get("remove", []):
            target = folder / name
            if name not in card.artifacts and target.exists():
                _delete(folder, target)
        name = entry.get("add")
        if name:
            target = folder / name
            if target.exists() and card.artifacts.get(name) != entry.get("sha256"):
                if entry.get("replaces") and digest(target) == entry.get("sha256"):
                    card.artifacts[name] = entry["sha256"]
                    store.write_card(step, card)
                elif not entry.get("replaces"):
                    _delete(folder, target)
    failpoint("store.pending.files_removed", path)
    path.unlink(missing_ok=True)


def finish_all(store) -> list[dict]:
    """Finish every pending record, interrupted card rewrites (``integrity.finish_pending``)
    and a pointer without its event (``events.recover_pointer_event``); callers hold the
    lock. Returns the records finished."""
    done = []
    for path, entry in records(store):
        finish(store, path, entry)
        done.append(entry)
    for s in store.steps():
        with contextlib.suppress(CissError, OSError):
            integrity.finish_pending(store.step_dir(s))
    events.recover_pointer_event(store)
    return done
