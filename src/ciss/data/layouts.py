"""What annotation tools export, read into ciss's one representation: images, a uint8 index
mask per image (255 = ignore) and an ordered class list, always matched by name.

| layout     | detected by                                     | masks                          |
|------------|-------------------------------------------------|--------------------------------|
| coco       | ``annotations/*.json`` + ``images/``, or        | polygons / RLE rasterised with |
|            | Roboflow's ``<split>/_annotations.coco.json``   | pycocotools                    |
| cvat       | ``labelmap.txt`` + ``SegmentationClass/``       | RGB colours via the labelmap   |
| roboflow   | ``<split>/_classes.csv`` + ``*_mask.png``       | index PNGs, names from the CSV |
| cityscapes | ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` | official label ids -> names    |
| label-     | a ``*.json`` task list (Label Studio's JSON     | brush RLE (label-studio-       |
| studio     | export) + its images beside it or in images/    | converter), polygons (pycoco)  |

Choices (docs/decisions.md): COCO pixels covered by two or more instances become 255 (ignore),
as torchvision's COCO reference does, whatever their classes; crowd regions (``iscrowd``) are
labelled like any other instance; a category no annotation uses is dropped (Roboflow's root
category). A colour that is not in a CVAT labelmap is an error naming the file, the colour and
its pixel count. Without a train/val split in the export, the deterministic 90/10 rule applies.
Label Studio: a task's annotation is its ground-truth one, else its last one not cancelled;
regions marked ``readonly`` are skipped (``ciss collect export`` writes the served model's own
predictions so, as context annotators cannot change: they are not annotations); pixels two
regions of different classes cover become 255, as in COCO.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ciss.data.classes import BACKGROUND, IGNORE_INDEX, ClassList
from ciss.data.imageio import image_size, open_image
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
    if _label_studio_files(root):
        return read_label_studio
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


# -- Label Studio JSON export ----------------------------------------------------------
LS_REGIONS = ("brushlabels", "polygonlabels")


def _label_studio_files(root: Path) -> list[Path]:
    """``*.json`` in ``root`` holding a Label Studio task list (dicts with ``data`` and
    ``annotations`` or ``predictions``)."""
    found = []
    for p in sorted(root.glob("*.json")):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (isinstance(doc, list) and doc and isinstance(doc[0], dict) and "data" in doc[0]
                and ("annotations" in doc[0] or "predictions" in doc[0])):
            found.append(p)
    return found


def _ls_annotation(task: dict) -> dict | None:
    """The task's ground-truth annotation, else its last one not cancelled, else None."""
    done = [a for a in task.get("annotations") or [] if isinstance(a, dict)
            and not a.get("was_cancelled")]
    truth = [a for a in done if a.get("ground_truth")]
    return (truth or done or [None])[-1]


def _ls_image(root: Path, url: str, where: str) -> Path:
    """The file a task's image URL names: ``/data/local-files/?d=PATH``, an upload
    (``/data/upload/<project>/<8 hex>-NAME``) or any URL, looked for under ``root``."""
    import re
    from urllib.parse import parse_qs, unquote, urlparse

    u = urlparse(url)
    query = parse_qs(u.query)
    rel = unquote(query["d"][0]) if "d" in query else unquote(u.path)
    name = Path(rel).name
    names = [name] + ([m.group(1)] if (m := re.match(r"^[0-9a-f]{8}-(.+)$", name)) else [])
    tried = [Path(rel)] if Path(rel).is_absolute() else [root / rel.lstrip("/")]
    tried += [root / d / n for n in names for d in ("images", ".")]
    for p in tried:
        if p.is_file():
            return p
    raise CissError(f"{where}: image {url!r} not found; put the images beside the JSON or "
                    f"in {root / 'images'} (looked for {', '.join(str(p) for p in tried)})")


