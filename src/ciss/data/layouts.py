"""What annotation tools export, read into ciss's one representation: images, a uint8 index
mask per image (255 = ignore) and an ordered class list, always matched by name.

| layout     | detected by                                     | masks                          |
|------------|-------------------------------------------------|--------------------------------|
| coco       | ``annotations/*.json`` + ``images/``, or        | polygons / RLE rasterised with |
|            | Roboflow's ``<split>/_annotations.coco.json``   | pycocotools                    |
| cvat       | ``labelmap.txt`` + ``SegmentationClass/``       | RGB colours via the labelmap   |
| roboflow   | ``<split>/_classes.csv`` + ``*_mask.png``       | index PNGs, names from the CSV |
| cityscapes | ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` | official label ids -> names    |

Choices (docs/decisions.md): COCO pixels covered by two or more instances become 255 (ignore),
as torchvision's COCO reference does, whatever their classes; crowd regions (``iscrowd``) are
labelled like any other instance; a category no annotation uses is dropped (Roboflow's root
category). A colour that is not in a CVAT labelmap is an error naming the file, the colour and
its pixel count. Without a train/val split in the export, the deterministic 90/10 rule applies.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ciss.data.classes import BACKGROUND, IGNORE_INDEX, ClassList
from ciss.data.imageio import open_image
from ciss.data.splits import hash_split
from ciss.errors import CissError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VAL_SPLITS = ("val", "valid", "validation")


@dataclass
class RawLayout:
    """A tool export before validation (see ``folder._validate``)."""

    name: str
    classes: ClassList
    images: dict[str, Path]
    masks: dict[str, Path]  # the file each mask is read from (for fingerprints and messages)
    train: list[str]
    val: list[str]
    has_val: bool
    read_mask: Callable[[str], np.ndarray] | None


def detect(root: Path) -> Callable[[Path], RawLayout] | None:
    """The reader for ``root``'s layout, or None for the ciss and VOC layouts."""
    if (root / "labelmap.txt").is_file() and (root / "SegmentationClass").is_dir():
        return read_cvat
    if (root / "gtFine").is_dir():
        return read_cityscapes
    if _roboflow_splits(root):
        return read_roboflow
    if _coco_files(root):
        return read_coco
    return None


def _split_of(name: str) -> str:
    low = name.lower()
    return "val" if any(v in low for v in VAL_SPLITS) else ("test" if "test" in low
                                                           else "train")


def _names(raw: list[str], where: Path) -> ClassList:
    """``background`` first, then the tool's names in its order, merged by name."""
    names = [BACKGROUND]
    for n in raw:
        n = n.strip()
        if n and n.lower() != BACKGROUND and n not in names:
            names.append(n)
    try:
        return ClassList(tuple(names))
    except CissError as exc:
        raise CissError(f"{where}: {exc}") from exc


# -- COCO instances JSON (pycocotools) --------------------------------------------------------
def _coco_files(root: Path) -> list[Path]:
    found = sorted((root / "annotations").glob("*.json")) if (root / "annotations").is_dir() \
        else []
    found += sorted(root.glob("*/_annotations.coco.json")) + sorted(
        root.glob("_annotations.coco.json"))
    return found


