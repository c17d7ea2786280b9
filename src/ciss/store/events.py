"""The store's event log (``events.json``) and the deploy pointer's event.

Recovery rule of a pointer move (``move_pointer``, under the lock): ``deployed.json`` is
written first, carrying the id of the event it implies (``event``: kind, id, fields); then the
event is appended. A kill between the two leaves a pointer whose event is missing: every
reader of the log sees it recovered from the pointer (``read_events``), and the next writer
under the lock, or ``ciss store verify --repair``, appends it for good
(``recover_pointer_event``). So the history and the rollback list never miss a deployment.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid

from ciss.errors import CissError
from ciss.failpoints import failpoint
from ciss.store.files import atomic_write_text

EVENTS = "events.json"  # gate results, refusals, forced deployments, rollbacks, diagnoses
EVENTS_KEPT = 1000


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _stored(store) -> list[dict]:
    path = store.root / EVENTS
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise CissError(f"{path}: unreadable event log ({exc})") from exc


def missing_pointer_event(store, log: list[dict]) -> dict | None:
    """The event ``deployed.json`` implies when the log lacks it, else None."""
    try:
        record = store.deployed() or {}
    except CissError:
        return None
    implied = record.get("event")
    if not implied or any(e.get("id") == implied.get("id") for e in log):
        return None
    if len(log) >= EVENTS_KEPT and log[0].get("at", "") > record.get("since", ""):
        return None  # trimmed out of a full log long ago, not lost
    return {**implied, "at": record.get("since", _now()), "recovered": True}


def read_events(store) -> list[dict]:
    """The log, oldest first, with a pointer's missing event recovered (not written)."""
    log = _stored(store)
    missing = missing_pointer_event(store, log)
    return log + [missing] if missing else log


def _append(store, event: dict) -> None:
    log = (_stored(store) + [event])[-EVENTS_KEPT:]
    store.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(store.root / EVENTS, json.dumps(log, indent=1) + "\n")


def recover_pointer_event(store) -> bool:
    """Append the pointer's missing event (callers hold the lock); whether one was."""
    if not (store.root / "deployed.json").exists():
        return False
    missing = missing_pointer_event(store, _stored(store))
    if missing is None:
        return False
    _append(store, missing)
    return True


def record_event(store, kind: str, **fields) -> None:
    """Append one event with a UTC timestamp. The log is rewritten atomically under the
    store lock and keeps the last EVENTS_KEPT events: the overview page reads it."""
    event = {"kind": kind, "at": _now(), **fields}
    with store.lock():
        _append(store, event)


def move_pointer(store, record: dict, kind: str, **fields) -> dict:
    """Write ``deployed.json`` = ``record`` and its ``kind`` event (module's recovery rule).
    Callers hold the lock. Returns the record as written."""
    event = {"kind": kind, "id": uuid.uuid4().hex[:12], **fields}
    record = {**record, "event": event}
    with store.lock():
        store.write_deployed(record)
        try:
            failpoint("store.pointer.written", store.root / "deployed.json")
            _append(store, {**event, "at": record.get("since", _now())})
        except OSError as exc:  # the pointer moved: the event is recovered from it later
            print(f"note: {store.root / EVENTS} could not be written ({exc}); the "
                  f"'{kind}' event is recovered from deployed.json", file=sys.stderr)
    return record