def _ls_region(region: dict, h: int, w: int, where: str) -> np.ndarray:
    """One brush or polygon region as a boolean HxW mask."""
    value = region.get("value") or {}
    try:
        if region["type"] == "brushlabels":
            from label_studio_converter.brush import decode_rle

            rgba = decode_rle(value["rle"])
            if rgba.size != h * w * 4:
                raise ValueError(f"its RLE holds {rgba.size // 4} pixels, the image {h * w}")
            return rgba.reshape(h, w, 4)[..., 3] >= 128
        from pycocotools import mask as mask_utils

        pts = np.asarray(value["points"], np.float64) * [w / 100.0, h / 100.0]
        if len(pts) < 3:
            raise ValueError("a polygon needs 3 points")
        rle = mask_utils.frPyObjects([pts.ravel().tolist()], h, w)
        return mask_utils.decode(mask_utils.merge(rle)).astype(bool)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise CissError(f"{where}: region {region.get('id')!r} ({region.get('type')}) cannot "
                        f"be read ({exc})") from exc


def read_label_studio(root: Path) -> RawLayout:
    """Label Studio's JSON export (every task list in ``root``); brush and polygon regions,
    classes by their label names (module docstring for the rules)."""
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    regions: dict[str, tuple[list[dict], str]] = {}
    names: list[str] = []
    files = _label_studio_files(root)
    unannotated = 0
    for path in files:
        for n, task in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            if not isinstance(task, dict):
                raise CissError(f"{path}: item {n} is not a task object (Label Studio's JSON "
                                "export is a list of tasks)")
            where = f"{path}: task {task.get('id', n)}"
            ann = _ls_annotation(task)
            if ann is None:
                unannotated += 1
                continue
            data = task.get("data") or {}
            url = data.get("image") or next((v for v in data.values() if isinstance(v, str)),
                                            None)
            if not url:
                raise CissError(f"{where}: no image URL in its 'data'")
            file = _ls_image(root, url, where)
            if file.stem in images:
                raise CissError(f"{where}: its image {file.name} is also the image of a task "
                                f"in {regions[file.stem][1]}; keep one task per image")
            kept = [r for r in ann.get("result") or [] if isinstance(r, dict)
                    and r.get("type") in LS_REGIONS and not r.get("readonly")]
            for r in kept:
                labels = [str(x).strip() for x in (r.get("value") or {}).get(r["type"]) or []]
                if not labels or not all(labels):
                    raise CissError(f"{where}: region {r.get('id')!r} has no label name")
                names += labels
            images[file.stem], masks[file.stem] = file, path
            regions[file.stem] = (kept, where)
    if not images:
        raise CissError(f"{files[0]}: no task has an annotation ({unannotated} task(s) without "
                        "one); import it into Label Studio, annotate, then export as JSON")
    classes = _names(names, root)

    def read(stem: str) -> np.ndarray:
        kept, where = regions[stem]
        h, w = image_size(images[stem], exif=True)  # as the browser showed it to the annotator
        label = np.zeros((h, w), np.uint8)
        owner = np.full((h, w), -1, np.int16)
        for r in kept:
            size = (r.get("original_width"), r.get("original_height"))
            if size != (w, h):
                raise CissError(f"{where}: region {r.get('id')!r} was drawn on a {size[0]}x"
                                f"{size[1]} image but {images[stem]} is {w}x{h}")
            m = _ls_region(r, h, w, where)
            for name in (r.get("value") or {}).get(r["type"]) or []:
                cid = 0 if str(name).strip().lower() == BACKGROUND else classes.index(
                    str(name).strip())
                clash = m & (owner >= 0) & (owner != cid)
                owner[m & (owner < 0)] = cid
                label[m] = cid
                label[clash] = IGNORE_INDEX  # two classes claim it: not supervised
                owner[clash] = IGNORE_INDEX
        label[owner == IGNORE_INDEX] = IGNORE_INDEX
        return label

    train, val = hash_split(sorted(images))
    return RawLayout("label-studio", classes, images, masks, train, val, False, read)


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