def read_coco(root: Path) -> RawLayout:
    """COCO instances: every ``annotations/*.json`` (images under ``images/``) or Roboflow's
    per-split ``_annotations.coco.json`` beside its images."""
    from pycocotools.coco import COCO

    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    sources: dict[str, tuple[COCO, int]] = {}
    splits: dict[str, list[str]] = {"train": [], "val": []}
    names: list[str] = []
    for path in _coco_files(root):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not {"images", "annotations", "categories"} <= set(doc):
                raise ValueError("needs 'images', 'annotations' and 'categories'")
            coco = COCO()
            coco.dataset = doc
            coco.createIndex()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CissError(f"{path}: not a COCO instances file ({exc})") from exc
        used = {a["category_id"] for a in doc["annotations"]}
        names += [c["name"] for c in doc["categories"] if c["id"] in used]
        base = path.parent if path.name == "_annotations.coco.json" else root / "images"
        split = _split_of(path.parent.name if path.name == "_annotations.coco.json"
                          else path.stem)
        for img in doc["images"]:
            file = base / img["file_name"]
            if not file.is_file() and (base / path.stem.split("_")[-1] / img["file_name"]
                                       ).is_file():
                file = base / path.stem.split("_")[-1] / img["file_name"]  # images/<split>/
            if not file.is_file():
                raise CissError(f"{path}: image '{img['file_name']}' (id {img['id']}) not found "
                                f"under {base}")
            stem = f"{split}/{Path(img['file_name']).with_suffix('')}".replace("/", "__")
            images[stem], masks[stem] = file, path
            sources[stem] = (coco, img["id"])
            if split != "test":
                splits[split].append(stem)
    classes = _names(names, root)

    def read(stem: str) -> np.ndarray:
        coco, image_id = sources[stem]
        info = coco.imgs[image_id]
        h, w = info["height"], info["width"]
        label = np.zeros((h, w), np.uint8)
        count = np.zeros((h, w), np.uint8)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
            name = coco.cats[ann["category_id"]]["name"].strip()
            try:
                m = coco.annToMask(ann).astype(bool)
            except Exception as exc:  # noqa: BLE001 - pycocotools raises bare errors
                raise CissError(f"{masks[stem]}: annotation {ann.get('id')} of image "
                                f"{info['file_name']} cannot be rasterised ({exc})") from exc
            if m.shape != (h, w):
                raise CissError(f"{masks[stem]}: annotation {ann.get('id')} is {m.shape[1]}x"
                                f"{m.shape[0]} but image {info['file_name']} is {w}x{h}")
            label[m] = classes.index(name) if name.lower() != BACKGROUND else 0
            count[m] = np.minimum(count[m] + 1, 2)
        label[count > 1] = IGNORE_INDEX  # overlapping instances: ambiguous, not supervised
        return label

    train, val = splits["train"], splits["val"]
    has_val = bool(val)
    if not has_val:
        train, val = hash_split(train)
    return RawLayout("coco", classes, images, masks, train, val, has_val, read)


# -- CVAT "Segmentation mask 1.1" ----------------------------------------------------------
def _labelmap(path: Path) -> list[tuple[str, tuple[int, int, int]]]:
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(":")
        try:
            rgb = tuple(int(v) for v in parts[1].split(","))
            if len(parts) < 2 or len(rgb) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise CissError(f"{path}: line {i} is not 'name:R,G,B:parts:actions' "
                            f"({line.strip()!r})") from None
        out.append((parts[0].strip(), rgb))
    if not out:
        raise CissError(f"{path}: no labels")
    return out


