"""Annotation tasks from a collection (``ciss collect export``), in a form each tool imports as is.

The served step's predictions of its (old) classes go in as pre-annotations, and the new
classes named by ``--new-class`` are added to the label set, so annotators only paint those.

| format         | written to OUT/                                                       |
|----------------|-----------------------------------------------------------------------|
| label-studio   | ``tasks.json`` (tasks with ``predictions``: one brush region per old  |
|                | class, Label Studio's RLE via label-studio-converter, ``readonly``),  |
|                | ``label_config.xml`` (BrushLabels: old + new classes), ``images/``    |
| cvat           | "Segmentation mask 1.1": ``labelmap.txt``, ``ImageSets/Segmentation/  |
|                | default.txt``, ``SegmentationClass/`` + ``SegmentationObject/`` PNGs, |
|                | ``JPEGImages/``, and the same without images as ``annotations.zip``   |
| coco           | ``annotations/instances_default.json`` (RLE per class and image, via  |
|                | pycocotools) + ``images/``                                            |

Images are written as PNG under their collection id, so every export reads back through
``ciss add-classes --data OUT/`` (``data.layouts``) with the same stems. OUT is written in a
sibling ``.tmp-`` folder and renamed into place: it appears whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ciss.data.classes import BACKGROUND
from ciss.data.collection import IMAGE, PREDICTION, read_meta
from ciss.errors import CissError

FORMATS = ("label-studio", "cvat", "coco")
LS_FROM, LS_TO = "label", "image"  # the label config's BrushLabels and Image names


def voc_colour(index: int) -> tuple[int, int, int]:
    """Pascal VOC's palette colour of ``index`` (0 = black, up to 254), CVAT's defaults."""
    from ciss.data.imageio import voc_palette

    r, g, b = voc_palette()[3 * index: 3 * index + 3]
    return r, g, b


@dataclass
class Task:
    """One picked item: its image, its prediction by class name, and where it came from."""

    id: str
    image: Path
    prediction: np.ndarray  # uint8 HxW, ids into ``classes``
    classes: list[str]
    meta: dict

    def masks(self) -> dict[str, np.ndarray]:
        """Boolean mask per predicted non-background class."""
        out = {}
        for i in np.unique(self.prediction):
            if 0 < i < len(self.classes) and self.classes[i] != BACKGROUND:
                out[self.classes[i]] = self.prediction == i
        return out


@dataclass
class ExportResult:
    out: Path
    format: str
    tasks: int
    labels: list[str]  # old classes then new ones, as the tool will list them
    files: list[str] = field(default_factory=list)


def load_tasks(items: list[Path]) -> list[Task]:
    """The picked collection items as :class:`Task` (each checked: image and prediction).

    Raises:
        CissError: an item's image, prediction or meta.json is missing or unreadable.
    """
    out = []
    for item in items:
        try:
            meta = read_meta(item)
            with Image.open(item / PREDICTION) as im:
                pred = np.asarray(im, np.uint8)
            with Image.open(item / IMAGE) as im:
                size = im.size
        except (OSError, ValueError) as exc:
            raise CissError(f"{item}: unreadable collection item ({exc})") from exc
        if pred.shape != (size[1], size[0]):
            raise CissError(f"{item / PREDICTION}: {pred.shape[1]}x{pred.shape[0]} but the "
                            f"image is {size[0]}x{size[1]}")
        out.append(Task(item.name, item / IMAGE, pred, list(meta.get("classes") or []), meta))
    return out


def label_set(tasks: list[Task], new_classes: list[str]) -> list[str]:
    """Old classes (union over the steps that served the tasks, by name) then new ones.

    Raises:
        CissError: a new class is already one of the old ones, or repeated.
    """
    old: list[str] = []
    for t in tasks:
        old += [c for c in t.classes if c != BACKGROUND and c not in old]
    lowered = {c.lower() for c in old}
    seen = set()
    for name in new_classes:
        if not name.strip() or name.lower() == BACKGROUND:
            raise CissError(f"--new-class {name!r}: give the name of a class to paint")
        if name.lower() in lowered:
            raise CissError(f"--new-class {name!r}: the served step already knows this class")
        if name.lower() in seen:
            raise CissError(f"--new-class {name!r} is given twice")
        seen.add(name.lower())
    return old + list(new_classes)


def _copy_images(tasks: list[Task], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        shutil.copyfile(t.image, folder / f"{t.id}.png")


# -- Label Studio ----------------------------------------------------------------------
def label_config(labels: list[str]) -> str:
    """A Label Studio labelling config: the image and one BrushLabels with every label."""
    from xml.sax.saxutils import quoteattr

    def hexcolour(i: int) -> str:
        return "#" + "".join(f"{v:02x}" for v in voc_colour(i))

    rows = "\n".join(f'    <Label value={quoteattr(n)} background="{hexcolour(i + 1)}"/>'
                     for i, n in enumerate(labels))
    return (f'<View>\n  <Image name="{LS_TO}" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="{LS_FROM}" toName="{LS_TO}">\n{rows}\n  </BrushLabels>\n'
            "</View>\n")


def brush_result(mask: np.ndarray, name: str, readonly: bool) -> dict:
    """One Label Studio brush region (its own RLE, through label-studio-converter)."""
    from label_studio_converter.brush import mask2rle

    h, w = mask.shape
    region = {"id": uuid.uuid4().hex[:10], "type": "brushlabels", "from_name": LS_FROM,
              "to_name": LS_TO, "original_width": int(w), "original_height": int(h),
              "image_rotation": 0,
              "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255),
                        "brushlabels": [name]}}
    if readonly:
        region["readonly"] = True
    return region


def write_label_studio(out: Path, tasks: list[Task], labels: list[str], url_prefix: str
                       ) -> list[str]:
    _copy_images(tasks, out / "images")
    docs = []
    for t in tasks:
        result = [brush_result(m, name, readonly=True) for name, m in t.masks().items()]
        scores = t.meta.get("scores") or {}
        docs.append({
            "data": {"image": f"{url_prefix}{t.id}.png", "ciss_id": t.id,
                     "ciss_step": t.meta.get("step"), "ciss_reason": t.meta.get("reason")},
            "predictions": [{"model_version": f"ciss step {t.meta.get('step')}",
                             # Label Studio sorts by this: the most unusual first
                             "score": float(next((scores[k] for k in ("novelty",
                                                                      "uncertainty")
                                                  if scores.get(k) is not None), 0.0)),
                             "result": result}]})
    (out / "tasks.json").write_text(json.dumps(docs, indent=1) + "\n", encoding="utf-8")
    (out / "label_config.xml").write_text(label_config(labels), encoding="utf-8")
    return ["tasks.json", "label_config.xml", "images/"]


# -- CVAT Segmentation mask 1.1 --------------------------------------------------------
def write_cvat(out: Path, tasks: list[Task], labels: list[str]) -> list[str]:
    colours = {BACKGROUND: (0, 0, 0)} | {n: voc_colour(i + 1) for i, n in enumerate(labels)}
    lines = [f"{n}:{r},{g},{b}::" for n, (r, g, b) in colours.items()]
    (out / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + "\n".join(lines)
                                      + "\n", encoding="utf-8")
    sets = out / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "default.txt").write_text("".join(f"{t.id}\n" for t in tasks), encoding="utf-8")
    for sub in ("SegmentationClass", "SegmentationObject"):
        (out / sub).mkdir()
    _copy_images(tasks, out / "JPEGImages")  # CVAT's folder name, whatever the format
    for t in tasks:
        cls = np.zeros((*t.prediction.shape, 3), np.uint8)
        obj = np.zeros_like(cls)
        for k, (name, m) in enumerate(t.masks().items(), start=1):
            cls[m] = colours[name]
            obj[m] = voc_colour(k)  # one object per predicted class (no instances here)
        Image.fromarray(cls).save(out / "SegmentationClass" / f"{t.id}.png")
        Image.fromarray(obj).save(out / "SegmentationObject" / f"{t.id}.png")
    with zipfile.ZipFile(out / "annotations.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for sub in ("labelmap.txt", "ImageSets", "SegmentationClass", "SegmentationObject"):
            p = out / sub
            for f in sorted([p] if p.is_file() else p.rglob("*")):
                if f.is_file():
                    z.write(f, f.relative_to(out).as_posix())
    return ["labelmap.txt", "ImageSets/", "SegmentationClass/", "SegmentationObject/",
            "JPEGImages/", "annotations.zip"]


# -- COCO ------------------------------------------------------------------------------
def write_coco(out: Path, tasks: list[Task], labels: list[str]) -> list[str]:
    from pycocotools import mask as mask_utils

    _copy_images(tasks, out / "images")
    cats = [{"id": i + 1, "name": n, "supercategory": ""} for i, n in enumerate(labels)]
    cat_id = {c["name"]: c["id"] for c in cats}
    images, anns = [], []
    for i, t in enumerate(tasks, start=1):
        h, w = t.prediction.shape
        images.append({"id": i, "file_name": f"{t.id}.png", "width": int(w), "height": int(h)})
        for name, m in t.masks().items():
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            bbox = mask_utils.toBbox(rle).tolist()
            rle["counts"] = rle["counts"].decode("ascii")
            # a mask, not instances: RLE with iscrowd=1, as CVAT writes masks
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat_id[name],
                         "segmentation": rle, "area": float(m.sum()), "bbox": bbox,
                         "iscrowd": 1})
    (out / "annotations").mkdir()
    doc = {"info": {"description": "ciss collect export: pre-annotations of the served step"},
           "licenses": [], "images": images, "annotations": anns, "categories": cats}
    (out / "annotations" / "instances_default.json").write_text(json.dumps(doc) + "\n",
                                                                encoding="utf-8")
    return ["annotations/instances_default.json", "images/"]


def write_tasks(out: Path, tasks: list[Task], fmt: str, new_classes: list[str],
                url_prefix: str = "/data/local-files/?d=images/") -> ExportResult:
    """Write ``tasks`` as ``fmt`` into ``out`` atomically (module docstring).

    Raises:
        CissError: an unknown format, ``out`` exists and is not empty, or a bad new class.
    """
    if fmt not in FORMATS:
        raise CissError(f"--format {fmt!r}: choose {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CissError(f"{out}: exists and is not empty; choose a new --out folder")
    labels = label_set(tasks, new_classes)
    stage = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    stage.mkdir(parents=True)
    try:
        if fmt == "label-studio":
            files = write_label_studio(stage, tasks, labels, url_prefix)
        elif fmt == "cvat":
            files = write_cvat(stage, tasks, labels)
        else:
            files = write_coco(stage, tasks, labels)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return ExportResult(out, fmt, len(tasks), labels, files)
