"""The collection folder ``ciss serve --collect DIR`` writes (format ``ciss-collection/1``).

::

    DIR/collection.json            {"format": "ciss-collection/1"}
    DIR/items/<id>/image.png       the decoded request image (RGB, 8 bit)
    DIR/items/<id>/prediction.png  8-bit index mask: class ids of the step that served it
    DIR/items/<id>/meta.json       {"id", "received_at" (ISO UTC), "step", "engine",
                                    "classes" (names by id of that step),
                                    "scores": {"uncertainty", "novelty", "novel_share",
                                               "largest_region"},
                                    "reason" ("novelty" | "uncertainty" | "random"),
                                    "phash" (16 hex digits), "size": [h, w],
                                    "pooled" (mean softmax per class over the image)}

``<id>`` is ``<UTC time %Y%m%dT%H%M%S%fZ>-<8 hex of the image's sha256>``, so ids sort by
time. An item is written in ``DIR/.tmp-<id>/`` and renamed into ``DIR/items/`` in one
``os.rename``: readers see whole items only (and never look at ``.tmp-*``). The writer is
``ciss.runtime.collect``; this module holds what readers need (docs/production-loop.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FORMAT = "ciss-collection/1"
MARKER = "collection.json"
ITEMS = "items"
META = "meta.json"
IMAGE = "image.png"
PREDICTION = "prediction.png"
TMP_PREFIX = ".tmp-"
REASONS = ("novelty", "uncertainty", "random")


def is_collection(folder: Path) -> bool:
    """Whether ``folder`` holds a ``collection.json`` of this format."""
    try:
        doc = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT


def items(folder: Path) -> list[Path]:
    """The items of a collection (folders of ``DIR/items`` holding a ``meta.json``), oldest
    first (ids start with their UTC time)."""
    root = Path(folder) / ITEMS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / META).is_file())


def read_meta(item: Path) -> dict:
    return json.loads((Path(item) / META).read_text(encoding="utf-8"))


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                continue
    return total


def summarise(folder: Path, bins: int = 10) -> dict:
    """What a collection holds: counts by reason, step and engine, the images per predicted
    class (covering >= 1 % of an image, background excluded), and score histograms.

    Raises:
        CissError: ``folder`` is not a collection.
    """
    from ciss.errors import CissError

    folder = Path(folder)
    if not is_collection(folder):
        raise CissError(f"{folder}: not a collection (no {MARKER} of format {FORMAT}); "
                        f"'ciss serve --collect {folder}' makes one")
    reasons: dict[str, int] = {}
    steps: dict[str, int] = {}
    classes: dict[str, int] = {}
    values: dict[str, list[float]] = {"uncertainty": [], "novelty": [], "novel_share": [],
                                      "largest_region": []}
    unreadable, size, n, first, last = [], 0, 0, None, None
    for item in items(folder):
        try:
            meta = read_meta(item)
        except (OSError, ValueError) as exc:
            unreadable.append(f"{item.name}: {exc}")
            continue
        n += 1
        first = first or meta.get("received_at")
        last = meta.get("received_at")
        r = str(meta.get("reason"))
        reasons[r] = reasons.get(r, 0) + 1
        key = f"{meta.get('step')} ({meta.get('engine')})"
        steps[key] = steps.get(key, 0) + 1
        pooled, names = meta.get("pooled") or [], meta.get("classes") or []
        for name, share in list(zip(names, pooled))[1:]:
            if share >= 0.01:
                classes[name] = classes.get(name, 0) + 1
        for k, v in values.items():
            x = (meta.get("scores") or {}).get(k)
            if isinstance(x, (int, float)):
                v.append(float(x))
        size += folder_bytes(item)
    hist = {}
    for k, v in values.items():
        hi = 1.0 if k != "novelty" else max([10.0] + v)
        lo = 0.0 if k != "novelty" else min([0.0] + v)
        edges = np.linspace(lo, hi, bins + 1)
        hist[k] = {"edges": [round(float(e), 3) for e in edges],
                   "counts": np.histogram(v, edges)[0].tolist() if v else [0] * bins}
    return {"folder": str(folder), "format": FORMAT, "items": n, "bytes": size,
            "first": first, "last": last, "reasons": reasons, "steps": steps,
            "predicted_classes": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
            "histograms": hist, "unreadable": unreadable}


def contact_sheet(folder: Path, count: int = 24, side: int = 96) -> list[dict]:
    """The newest ``count`` items as thumbnails for a page: ``{"id", "png" (base64 PNG,
    longer side ``side``), "caption"}``; unreadable items are left out."""
    import base64
    import io

    from PIL import Image

    out = []
    for item in reversed(items(folder)[-count:] if count else []):
        try:
            meta = read_meta(item)
            with Image.open(item / IMAGE) as im:
                im = im.convert("RGB")
                im.thumbnail((side, side))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
        except (OSError, ValueError):
            continue
        scores = meta.get("scores") or {}
        parts = [str(meta.get("reason"))] + [
            f"{k} {scores[k]:.2f}" for k in ("novelty", "uncertainty")
            if isinstance(scores.get(k), (int, float))]
        out.append({"id": meta.get("id", item.name),
                    "png": base64.b64encode(buf.getvalue()).decode("ascii"),
                    "caption": ", ".join(parts)})
    return out