def read_cvat(root: Path) -> RawLayout:
    """CVAT's Segmentation mask 1.1: RGB masks painted with ``labelmap.txt``'s colours.

    The label named ``background`` or coloured (0, 0, 0) is background. Palette or grey masks
    (CVAT accepts them on import) are read as line indices of the labelmap.
    """
    table = _labelmap(root / "labelmap.txt")
    classes = _names([n for n, rgb in table if rgb != (0, 0, 0)], root / "labelmap.txt")
    colour_to_id = {rgb: (0 if name.lower() == BACKGROUND or rgb == (0, 0, 0)
                          else classes.index(name)) for name, rgb in table}
    line_to_id = np.full(256, IGNORE_INDEX, np.uint8)
    for i, (_name, rgb) in enumerate(table):
        line_to_id[i] = colour_to_id[rgb]
    images = _files(root / "JPEGImages")
    masks = {s: p for s, p in _files(root / "SegmentationClass", (".png",)).items()}
    missing = sorted(set(masks) - set(images))
    if missing:
        raise CissError(f"{masks[missing[0]]}: mask has no image in {root / 'JPEGImages'}")
    sets = root / "ImageSets" / "Segmentation"
    lists = {p.stem: _stems(p) for p in sorted(sets.glob("*.txt"))} if sets.is_dir() else {}
    for name, stems in lists.items():
        unknown = [s for s in stems if s not in masks]
        if unknown:
            raise CissError(f"{sets / (name + '.txt')}: '{unknown[0]}' has no mask in "
                            f"{root / 'SegmentationClass'}")
    train = [s for k, v in lists.items() if _split_of(k) == "train" for s in v]
    val = [s for k, v in lists.items() if _split_of(k) == "val" for s in v]
    has_val = bool(val)
    if not has_val:  # CVAT writes one default.txt: the 90/10 rule splits it
        train, val = hash_split(train if lists else sorted(masks))
    # colours -> ids by binary search over the packed 0xRRGGBB values
    packed = np.array([r << 16 | g << 8 | b for r, g, b in colour_to_id], np.int64)
    order = np.argsort(packed)
    keys, ids = packed[order], np.array(list(colour_to_id.values()), np.uint8)[order]

    def read(stem: str) -> np.ndarray:
        img = open_image(masks[stem])
        if img.mode in ("P", "L"):
            return line_to_id[np.asarray(img, np.uint8)]
        rgb = np.asarray(img.convert("RGB"), np.int64)
        flat = rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]
        pos = np.clip(np.searchsorted(keys, flat), 0, len(keys) - 1)
        hit = keys[pos] == flat
        if not hit.all():
            bad, n = np.unique(flat[~hit], return_counts=True)
            c = int(bad[np.argmax(n)])
            raise CissError(f"{masks[stem]}: colour ({c >> 16},{c >> 8 & 255},{c & 255}) on "
                            f"{int(n.max())} pixels is not in {root / 'labelmap.txt'}"
                            + (f" ({len(bad)} unknown colours in all)" if len(bad) > 1 else ""))
        return ids[pos]

    stems = sorted(set(train) | set(val))
    return RawLayout("cvat", classes, {s: images[s] for s in stems},
                     {s: masks[s] for s in stems}, train, val, has_val, read)


# -- Roboflow "Semantic Segmentation Masks" (png-mask-semantic) ---------------------------
def _roboflow_splits(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/_classes.csv")) + (
        [root] if (root / "_classes.csv").is_file() else [])


def _classes_csv(path: Path) -> dict[int, str]:
    rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    out = {}
    for i, row in enumerate(rows[1:], start=2):  # the first row is the header
        if not row or not "".join(row).strip():
            continue
        try:
            out[int(row[0].strip())] = row[1].strip()
        except (ValueError, IndexError):
            raise CissError(f"{path}: line {i} is not 'Pixel Value, Class' ({row})") from None
    return out


def read_roboflow(root: Path) -> RawLayout:
    """Roboflow's ``<split>/X.jpg`` + ``X_mask.png`` with ``_classes.csv`` (value -> name)."""
    images, masks, luts = {}, {}, {}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    names: list[str] = []
    for folder in _roboflow_splits(root):
        table = _classes_csv(folder / "_classes.csv")
        names += [table[k] for k in sorted(table)]
        split = _split_of(folder.name) if folder != root else "train"
        files = _files(folder)
        for stem, mask in sorted(files.items()):
            if not stem.endswith("_mask"):
                continue
            image_stem = stem[:-len("_mask")]
            if image_stem not in files:
                raise CissError(f"{mask}: mask has no image {image_stem}.* beside it")
            key = f"{folder.name}__{image_stem}" if folder != root else image_stem
            images[key], masks[key] = files[image_stem], mask
            luts[key] = table
            splits[split].append(key)
        orphans = [s for s in files if not s.endswith("_mask") and f"{s}_mask" not in files]
        if orphans:
            raise CissError(f"{files[orphans[0]]}: image has no {orphans[0]}_mask.png")
    classes = _names(names, root)
    lut_cache: dict[int, np.ndarray] = {}

    def read(stem: str) -> np.ndarray:
        table = luts[stem]
        lut = lut_cache.get(id(table))
        if lut is None:
            lut = np.full(256, IGNORE_INDEX, np.uint8)
            for value, name in table.items():
                lut[value] = 0 if name.lower() == BACKGROUND else classes.index(name)
            lut_cache[id(table)] = lut
        img = open_image(masks[stem])
        if img.mode not in ("L", "P"):
            raise CissError(f"{masks[stem]}: a png-mask-semantic mask is single-channel, found "
                            f"mode {img.mode}")
        raw = np.asarray(img, np.uint8)
        unknown = sorted(set(np.unique(raw).tolist()) - set(table) - {IGNORE_INDEX})
        if unknown:
            raise CissError(f"{masks[stem]}: pixel values {unknown[:5]} are not in _classes.csv")
        return lut[raw]

    train, val = splits["train"], splits["val"] or splits["test"]
    has_val = bool(val)
    if not has_val:
        train, val = hash_split(train)
    return RawLayout("roboflow", classes, images, masks, train, val, has_val, read)


