"""``ciss store verify [--repair]``: the store's ``git fsck``.

Walks every step (card against manifest, artifacts against card, files the card does not
name), the deploy pointer and its history, the event log, pending records, leases and the
leftovers of killed writers (``.staging``, ``.work``, ``.tmp``, ``.old``), and reports one
``Problem`` per finding with the bytes it holds.

``repair`` changes only what no transaction can still need, under the store lock: it
finishes pending records (``Store.finish_pending``), deletes staging and ``.tmp`` leftovers
(writers of those hold the lock or a lease, so under the lock any unleased one is dead),
dead leases, checkpoint swap leftovers (by ``files.recover_swap``'s rule) and the work
folders of jobs whose step was committed. A dead job's checkpoint stays (rerunning the
command resumes from it) unless ``discard_work``. An edited card, a missing or corrupt
artifact are reported, never "repaired": only a person can say which side is right.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ciss.store.integrity as integrity
from ciss.errors import CissError
from ciss.store.files import digest, disk_bytes, recover_swap, swap_target
from ciss.store.integrity import CARD, MANIFEST

JOB_PREFIXES = ("train-", "add-", "import-")  # work folders of the job runner
LEFTOVER_NOTE_BYTES = 50 * 2**20  # ``ciss prune`` and ``ciss steps`` mention more than this


def _size(n: int) -> str:
    if n < 2**10:
        return f"{n} bytes"
    return f"{n / 2**10:.0f} KB" if n < 2**20 else f"{n / 2**20:.1f} MB"


@dataclass
class Problem:
    """One finding. ``repair``: what ``--repair`` does about it ("" = nothing: a person must
    decide); ``leftover``: bytes a killed writer left (what ``prune``/``steps`` sum up)."""

    path: Path
    what: str
    bytes: int = 0
    repair: str = ""
    leftover: bool = False
    repaired: bool = False

    def line(self) -> str:
        size = f" ({_size(self.bytes)})" if self.bytes else ""
        fix = f"; --repair {self.repair}" if self.repair and not self.repaired else ""
        done = "; repaired" if self.repaired else ""
        return f"{self.path}: {self.what}{size}{fix}{done}"

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path)}


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    steps: int = 0
    known: list[dict] = field(default_factory=list)  # folders of other tools, summarised

    @property
    def left(self) -> list[Problem]:
        return [p for p in self.problems if not p.repaired]

    @property
    def leftover_bytes(self) -> int:
        return sum(p.bytes for p in self.left if p.leftover)

    def to_json(self) -> dict:
        return {"steps": self.steps, "ok": not self.left,
                "problems": [p.to_json() for p in self.problems], "known": self.known,
                "leftover_bytes": self.leftover_bytes}


def _unnamed(folder: Path, named: set[str]) -> list[Path]:
    """Files and folders of a step that its card does not name (one level into folders of
    artifacts such as ``engines/``)."""
    tops = {n.split("/")[0] for n in named}
    found = []
    for p in sorted(folder.iterdir()):
        if p.name not in tops:
            found.append(p)
        elif p.is_dir() and p.name not in named:
            found += [q for q in sorted(p.iterdir()) if f"{p.name}/{q.name}" not in named]
    return found


def _check_step(store, step: int, hashes: bool, out: list[Problem]) -> None:
    folder = store.step_dir(step)
    state = integrity.card_state(folder)
    if state.status == "pending":
        out.append(Problem(folder / MANIFEST, "a card rewrite was interrupted (the card is "
                           "one ciss wrote)", repair="records the card in the manifest"))
    elif state.status != "ok":
        out.append(Problem(folder / CARD, state.message.split(": ", 1)[1]))
        if not state.usable:
            return
    card = store.card(step, verify=False)
    for name, expected in card.artifacts.items():
        path = folder / name
        if not path.exists():
            out.append(Problem(path, "missing (recorded in the step card)"))
        elif hashes and digest(path) != expected:
            out.append(Problem(path, "checksum mismatch (modified or corrupted after it was "
                                     "written)", disk_bytes(path)))
    for p in _unnamed(folder, set(card.artifacts) | {CARD, MANIFEST}):
        what = ("temporary file of an interrupted write" if ".tmp" in p.name
                else "not named by the step card (left by an interrupted command)")
        out.append(Problem(p, what, disk_bytes(p), "deletes it", leftover=True))


def _check_pointer(store, out: list[Problem]) -> None:
    try:
        record = store.deployed()
    except CissError as exc:
        out.append(Problem(store.root / "deployed.json", str(exc).split(": ", 1)[1]))
        return
    if not record:
        return
    steps = set(store.steps())
    path = store.root / "deployed.json"
    if record.get("step") not in steps:
        out.append(Problem(path, f"names step {record.get('step')}, which is not in the "
                                 "store"))
    else:
        card = store.card(record["step"], verify=False)
        from ciss.store.store import WEIGHTS

        if WEIGHTS not in card.artifacts:
            out.append(Problem(path, f"names step {record['step']}, which was pruned"))
    for h in record.get("history", []):
        if h.get("step") not in steps:
            out.append(Problem(path, f"history names step {h.get('step')}, which is not in "
                                     "the store (ciss rollback would fail there)"))
    try:
        log = json.loads((store.root / "events.json").read_text())
    except FileNotFoundError:
        log = []
    except (OSError, ValueError) as exc:
        out.append(Problem(store.root / "events.json", f"unreadable event log ({exc})"))
        return
    from ciss.store.events import missing_pointer_event

    if missing_pointer_event(store, log):
        out.append(Problem(store.root / "events.json", f"misses the '{record['event']['kind']}'"
                           f" event of the deployed step {record.get('step')}",
                           repair="appends it from deployed.json"))


def _leftovers(store, discard_work: bool, out: list[Problem]) -> None:
    live = {os.path.abspath(i.path) for i in store.leases() if i.live and i.path}
    for info in store.leases():
        if not info.live:
            out.append(Problem(info.file, f"lease of a dead writer ({info.describe()})",
                               disk_bytes(info.file), "deletes it", leftover=True))
    for path, entry in store.pending():
        out.append(Problem(path, f"pending {entry.get('why') or 'change'} of step "
                                 f"{entry.get('step')} (a command was interrupted)",
                           repair="finishes it"))
    staging = store.root / ".staging"
    for p in sorted(staging.iterdir()) if staging.is_dir() else []:
        if os.path.abspath(p) not in live:
            out.append(Problem(p, "staging folder of a dead writer", disk_bytes(p),
                               "deletes it", leftover=True))
    tmps = [p for d in (store.root, store.root / ".pending", store.root / ".leases")
            if d.is_dir() for p in d.glob(".*.tmp")]
    for p in sorted(tmps):
        out.append(Problem(p, "temporary file of an interrupted write", disk_bytes(p),
                           "deletes it", leftover=True))
    work = store.work_dir
    for p in sorted(work.iterdir()) if work.is_dir() else []:
        if os.path.abspath(p) in live or not p.is_dir():
            continue
        if swap_target(p.name):
            out.append(Problem(p, "checkpoint swap leftover", disk_bytes(p),
                               "keeps the newest complete checkpoint, deletes the rest",
                               leftover=True))
        elif (p / "meta.json").exists() or p.name.startswith(JOB_PREFIXES):
            done = store.step_for_work(p.name)
            if done is not None:
                out.append(Problem(p, f"work folder of a job that finished (step {done})",
                                   disk_bytes(p), "deletes it", leftover=True))
            else:
                out.append(Problem(p, "checkpoint of an interrupted job (run the same "
                                      "command again to resume)", disk_bytes(p),
                                   "deletes it" if discard_work else "", leftover=True))


def verify_store(store, *, hashes: bool = True, repair: bool = False,
                 discard_work: bool = False) -> Report:
    """Walk the store (module docstring); with ``repair``, fix what is safe to fix. The
    report lists what was found before repairing, each marked repaired or not."""
    report = _walk(store, hashes, discard_work)
    if not repair or not report.problems:
        return report
    with store.lock():  # the outermost lock finishes pending records on entry
        for p in _walk(store, False, discard_work).problems:
            if p.repair:
                _fix(store, p)
    left = {(str(p.path), p.what) for p in _walk(store, False, discard_work).problems}
    for p in report.problems:
        p.repaired = bool(p.repair) and (str(p.path), p.what) not in left
    return report


def _known_folders(store) -> list[dict]:
    """Folders in the store's root that ciss wrote for something other than steps: a
    ``ciss serve --collect`` collection (``collection.json``) is summarised, not checked
    (it is not part of any step, and its server may be writing it now)."""
    from ciss.data.collection import MARKER, folder_bytes, is_collection, items

    found = []
    for p in sorted(store.root.iterdir()) if store.root.is_dir() else []:
        if p.is_dir() and (p / MARKER).is_file() and is_collection(p):
            found.append({"path": str(p), "kind": "collection", "items": len(items(p)),
                          "bytes": folder_bytes(p)})
    return found


def _walk(store, hashes: bool, discard_work: bool) -> Report:
    report = Report(steps=len(store.steps()), known=_known_folders(store))
    for s in store.steps():
        _check_step(store, s, hashes, report.problems)
    _check_pointer(store, report.problems)
    _leftovers(store, discard_work, report.problems)
    return report


def _fix(store, p: Problem) -> bool:
    if p.repair == "deletes it":
        if p.path.is_dir():
            shutil.rmtree(p.path, ignore_errors=True)
        else:
            p.path.unlink(missing_ok=True)
        return True
    if p.repair.startswith("keeps the newest"):
        recover_swap(p.path.parent / swap_target(p.path.name))
        return True
    return False


def leftover_note(store) -> str | None:
    """One line when leftovers of killed writers hold more than 50 MB (no hashing)."""
    try:
        found = _walk(store, hashes=False, discard_work=False)
    except (CissError, OSError):
        return None
    if found.leftover_bytes <= LEFTOVER_NOTE_BYTES:
        return None
    return (f"note: {found.leftover_bytes / 2**20:.0f} MB in leftovers of interrupted "
            f"commands; see 'ciss store verify --store {store.root}' (--repair removes them)")
