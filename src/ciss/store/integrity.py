"""The card's own checksum (and optional signature), kept outside the card.

Each step folder holds ``manifest.json`` beside ``card.json``::

    {"format": 1, "card_sha256": "...", "card_hmac": "..." (signed stores only),
     "next": {"card_sha256": "...", "card_hmac": "..."} (only while a rewrite is in flight)}

The card holds the sha256 of every artifact; the manifest holds the card's. A card is trusted
because its bytes hash to what the manifest records, never because of where it sits.

Recovery rule of a card rewrite (``write_card_pair``, always under the store lock):
1. the manifest records the new card's hash as ``next`` (the old one stays current);
2. the card is replaced atomically;
3. the manifest is replaced with the new hash current and no ``next``.
A kill after 1 leaves the old card, which matches the current hash; a kill after 2 leaves
the new card, which matches ``next``. Both are cards ciss wrote, so readers accept either;
the next writer under the lock, or ``ciss store verify --repair``, folds ``next`` in. A card
that matches neither was edited outside ciss and is refused until ``ciss store accept``.

Signing: with ``CISS_STORE_KEY`` set, writers add an HMAC-SHA256 of the card's bytes; readers
with the key refuse a card whose HMAC does not match, and the server (``require_signed``)
refuses a step that carries none. Without the key the HMAC is kept but not checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ciss.errors import CissError
from ciss.failpoints import failpoint
from ciss.store.files import atomic_write_text

CARD = "card.json"
MANIFEST = "manifest.json"
KEY_ENV = "CISS_STORE_KEY"
FORMAT = 1

_noted: set[str] = set()  # legacy steps already mentioned by this process


def store_key() -> bytes | None:
    """The signing key from ``CISS_STORE_KEY`` (None when unset or empty)."""
    key = os.environ.get(KEY_ENV, "")
    return key.encode() if key else None


def card_hashes(data: bytes) -> dict[str, str]:
    """What a manifest records of card bytes ``data``: sha256, and the HMAC with a key."""
    out = {"card_sha256": hashlib.sha256(data).hexdigest()}
    key = store_key()
    if key is not None:
        out["card_hmac"] = hmac.new(key, data, hashlib.sha256).hexdigest()
    return out


def manifest_text(data: bytes, next_data: bytes | None = None) -> str:
    record: dict = {"format": FORMAT, **card_hashes(data)}
    if next_data is not None:
        record["next"] = card_hashes(next_data)
    return json.dumps(record, indent=1) + "\n"


def read_manifest(folder: Path) -> dict | None:
    """The step's manifest, None when it has none (a step written before manifests).

    Raises:
        CissError: a manifest that is not valid JSON.
    """
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CissError(f"{path}: unreadable manifest ({exc}); if the card is right, record "
                        f"it again with 'ciss store accept {_step_of(folder)}'") from exc


@dataclass(frozen=True)
class CardState:
    """How a step's card stands against its manifest.

    Attributes:
        status: ``ok``; ``pending`` (matches the manifest's ``next``: a rewrite was
            interrupted, the card is fine); ``legacy`` (no manifest: written before
            manifests); ``edited`` (matches neither); ``bad-signature`` (hash fine, HMAC
            not: edited together with its manifest, or signed with another key);
            ``unsigned`` (a key is set and the manifest carries no HMAC).
        message: one line for the user (empty when ok).
    """

    status: str
    message: str = ""

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "pending", "legacy", "unsigned")


def _step_of(folder: Path) -> str:
    name = Path(folder).name
    return str(int(name)) if name.isdigit() else name


def card_state(folder: Path, data: bytes | None = None) -> CardState:
    """Compare the card in ``folder`` (or its bytes ``data``) with the manifest."""
    folder = Path(folder)
    if data is None:
        data = (folder / CARD).read_bytes()
    manifest = read_manifest(folder)
    step = _step_of(folder)
    accept = f"'ciss store accept {step}'"
    if manifest is None:
        return CardState("legacy", f"{folder / CARD}: no manifest (written before cards had "
                                   f"recorded checksums); adopt it with {accept}")
    mine = card_hashes(data)
    for status, rec in (("ok", manifest), ("pending", manifest.get("next") or {})):
        if rec.get("card_sha256") != mine["card_sha256"]:
            continue
        if "card_hmac" in mine and "card_hmac" in rec and not hmac.compare_digest(
                rec["card_hmac"], mine["card_hmac"]):
            return CardState("bad-signature", f"{folder / CARD}: its signature does not match "
                                              f"CISS_STORE_KEY (edited with its manifest, or "
                                              f"signed with another key); refusing to use it")
        if "card_hmac" in mine and "card_hmac" not in rec:
            return CardState("unsigned", f"{folder / CARD}: not signed (CISS_STORE_KEY is "
                                         f"set); sign it with {accept}")
        return CardState(status)
    return CardState("edited", f"{folder / CARD}: edited since ciss wrote it (its sha256 no "
                               f"longer matches {MANIFEST}); refusing to use it; if the edit "
                               f"is deliberate, accept it with {accept}")


def check_card(folder: Path, data: bytes, *, require_signed: bool = False) -> None:
    """Raise unless the card bytes ``data`` of ``folder`` may feed a decision.

    A legacy step (no manifest) is accepted with a one-line note on stderr, once per step
    and process (docs/decisions.md); ``require_signed`` refuses legacy and unsigned cards.

    Raises:
        CissError: one line naming the card and how to accept a deliberate edit.
    """
    state = card_state(folder, data)
    if not state.usable or (require_signed and state.status in ("legacy", "unsigned")):
        raise CissError(state.message)
    if state.status == "legacy" and str(folder) not in _noted:
        _noted.add(str(folder))
        print(f"note: {state.message}", file=sys.stderr)


def write_manifest(folder: Path, data: bytes) -> None:
    """Record card bytes ``data`` as the current card (new steps; ``store accept``)."""
    atomic_write_text(Path(folder) / MANIFEST, manifest_text(data))


def write_card_pair(folder: Path, text: str) -> None:
    """Replace the card and its manifest as a pair (module docstring's recovery rule).
    Callers hold the store lock."""
    folder = Path(folder)
    new = text.encode("utf-8")
    try:
        old = (folder / CARD).read_bytes()
    except FileNotFoundError:
        old = None
    intent = old is not None and read_manifest(folder) is not None
    if intent:
        # step 1 keeps the current hash: a legacy card gets no manifest until step 3
        atomic_write_text(folder / MANIFEST, manifest_text(old, next_data=new))
    try:
        failpoint("store.card.intent", folder / CARD)
        atomic_write_text(folder / CARD, text)
    except BaseException:
        if intent:  # the card was not replaced: take the intent back (best effort)
            with contextlib.suppress(OSError):
                write_manifest(folder, old)
        raise
    failpoint("store.card.replaced", folder / MANIFEST)
    write_manifest(folder, new)


def finish_pending(folder: Path) -> bool:
    """Fold an interrupted rewrite's ``next`` into the manifest (callers hold the lock);
    returns whether there was one."""
    manifest = read_manifest(folder)
    if not manifest or "next" not in manifest:
        return False
    data = (Path(folder) / CARD).read_bytes()
    if card_state(folder, data).status in ("ok", "pending"):
        write_manifest(folder, data)
        return True
    return False


def accept(store, step: int) -> CardState:
    """Record the step's card as it is now: a deliberate edit, or a legacy step's first
    manifest (signed when ``CISS_STORE_KEY`` is set); the event log keeps what it was.
    Returns the state it had.

    Raises:
        CissError: the card is not a valid step card.
    """
    from ciss.store.card import StepCard

    with store.lock():
        folder = store.step_dir(store.resolve(step))
        data = (folder / CARD).read_bytes()
        try:
            json.loads(data)
            StepCard.from_file(folder / CARD)
        except (ValueError, CissError) as exc:
            raise CissError(f"{folder / CARD}: not a valid step card, not accepted "
                            f"({exc})") from exc
        state = card_state(folder, data)
        write_manifest(folder, data)
        store.record_event("accepted", step=step, was=state.status)
    return state