# -- Cityscapes ---------------------------------------------------------------------------
# (name, id, train id) of cityscapesscripts' labels.py; train id 255 = not an evaluation class
CITYSCAPES = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8),
    ("terrain", 22, 9), ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12),
    ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15), ("caravan", 29, 255),
    ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
)
# pixels that show no scene at all: never supervised
CITYSCAPES_VOID = {"ego vehicle", "rectification border", "out of roi"}


def read_cityscapes(root: Path) -> RawLayout:
    """``gtFine/<split>/<city>/*_gtFine_labelIds.png`` with ``leftImg8bit/<split>/<city>/
    *_leftImg8bit.png``: the 19 evaluation classes by their official names; the other labels
    are background, except the void ones (ego vehicle, rectification border, out of roi:
    255)."""
    evaluated = sorted((t, n) for n, _, t in CITYSCAPES if t != 255)
    classes = ClassList((BACKGROUND,) + tuple(n for _, n in evaluated))
    lut = np.full(256, IGNORE_INDEX, np.uint8)
    for name, label_id, train_id in CITYSCAPES:
        lut[label_id] = (IGNORE_INDEX if name in CITYSCAPES_VOID else
                         0 if train_id == 255 else classes.index(name))
    images, masks = {}, {}
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for mask in sorted((root / "gtFine").glob("*/*/*_gtFine_labelIds.png")):
        split, city = mask.parent.parent.name, mask.parent.name
        base = mask.name[:-len("_gtFine_labelIds.png")]
        image = root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png"
        if not image.is_file():
            raise CissError(f"{mask}: no image {image}")
        images[base], masks[base] = image, mask
        splits[_split_of(split)].append(base)
    if not masks:
        raise CissError(f"{root / 'gtFine'}: no <split>/<city>/*_gtFine_labelIds.png masks")

    def read(stem: str) -> np.ndarray:
        img = open_image(masks[stem])
        if img.mode not in ("L", "P"):
            raise CissError(f"{masks[stem]}: labelIds masks are single-channel, found mode "
                            f"{img.mode}")
        return lut[np.asarray(img, np.uint8)]

    train, val = splits["train"], splits["val"]
    has_val = bool(val)
    if not has_val:
        train, val = hash_split(train)
    return RawLayout("cityscapes", classes, images, masks, train, val, has_val, read)


# -- helpers --------------------------------------------------------------------------------
def _files(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, Path]:
    if not folder.is_dir():
        raise CissError(f"{folder}: missing")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("_"):
            if p.stem in out:
                raise CissError(f"{p}: two files share the stem '{p.stem}' ({out[p.stem].name})")
            out[p.stem] = p
    return out


def _stems(path: Path) -> list[str]:
    return [s.strip().split()[0] for s in path.read_text(encoding="utf-8").splitlines()
            if s.strip()]
