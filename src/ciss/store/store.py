"""A folder of numbered steps, written atomically, verified on every load.

Layout (docs/store.md)::

    <root>/steps/0000/ weights.safetensors card.json manifest.json retention/ model.onnx ...
    <root>/deployed.json  events.json  .lock  .leases/  .pending/  .staging/  .work/

A step is assembled in ``.staging`` and renamed into ``steps/`` in one ``os.rename``
(``write_step``, the one commit of a new step); a crash leaves at worst an orphan in
``.staging`` that readers never look at. Writers hold ``.lock``; long jobs hold a lease
(``store.lease``) so that others tell a live writer from a dead one. The card's own sha256
lives in ``manifest.json`` (``store.integrity``), and every card read checks it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import ciss.store.events as ev
import ciss.store.integrity as integrity
import ciss.store.lease as leases
import ciss.store.pending as pend
from ciss.errors import CissError
from ciss.failpoints import failpoint
from ciss.store.card import StepCard
from ciss.store.files import (  # noqa: F401 - re-exported: other modules import them here
    atomic_write_text,
    digest,
    disk_bytes,
    fsync_tree,
    raise_if_no_space,
    sha256_file,
    sha256_tree,
    writing,
)
from ciss.store.integrity import CARD, MANIFEST

WEIGHTS = "weights.safetensors"
RETENTION = "retention"
DEPLOYED = "deployed.json"
EVENTS = ev.EVENTS
EVENTS_KEPT = ev.EVENTS_KEPT
STAGING = ".staging"

def default_store_path() -> Path:
    """``$CISS_STORE`` or ``./ciss-store``."""
    return Path(os.environ.get("CISS_STORE", "ciss-store"))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class Store:
    """The model store at ``root`` (created on first write)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise CissError(f"{self.root}: the store path is a file, not a folder")

    # -- paths and listing -------------------------------------------------------------------
    @property
    def steps_dir(self) -> Path:
        return self.root / "steps"

    @property
    def work_dir(self) -> Path:
        return self.root / ".work"

    def step_dir(self, step: int) -> Path:
        return self.steps_dir / f"{step:04d}"

    def steps(self) -> list[int]:
        if not self.steps_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.steps_dir.iterdir()
                      if p.is_dir() and p.name.isdigit() and (p / CARD).exists())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def resolve(self, step: int | None) -> int:
        """``step`` if it exists, the latest step when None; a clear error otherwise."""
        steps = self.steps()
        if not steps:
            raise CissError(f"{self.root}: the store has no steps yet; run 'ciss train' first")
        if step is None:
            return steps[-1]
        if step < 0:
            step = steps[step] if -step <= len(steps) else -1
        if step not in steps:
            raise CissError(f"step {step} is not in {self.root} (steps: "
                            f"{', '.join(map(str, steps))})")
        return step

    # -- locking and leases ------------------------------------------------------------------
    def lock(self, timeout: float = 600.0) -> contextlib.AbstractContextManager[None]:
        """Exclusive writer lock (``fcntl.flock`` on ``<root>/.lock``), re-entrant within a
        thread. The outermost acquisition first finishes what killed writers left pending
        (``finish_pending``), so every command starts from a store with no half-done
        change."""
        return leases.store_lock(self.root, self.finish_pending, timeout)

    @contextlib.contextmanager
    def lease(self, path: Path | None = None, steps: list[int] | tuple = ()
              ) -> Iterator[leases.Lease]:
        """Hold a live-writer lease on the folder ``path`` (a job's work folder) and the
        ``steps`` it needs (its parent), for the ``with`` block (``store.lease``).

        Raises:
            CissError: another live process holds a lease on ``path``.
        """
        with leases.held(self.root, Path(path) if path is not None else None,
                         [s for s in steps if s is not None]) as held:
            yield held

    def leases(self) -> list[leases.LeaseInfo]:
        return leases.leases(self.root)

    def leased_steps(self) -> dict[int, str]:
        """Step -> who needs it, for every step a live lease names."""
        out: dict[int, str] = {}
        for info in self.leases():
            if info.live:
                for s in info.steps:
                    out.setdefault(s, f"needed by a running job ({info.describe()})")
        return out

    def staging_folder(self, prefix: str, needed: int | None = None) -> Path:
        """A fresh folder in ``.staging`` leased for this process's lifetime (an export's
        scratch space); ``drop_staging`` removes it and its lease. ``needed``: about how
        many bytes will be written there (what a full disk's message says)."""
        path = self.root / STAGING / f"{prefix}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        leases.hold_for_process(self.root, path)
        writing(path, needed)
        return path

    def drop_staging(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        leases.drop_process_lease(path)
        if sys.exc_info()[0] is None:  # an error on its way up may still need the place
            writing(None)

    # -- reading -----------------------------------------------------------------------------
    def card(self, step: int, *, verify: bool = True) -> StepCard:
        """The step's card, checked against its manifest (``verify=False``: for listings and
        ``store verify`` only, which report an edited card rather than refuse it).

        Raises:
            CissError: an unknown step, an unreadable card, or one edited outside ciss.
        """
        path = self.step_dir(self.resolve(step)) / CARD
        if verify:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise CissError(f"{path}: unreadable step card ({exc})") from exc
            integrity.check_card(path.parent, data)
        return StepCard.from_file(path)

    def card_state(self, step: int) -> integrity.CardState:
        return integrity.card_state(self.step_dir(step))

    def require_signed(self, step: int) -> None:
        """With ``CISS_STORE_KEY`` set, refuse a step whose card is not signed with it (the
        server calls this before it loads a step); without the key, nothing to check."""
        if integrity.store_key() is not None:
            folder = self.step_dir(self.resolve(step))
            integrity.check_card(folder, (folder / CARD).read_bytes(), require_signed=True)

    def verify(self, step: int, names: list[str] | None = None) -> StepCard:
        """Check the card, then the sha256 of the step's artifacts (all, or ``names``).

        Raises:
            CissError: naming the file that is missing or does not match.
        """
        card = self.card(step)
        folder = self.step_dir(step)
        for name in names if names is not None else list(card.artifacts):
            expected = card.artifacts.get(name)
            path = folder / name
            if expected is None:
                raise CissError(card.pruned_message(name, path)
                                or f"{path}: not recorded in {folder / CARD}")
            if not path.exists():
                raise CissError(f"{path}: missing (recorded in the step card)")
            if digest(path) != expected:
                raise CissError(f"{path}: checksum mismatch: the file was modified or corrupted "
                                "after it was written; refusing to load it")
        return card

    def load_model(self, step: int | None = None, device: str = "cpu"):
        """The step's model (eval mode) and card, after verifying the weights' checksum."""
        from safetensors.torch import load_file

        from ciss.models import build_model

        step = self.resolve(step)
        card = self.verify(step, [WEIGHTS])
        model = build_model(card.arch, num_classes=len(card.classes),
                            config=card.model_config or None)
        path = self.step_dir(step) / WEIGHTS
        try:
            state = load_file(str(path), device=device)
            model.load_state_dict(state, strict=True)
        except Exception as exc:  # noqa: BLE001 - any decode error is a corrupt file to the user
            raise CissError(f"{path}: cannot load weights ({exc})") from exc
        return model.to(device).eval(), card

    def step_for_work(self, name: str) -> int | None:
        """The step a job with work folder ``name`` already committed, or None: the card
        names the folder (``write_step``'s ``work``) or the job's request key (the folder is
        ``<prefix>-<request>``, ``updater.job``). A rerun after a kill just past the commit
        finds its step here, and ``store verify --repair`` knows the folder is spent."""
        request = name.split("-", 1)[1] if "-" in name else None
        for s in reversed(self.steps()):
            card = self.card(s, verify=False)
            if card.extra.get("work") == name or (
                    request and (card.config or {}).get("request") == request):
                return s
        return None

    # -- writing -----------------------------------------------------------------------------
    def write_step(self, card: StepCard, model,
                   extra_writers: dict[str, Callable[[Path], None]] | None = None, *,
                   work: Path | leases.Lease | None = None) -> int:
        """Write a new step atomically and return its number: the one commit of a step.

        The step number is allocated under the lock; ``card.step`` is overwritten with it.
        ``extra_writers`` maps an artifact name to a function that writes it at a given path.
        ``work``: the job's work folder (or its lease). Its name goes on the card
        (``extra.work``) in the same rename as the step, and the folder is removed after it.

        Recovery rule: everything is written in ``.staging/NNNN-<hex>`` and fsynced, then
        one ``os.rename`` publishes it. Killed before the rename: the staging folder is a
        leftover (removed by the next ``write_step`` or ``store verify --repair``: only a
        writer holding the lock stages here, so any other is dead). Killed after it: the
        step is complete, and its work folder is spent (the card names it; a rerun finds
        the step with ``step_for_work`` and ``store verify --repair`` removes the folder).
        """
        from safetensors.torch import save_file

        work_path = work.path if isinstance(work, leases.Lease) else work
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        with self.lock():
            self._clean_staging()
            step = (self.latest() + 1) if self.steps() else 0
            staging = self.root / STAGING / f"{step:04d}-{uuid.uuid4().hex[:8]}"
            staging.mkdir(parents=True)
            try:
                save_file(state, str(staging / WEIGHTS),
                          metadata={"arch": card.arch, "num_classes": str(len(card.classes))})
                for name, writer in (extra_writers or {}).items():
                    writer(staging / name)
                card.step = step
                if "new" in card.retention:  # scores of the retention set this step brings
                    card.retention[str(step)] = card.retention.pop("new")
                card.created = _now()
                if work_path is not None:
                    card.extra["work"] = Path(work_path).name
                card.artifacts = {p.name: digest(p) for p in sorted(staging.iterdir())}
                text = card.to_json()
                (staging / CARD).write_text(text, encoding="utf-8")
                (staging / MANIFEST).write_text(integrity.manifest_text(text.encode()))
                fsync_tree(staging)
                failpoint("store.step.staged", staging)
                self.steps_dir.mkdir(parents=True, exist_ok=True)
                os.rename(staging, self.step_dir(step))
            except BaseException as exc:
                needed = disk_bytes(staging) + sum(v.numel() * v.element_size()
                                                   for v in state.values())
                shutil.rmtree(staging, ignore_errors=True)
                raise_if_no_space(exc, staging, needed)
                raise
            failpoint("store.step.committed", self.step_dir(step))
            if work_path is not None:
                shutil.rmtree(work_path, ignore_errors=True)  # the step landed: work is spent
        return step

    def write_card(self, step: int, card: StepCard) -> None:
        """Replace a step's card and its manifest as a pair (``integrity.write_card_pair``);
        the one way a card changes after its commit."""
        with self.lock():
            integrity.write_card_pair(self.step_dir(step), card.to_json())

    def add_artifact(self, step: int, name: str, writer: Callable[[Path], None],
                     card_update: Callable[[StepCard], None] | None = None) -> Path:
        """Add (or replace) one artifact of an existing step, then record it in the card.

        Recovery rule: the file is written under ``.<name>.<hex>.tmp`` (a kill leaves a
        leftover ``store verify --repair`` deletes), a pending ``add`` record names its sum,
        it is renamed into place, and card and manifest are rewritten as a pair. A kill
        after the rename leaves the record, finished by the next command (``store.pending``:
        a new file is deleted, a replacement is rolled forward into the card).
        """
        with self.lock():
            folder = self.step_dir(self.resolve(step))
            card = self.card(step)
            final = folder / name
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                writer(tmp)
                if tmp.is_dir():
                    fsync_tree(tmp)
                sha = digest(tmp)
                failpoint("store.artifact.written", tmp)
                record = pend.record(self, {"step": card.step, "add": name, "sha256": sha,
                                               "replaces": name in card.artifacts})
                if tmp.is_dir() and final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException as exc:
                needed = disk_bytes(tmp)
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
                raise_if_no_space(exc, final, needed)
                raise
            try:
                failpoint("store.artifact.renamed", final)
                card.artifacts[name] = sha
                if card_update is not None:
                    card_update(card)
                self.write_card(step, card)
            except BaseException:  # a full disk: the record's rule, now (best effort)
                with contextlib.suppress(Exception):
                    pend.finish(self, record, json.loads(record.read_text()))
                raise
            record.unlink()
        return final

    def update_card(self, step: int, update: Callable[[StepCard], None]) -> StepCard:
        """Apply ``update`` to a step's (verified) card and rewrite card and manifest."""
        with self.lock():
            card = self.card(step)
            update(card)
            self.write_card(card.step, card)
        return card

    def remove_artifacts(self, step: int, names: list[str],
                         update: Callable[[StepCard, dict[str, str]], None] | None = None,
                         why: str = "") -> StepCard:
        """Delete artifacts of a step: the card forgets them, then the files go.
        ``update(card, removed)`` may record more on the card (removed: name -> sha256).

        Recovery rule (``store.pending``): a ``remove`` record names the files first; the
        card forgets them; the files are deleted; the record goes. A kill anywhere leaves a
        record that the next command to take the lock finishes: files the card no longer
        names are deleted; if the card still names them (killed before it forgot) the
        record is dropped and nothing is lost.
        """
        with self.lock():
            card = self.card(step)
            record = pend.record(self, {"step": card.step, "remove": list(names),
                                           "why": why})
            entry = {"step": card.step, "remove": list(names)}
            try:
                failpoint("store.pending.recorded", record)
                removed = {n: card.artifacts.pop(n) for n in names if n in card.artifacts}
                if update is not None:
                    update(card, removed)
                self.write_card(card.step, card)
                failpoint("store.pending.card_done", record)
            except BaseException:  # a full disk: the record's rule, now (best effort)
                with contextlib.suppress(Exception):
                    pend.finish(self, record, entry)
                raise
            pend.finish(self, record, entry)
        return card

    def pending(self) -> list[tuple[Path, dict]]:
        return pend.records(self)

    def finish_pending(self) -> list[dict]:
        """Finish what killed writers left (callers hold the lock; ``pending.finish_all``)."""
        return pend.finish_all(self)

    def accept(self, step: int) -> integrity.CardState:
        """Record the step's card as it is now (``ciss store accept``; ``integrity.accept``)."""
        return integrity.accept(self, step)

    def _clean_staging(self) -> None:
        """Remove staging leftovers of dead writers (callers hold the lock). A step's
        staging is written under the lock, so any other is dead; an export stages under a
        lease, and its folder stays while the lease is live, whatever its age."""
        staging = self.root / STAGING
        if not staging.is_dir():
            return
        live = {str(i.path) for i in self.leases() if i.live and i.path is not None}
        for p in staging.iterdir():
            if os.path.abspath(p) not in live:
                shutil.rmtree(p, ignore_errors=True)

    # -- deploy pointer and events -----------------------------------------------------------
    def deployed(self) -> dict | None:
        path = self.root / DEPLOYED
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CissError(f"{path}: not valid JSON ({exc})") from exc

    def write_deployed(self, record: dict) -> None:
        """Replace ``deployed.json`` atomically (callers hold the lock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / DEPLOYED, json.dumps(record, indent=2) + "\n")

    def move_pointer(self, record: dict, kind: str, **fields) -> dict:
        """Write ``deployed.json`` and its event as one change (``events.move_pointer``)."""
        return ev.move_pointer(self, record, kind, **fields)

    def events(self) -> list[dict]:
        """The store's event log, oldest first (with a pointer's missing event recovered)."""
        return ev.read_events(self)

    def record_event(self, kind: str, **fields) -> None:
        """Append one event (``deployed``, ``refused``, ``forced``, ``rolled_back``,
        ``diagnosed``...) with a UTC timestamp (``events.record_event``)."""
        ev.record_event(self, kind, **fields)
