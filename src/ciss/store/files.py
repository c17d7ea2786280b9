"""Checksums and crash-safe small writes, shared by every store module.

Recovery rule of ``atomic_write_text``: the text goes to ``.<name>.<hex>.tmp`` beside the
target, is fsynced, and replaces the target in one ``os.replace``. A kill before the replace
leaves the old file and a ``.tmp`` leftover that ``ciss store verify --repair`` deletes (no
reader ever opens a ``.tmp``); any error (a full disk) removes the ``.tmp`` before it rises.
"""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from pathlib import Path

from ciss.errors import DiskFull
from ciss.failpoints import failpoint

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


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


def disk_bytes(path: Path) -> int:
    """Bytes a file or folder takes (0 when missing)."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size if path.exists() else 0
    except OSError:  # removed while we looked
        return 0


def fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def is_no_space(exc: BaseException) -> bool:
    """An ``OSError`` for a full disk or quota, or safetensors' error wrapping one."""
    if isinstance(exc, OSError):
        return exc.errno in NO_SPACE
    text = str(exc)
    return type(exc).__name__ == "SafetensorError" and (
        "No space left" in text or "StorageFull" in text or "code: 28" in text)


_writing: list = [None, None]  # (path, bytes needed) of the big write under way, if any


def writing(path: Path | None, needed: int | None = None) -> None:
    """Note the big write under way (an export's staging): a full disk raised by code that
    does not name its file (torch.onnx, ONNX Runtime) is then reported against it."""
    _writing[:] = [path, needed]


def current_write() -> tuple[Path | None, int | None]:
    return _writing[0], _writing[1]


def raise_if_no_space(exc: BaseException, path: Path, needed: int | None) -> None:
    """Re-raise a full-disk error as ``DiskFull`` naming ``path`` and the bytes needed."""
    if is_no_space(exc):
        raise DiskFull(path, needed) from exc


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (see the
    module's recovery rule)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        failpoint("store.atomic.tmp_written", path)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        raise_if_no_space(exc, path, len(text.encode()))
        raise


def swap_target(name: str) -> str | None:
    """The folder a swap leftover belongs to: ``.X.old`` and ``.X.<8 hex>`` -> ``X``."""
    if not name.startswith("."):
        return None
    if name.endswith(".old"):
        return name[1:-4] or None
    stem, _, tail = name[1:].rpartition(".")
    if stem and len(tail) == 8 and all(c in "0123456789abcdef" for c in tail):
        return stem
    return None


def recover_swap(folder: Path) -> None:
    """Finish or undo an interrupted folder swap (checkpoints; ``store verify --repair``).

    The swap: a new ``.X.<hex>`` is completed -> ``X`` renamed to ``.X.old`` -> ``.X.<hex>``
    renamed to ``X`` -> ``.X.old`` deleted. Rule:
    - ``X`` and ``.X.old`` both exist: the swap finished; ``.X.old`` is stale, delete it;
    - only ``.X.old``: killed between the renames; it is the last complete copy, rename it
      back;
    - ``.X.<hex>`` folders: a new copy killed before the swap; nothing refers to them, delete.
    """
    import shutil

    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if old.exists():
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, folder)
    if folder.parent.is_dir():
        for tmp in folder.parent.glob(f".{folder.name}.*"):
            if tmp != old and tmp.is_dir() and swap_target(tmp.name) == folder.name:
                shutil.rmtree(tmp, ignore_errors=True)
