"""The deterministic train/val rule for folders that do not name their splits."""

from __future__ import annotations

import hashlib


def hash_split(stems: list[str], val_fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """Deterministic train/val split by stem hash (stable when files are added or removed)."""
    train, val = [], []
    for stem in sorted(stems):
        bucket = int(hashlib.sha1(stem.encode()).hexdigest()[:8], 16) % 1000
        (val if bucket < val_fraction * 1000 else train).append(stem)
    return train, val
