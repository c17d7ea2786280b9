"""Off the request path: score histograms and ``ciss serve --collect DIR``.

A request hands its image, prediction and scores to :class:`ScoreSink` (one ``put_nowait``
on a bounded queue: a full queue drops the item and counts it) and answers. One worker thread
observes the score histograms of ``/metrics`` and, with a :class:`Collector`, decides whether
to keep the image:

1. *reason*: ``novelty`` or ``uncertainty`` when the image's score passes the step's
   calibrated threshold (``runtime.scoring``; ``--collect-novelty``/``--collect-uncertainty``
   override them), else ``random`` for a ``random_share`` draw; otherwise not kept.
2. *caps*: at most ``per_minute``/``per_hour``/``per_day`` kept images (sliding windows), and
   nothing more once the folder holds ``max_mb`` megabytes.
3. *duplicates*: a 64-bit perceptual hash (DCT of the 32x32 grey image, the signs of its 8x8
   lowest frequencies against their median) within ``max_distance`` bits of one already held.

The collection folder (format ``ciss-collection/1``, docs/production-loop.md)::

    DIR/collection.json            {"format": "ciss-collection/1"}
    DIR/items/<id>/image.png       the decoded request image (RGB, 8 bit)
    DIR/items/<id>/prediction.png  the index mask (class ids of the step that served it)
    DIR/items/<id>/meta.json       id, received_at, step, engine, classes, scores, reason,
                                   phash, size [h, w], pooled

An item is written into ``DIR/.tmp-<id>/`` and renamed to ``DIR/items/<id>`` in one
``os.rename``, so a reader never sees half an item. Any failure (disk full, the folder
removed) is logged once a minute and counted (``ciss_collect{outcome="failed"}``) and never
reaches a request; a removed folder is created again at the next kept image.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import queue
import random
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ciss.data.collection import (
    FORMAT,
    IMAGE,
    ITEMS,
    MARKER,
    META,
    PREDICTION,
    TMP_PREFIX,
    folder_bytes,
    is_collection,
    items,
    read_meta,
)
from ciss.failpoints import failpoint
from ciss.store.files import fsync_tree

log = logging.getLogger("ciss.serve")
STALE_S = 3600.0  # a .tmp- item older than this is a dead writer's, removed at start



@dataclass(frozen=True)
class CollectPolicy:
    """``ciss serve --collect DIR`` and its limits.

    Attributes:
        folder: the collection folder.
        random_share: share of the other images kept at random (the baseline to compare with).
        novelty, uncertainty: thresholds overriding the step's calibrated ones (None: those).
        per_minute, per_hour, per_day: kept images at most, over sliding windows.
        max_mb: the folder's size at most (megabytes, 10^6 bytes); past it nothing is kept.
        max_distance: perceptual hashes this many bits apart or closer are duplicates.
        seed: the random draw's seed (None: from the OS).
    """

    folder: Path
    random_share: float = 0.02
    novelty: float | None = None
    uncertainty: float | None = None
    per_minute: int = 10
    per_hour: int = 100
    per_day: int = 1000
    max_mb: float = 1000.0
    max_distance: int = 4
    seed: int | None = None


@dataclass
class Scored:
    """One served image handed to the worker (nothing is copied on the request path)."""

    image: np.ndarray  # uint8 HxWx3
    labels: np.ndarray  # uint8 HxW
    scores: dict
    step: int
    engine: str
    classes: list[str]
    calibration: object | None
    received_at: dt.datetime


def _dct_matrix(n: int = 32) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``D @ x`` is the DCT of a length-n vector."""
    k = np.arange(n)[:, None]
    d = np.cos(np.pi * (2 * np.arange(n)[None] + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d.astype(np.float32)


_DCT = _dct_matrix()


def phash(image: np.ndarray) -> int:
    """A 64-bit DCT perceptual hash of an RGB image."""
    grey = Image.fromarray(np.ascontiguousarray(image)).convert("L")
    grey = np.asarray(grey.resize((32, 32), Image.BILINEAR), dtype=np.float32)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def item_id(when: dt.datetime, image: np.ndarray) -> str:
    """``<UTC time>-<8 hex of the image's sha256>``: sorts by time, unique per image."""
    digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:8]
    return f"{when:%Y%m%dT%H%M%S%fZ}-{digest}"


class Collector:
    """Decides and writes (module docstring); used by one thread only."""

    def __init__(self, policy: CollectPolicy) -> None:
        self.policy = policy
        self.folder = Path(policy.folder)
        self.rng = random.Random(policy.seed)
        self.kept: dict[str, deque] = {"minute": deque(), "hour": deque(), "day": deque()}
        self.hashes: list[int] = []
        self.bytes = 0
        self._prepare()

    def _prepare(self) -> None:
        """Create the folder (or take up an existing collection: its hashes and size);
        remove what a killed server left in ``.tmp-*``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / MARKER
        if not marker.exists():  # atomically: a kill here must not leave a half marker
            tmp = self.folder / f"{TMP_PREFIX}{MARKER}.{os.getpid()}"
            tmp.write_text(json.dumps({"format": FORMAT}) + "\n", encoding="utf-8")
            os.replace(tmp, marker)
        elif not is_collection(self.folder):
            from ciss.errors import CissError

            raise CissError(f"{marker}: not a {FORMAT} collection; choose another --collect "
                            "folder")
        # a killed writer's leftovers; a recent one may be another server's item in flight
        stale = time.time() - STALE_S
        for p in self.folder.glob(TMP_PREFIX + "*"):
            try:
                if p.stat().st_mtime < stale:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            except OSError:
                continue
        self.hashes = []
        for item in items(self.folder):
            try:
                self.hashes.append(int(read_meta(item)["phash"], 16))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        self.bytes = folder_bytes(self.folder)

    def reason(self, item: Scored) -> str | None:
        """Why ``item`` would be kept (``novelty``, ``uncertainty``, ``random``) or None."""
        from ciss.runtime.scoring import unusual

        why = unusual(item.scores, item.calibration, self.policy.novelty,
                      self.policy.uncertainty)
        if why:
            return why[0]
        return "random" if self.rng.random() < self.policy.random_share else None

    def _capped(self, now: float) -> str | None:
        p = self.policy
        for name, span, cap in (("minute", 60, p.per_minute), ("hour", 3600, p.per_hour),
                                ("day", 86400, p.per_day)):
            q = self.kept[name]
            while q and q[0] <= now - span:
                q.popleft()
            if len(q) >= cap:
                return f"cap_{name}"
        if self.bytes >= p.max_mb * 1e6:
            return "cap_disk"
        return None

    def consider(self, item: Scored) -> str:
        """Keep ``item`` or not; returns the outcome (``kept_<reason>``, ``not_selected``,
        ``duplicate``, ``cap_minute``/``cap_hour``/``cap_day``/``cap_disk``).

        Raises:
            OSError: the write failed (nothing half-written is left behind).
        """
        why = self.reason(item)
        if why is None:
            return "not_selected"
        now = time.monotonic()
        capped = self._capped(now)
        if capped:
            return capped
        h = phash(item.image)
        if not (self.folder / MARKER).exists():  # the folder was removed: start afresh
            self._prepare()
        if any(hamming(h, o) <= self.policy.max_distance for o in self.hashes):
            return "duplicate"
        self.bytes += self.write(item, why, h)
        self.hashes.append(h)
        for q in self.kept.values():
            q.append(now)
        return f"kept_{why}"

    def write(self, item: Scored, why: str, h: int) -> int:
        """Write one item atomically; returns its size in bytes."""
        from ciss.data.imageio import mask_png

        name = item_id(item.received_at, item.image)
        stage = self.folder / (TMP_PREFIX + name)
        stage.mkdir()
        try:
            failpoint("collect.item.staging", stage)
            Image.fromarray(np.ascontiguousarray(item.image)).save(stage / IMAGE, format="PNG")
            (stage / PREDICTION).write_bytes(mask_png(np.asarray(item.labels, np.uint8)))
            meta = {"id": name, "received_at": item.received_at.isoformat(),
                    "step": int(item.step), "engine": item.engine,
                    "classes": list(item.classes),
                    "scores": {k: item.scores.get(k) for k in
                               ("uncertainty", "novelty", "novel_share", "largest_region")},
                    "reason": why, "phash": f"{h:016x}",
                    "size": [int(item.image.shape[0]), int(item.image.shape[1])],
                    "pooled": list(item.scores.get("pooled") or [])}
            (stage / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            size = folder_bytes(stage)
            fsync_tree(stage)  # the rename must not publish files a power loss empties
            failpoint("collect.item.staged", stage)
            (self.folder / ITEMS).mkdir(exist_ok=True)
            os.rename(stage, self.folder / ITEMS / name)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return size


class ScoreSink:
    """The bounded queue and worker thread between requests and histograms/collection."""

    def __init__(self, metrics, collector: Collector | None = None, size: int = 16) -> None:
        self.metrics = metrics
        self.collector = collector
        self.queue: queue.Queue = queue.Queue(maxsize=size)
        self.outcomes: dict[str, int] = {}
        self._lock = threading.Lock()  # 'dropped' is counted on request threads
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None
        self._last_warning = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="ciss-scores", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish what is queued (up to ``timeout``), then stop the worker."""
        if self._thread is not None:
            try:
                self.queue.put(None, timeout=timeout)
            except queue.Full:
                return
            self._thread.join(timeout)

    def offer(self, item: Scored) -> None:
        """Hand one scored image over; never blocks and never raises. Without a collector
        only the scores travel (the queue never pins images for histograms)."""
        if self.collector is None:
            item = Scored(None, None, item.scores, item.step, item.engine, item.classes,
                          None, item.received_at)
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self._count("dropped")

    def _count(self, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if self.metrics is not None and self.collector is not None:
            self.metrics.collected.labels(outcome).inc()

    def _work(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            try:
                self._observe(item)
                if self.collector is not None:
                    self._count(self.collector.consider(item))
            except Exception as exc:  # noqa: BLE001 - a full disk must never stop serving
                self._count("failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                if time.monotonic() - self._last_warning > 60:
                    self._last_warning = time.monotonic()
                    log.warning("collecting into %s failed (%s); requests are served as "
                                "before", self.collector and self.collector.folder,
                                self.last_error)

    def _observe(self, item: Scored) -> None:
        if self.metrics is None:
            return
        for key, hist in self.metrics.scores.items():
            value = item.scores.get(key)
            if value is not None:
                hist.observe(value)

    def status(self) -> dict:
        with self._lock:
            outcomes = dict(self.outcomes)
        return {"collect": str(self.collector.folder) if self.collector else None,
                "outcomes": outcomes, "last_error": self.last_error}
