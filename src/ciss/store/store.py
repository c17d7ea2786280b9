"""A folder of numbered steps, written atomically, verified on every load.

Layout::

    <root>/steps/0000/ weights.safetensors card.json retention/ model.onnx ...
    <root>/deployed.json   <root>/.lock   <root>/.staging/ (in-flight writes)   <root>/.work/

A step is assembled in ``.staging`` and renamed into ``steps/`` in one ``os.rename``; a crash
leaves at worst an orphan in ``.staging`` that readers never look at. Writers hold ``.lock``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ciss.errors import CissError
from ciss.store.card import StepCard

WEIGHTS = "weights.safetensors"
CARD = "card.json"
RETENTION = "retention"
DEPLOYED = "deployed.json"
EVENTS = "events.json"  # gate results, refusals, forced deployments, rollbacks, diagnoses
EVENTS_KEPT = 1000


def default_store_path() -> Path:
    """``$CISS_STORE`` or ``./ciss-store``."""
    return Path(os.environ.get("CISS_STORE", "ciss-store"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(folder: Path) -> str:
    """One digest over every file below ``folder`` (relative path and content)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def digest(path: Path) -> str:
    return sha256_tree(path) if path.is_dir() else sha256_file(path)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    # -- locking -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, timeout: float = 600.0) -> Iterator[None]:
        """Exclusive writer lock (``fcntl.flock`` on ``<root>/.lock``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+") as f:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError as exc:
                    if time.monotonic() > deadline:
                        raise CissError(f"{self.root / '.lock'}: another ciss process holds "
                                        "the store lock") from exc
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- reading -----------------------------------------------------------------------------
    def card(self, step: int) -> StepCard:
        path = self.step_dir(self.resolve(step)) / CARD
        return StepCard.from_file(path)

    def verify(self, step: int, names: list[str] | None = None) -> StepCard:
        """Check the sha256 of the step's artifacts (all, or ``names``) against its card.

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

    # -- writing -----------------------------------------------------------------------------
    def write_step(self, card: StepCard, model,
                   extra_writers: dict[str, Callable[[Path], None]] | None = None) -> int:
        """Write a new step atomically and return its number.

        The step number is allocated under the lock; ``card.step`` is overwritten with it.
        ``extra_writers`` maps an artifact name to a function that writes it at a given path.
        """
        from safetensors.torch import save_file

        with self.lock():
            self._clean_staging()
            step = (self.latest() + 1) if self.steps() else 0
            staging = self.root / ".staging" / f"{step:04d}-{uuid.uuid4().hex[:8]}"
            staging.mkdir(parents=True)
            try:
                state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
                save_file(state, str(staging / WEIGHTS),
                          metadata={"arch": card.arch, "num_classes": str(len(card.classes))})
                for name, writer in (extra_writers or {}).items():
                    writer(staging / name)
                card.step = step
                if "new" in card.retention:  # scores of the retention set this step brings
                    card.retention[str(step)] = card.retention.pop("new")
                card.created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                card.artifacts = {p.name: digest(p) for p in sorted(staging.iterdir())}
                (staging / CARD).write_text(card.to_json(), encoding="utf-8")
                _fsync_tree(staging)
                self.steps_dir.mkdir(parents=True, exist_ok=True)
                os.rename(staging, self.step_dir(step))
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        return step

    def add_artifact(self, step: int, name: str, writer: Callable[[Path], None],
                     card_update: Callable[[StepCard], None] | None = None) -> Path:
        """Add (or replace) one artifact of an existing step, then record it in the card.

        The file is written under a temporary name and renamed into place; the card is
        replaced atomically afterwards, so a crash leaves either the old or the new pair.
        """
        with self.lock():
            folder = self.step_dir(self.resolve(step))
            final = folder / name
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                writer(tmp)
                if tmp.is_dir():
                    _fsync_tree(tmp)
                    if final.exists():
                        shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
                raise
            card = StepCard.from_file(folder / CARD)
            card.artifacts[name] = digest(final)
            if card_update is not None:
                card_update(card)
            atomic_write_text(folder / CARD, card.to_json())
        return final

    def update_card(self, step: int, update: Callable[[StepCard], None]) -> StepCard:
        """Apply ``update`` to a step's card and replace the card atomically."""
        with self.lock():
            path = self.step_dir(self.resolve(step)) / CARD
            card = StepCard.from_file(path)
            update(card)
            atomic_write_text(path, card.to_json())
        return card

    def _clean_staging(self, max_age_s: float = 24 * 3600) -> None:
        """Remove staging leftovers of crashed writers. Only old ones: an export in another
        process stages without holding the lock, and its folder must survive."""
        staging = self.root / ".staging"
        if staging.is_dir():
            now = time.time()
            for p in staging.iterdir():
                if now - p.stat().st_mtime > max_age_s:
                    shutil.rmtree(p, ignore_errors=True)

    # -- deploy pointer ----------------------------------------------------------------------
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

    def events(self) -> list[dict]:
        """The store's event log, oldest first (see :meth:`record_event`)."""
        path = self.root / EVENTS
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise CissError(f"{path}: unreadable event log ({exc})") from exc

    def record_event(self, kind: str, **fields) -> None:
        """Append one event (``deployed``, ``refused``, ``forced``, ``rolled_back``,
        ``diagnosed``...) with a UTC timestamp. The log is rewritten atomically under the
        store lock and keeps the last EVENTS_KEPT events: the overview page reads it."""
        event = {"kind": kind, "at": dt.datetime.now(dt.timezone.utc).isoformat(
            timespec="seconds"), **fields}
        with self.lock():
            log = (self.events() + [event])[-EVENTS_KEPT:]
            self.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.root / EVENTS, json.dumps(log, indent=1) + "\n")
