"""Dataset folders, validated before anything is trained.

Layouts: the ciss layout, Pascal VOC, and what annotation tools export (COCO instances JSON,
CVAT "Segmentation mask 1.1", Roboflow png-mask-semantic, Cityscapes; see ``data/layouts``).
Every layout becomes the same thing: images, a uint8 index mask per image (255 = ignore) and an
ordered class list; classes are always matched by name.

A folder is read once: every image and mask is decoded, checked, and (when the folder is small
enough) kept in memory so that training epochs never decode again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ciss.data.classes import IGNORE_INDEX, ClassList
from ciss.data.imageio import image_size, read_image, read_mask
from ciss.data.layouts import IMAGE_SUFFIXES, detect
from ciss.data.splits import hash_split
from ciss.errors import CissError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
CACHE_BUDGET_BYTES = 2 << 30  # decoded pixels kept in memory for small folders


@dataclass
class DatasetFolder:
    """A validated dataset folder.

    Attributes:
        root: the folder.
        classes: its class list (ids are positions in this list).
        images: stem -> image path; masks: stem -> mask path.
        train, val: stems of each split.
        has_val_list: whether the folder names its val split explicitly.
        presence: stem -> ids of the classes with at least one pixel in its mask (255 excluded).
        layout: "ciss", "voc", "coco", "cvat", "roboflow", "cityscapes" or "label-studio".
        mask_reader: stem -> uint8 index mask, for layouts whose masks are not index PNGs
            (None: ``masks`` are 8-bit index or palette PNGs).
        pixels: stem -> pixel count per class id (length = number of classes; 255 excluded).
        shapes: stem -> (height, width) of its image.
        exif: images are read in their EXIF orientation (as displayed; the default) or, when
            False, as stored (for tools that annotated the raw pixels): ``ciss.json`` in the
            folder says ``{"exif": "ignore"}``, or ``--exif ignore``.
    """

    root: Path
    classes: ClassList
    images: dict[str, Path]
    masks: dict[str, Path]
    train: list[str]
    val: list[str]
    has_val_list: bool
    presence: dict[str, frozenset[int]]
    layout: str = "ciss"
    mask_reader: Callable[[str], np.ndarray] | None = field(default=None, repr=False)
    pixels: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)
    exif: bool = True
    _cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def load(self, stem: str) -> tuple[np.ndarray, np.ndarray]:
        """Image (uint8 HxWx3 RGB) and mask (uint8 HxW) of one sample."""
        if stem in self._cache:
            return self._cache[stem]
        return read_image(self.images[stem], exif=self.exif), self.read_mask(stem)

    def read_mask(self, stem: str) -> np.ndarray:
        """The uint8 index mask of one sample (decoded from whatever the layout stores)."""
        if self.mask_reader is not None:
            return self.mask_reader(stem)
        return read_mask(self.masks[stem])

    @property
    def cached(self) -> bool:
        """Whether every decoded image and mask is held in memory."""
        return bool(self._cache) and len(self._cache) == len(self.images)

    def fingerprint(self) -> str:
        """A short hash of the class list, split lists and file sizes (identifies the data)."""
        h = hashlib.sha256()
        h.update("\n".join(self.classes.names).encode())
        for split in (self.train, self.val):
            h.update(("|".join(split)).encode())
        for stem in sorted(self.images):
            h.update(f"{stem}:{self.images[stem].stat().st_size}:"
                     f"{self.masks[stem].stat().st_size}".encode())
        return h.hexdigest()[:16]

    def class_pixels(self, stems: list[str]) -> np.ndarray:
        """Pixels of each class id over ``stems`` (int64, one entry per class)."""
        total = np.zeros(len(self.classes), dtype=np.int64)
        for stem in stems:
            total += self.pixels[stem]
        return total

    def class_counts(self, stems: list[str]) -> dict[str, int]:
        """Number of images in ``stems`` showing each class."""
        counts = dict.fromkeys(self.classes.names, 0)
        for stem in stems:
            for c in self.presence[stem]:
                counts[self.classes.names[c]] += 1
        return counts


def folder_exif(root: Path, exif: str | None) -> bool:
    """True to apply EXIF orientation: ``exif`` when given, else the folder's ``ciss.json``.

    Raises:
        CissError: an unknown value, or an unreadable ``ciss.json``.
    """
    if exif is None and (root / "ciss.json").is_file():
        try:
            exif = json.loads((root / "ciss.json").read_text()).get("exif", "apply")
        except (OSError, ValueError, AttributeError) as exc:
            raise CissError(f"{root / 'ciss.json'}: not a JSON object ({exc})") from exc
    if exif not in (None, "apply", "ignore"):
        raise CissError(f"exif: '{exif}'; choose apply or ignore")
    return exif != "ignore"


def open_folder(path: Path | str, *, cache: bool = True, require_train: bool = True,
                problems: list[str] | None = None, exif: str | None = None,
                shard: tuple[int, int] | None = None) -> DatasetFolder:
    """Open and validate a dataset folder (ciss layout or Pascal VOC layout).

    Args:
        path: the folder (for VOC: the VOC2012 folder or a VOCdevkit above it).
        cache: keep decoded pixels in memory when they fit the cache budget.
        require_train: refuse a folder whose train split is empty (training data).
        exif: "apply" or "ignore" the images' EXIF orientation; None: what the folder's
            ``ciss.json`` says, else "apply".
        problems: when given, a sample with a problem is left out and its problem appended
            here instead of raised (``ciss data check`` lists them all); problems with the
            folder as a whole are still raised.
        shard: (rank, world size) under torchrun. Rank 0 reads everything as without it;
            another rank decodes (and keeps in memory) only the images of its shard of the
            train split, positions ``rank::world`` (those the training sampler gives it),
            and reads the others' sizes from their headers. Every mask is read on every
            rank: class presence and pixel counts stay those of the whole folder.

    Raises:
        CissError: naming the file and the problem; nothing is written anywhere.
    """
    root = Path(path)
    if not root.exists():
        raise CissError(f"{root}: no such dataset folder")
    if not root.is_dir():
        raise CissError(f"{root}: is a file, expected a dataset folder")
    apply_exif = folder_exif(root, exif)
    tool = detect(root)
    voc_root = _find_voc_root(root)
    if tool is not None:
        raw = tool(root)
        folder = _validate(root, raw.classes, raw.images, raw.masks, raw.train, raw.val,
                           raw.has_val, raw.name, cache, raw.read_mask, problems, apply_exif,
                           shard)
    elif voc_root is not None and not (root / "images").is_dir():
        folder = _open_voc(voc_root, cache, problems, apply_exif, shard)
    else:
        folder = _open_ciss(root, cache, problems, apply_exif, shard)
    if require_train and not folder.train:
        raise CissError(f"{root}: the train split is empty")
    return folder


def _find_voc_root(root: Path) -> Path | None:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "ImageSets" / "Segmentation").is_dir():
            return cand
    return None


def _list_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes:
            if p.stem in files:
                raise CissError(f"{p}: two files share the stem '{p.stem}' ({files[p.stem].name})")
            files[p.stem] = p
    return files


def _read_list(path: Path, known: dict[str, Path]) -> list[str]:
    stems = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    missing = [s for s in stems if s not in known]
    if missing:
        raise CissError(f"{path}: names {len(missing)} stems with no image/mask pair, "
                        f"e.g. '{missing[0]}'")
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise CissError(f"{path}: stem '{dup}' is listed twice")
    return stems


def _open_ciss(root: Path, cache: bool, problems: list[str] | None = None,
               exif: bool = True, shard: tuple[int, int] | None = None) -> DatasetFolder:
    for required in ("classes.txt", "images", "masks"):
        if not (root / required).exists():
            raise CissError(f"{root / required}: missing (a dataset folder holds classes.txt, "
                            "images/ and masks/; see docs/data.md)")
    classes = ClassList.from_file(root / "classes.txt")
    images = _list_files(root / "images", IMAGE_SUFFIXES)
    masks = _list_files(root / "masks", (".png",))
    for stem, p in images.items():
        if stem not in masks:
            lossy = sorted((root / "masks").glob(f"{stem}.jp*g"))
            if lossy:  # JPEG blurs label ids at every edge: no mask can be read from it
                raise CissError(f"{lossy[0]}: masks must be PNG; JPEG is lossy and changes "
                                "class ids along every edge. Save the label ids as an 8-bit "
                                f"PNG ({root / 'masks' / (stem + '.png')}) from the tool's "
                                "original export")
            raise CissError(f"{p}: has no mask (expected {root / 'masks' / (stem + '.png')})")
    for stem, p in masks.items():
        if stem not in images:
            raise CissError(f"{p}: mask has no image in {root / 'images'}")
    if not images:
        raise CissError(f"{root / 'images'}: no images")
    has_val = (root / "val.txt").exists()
    if (root / "train.txt").exists() or has_val:
        train = _read_list(root / "train.txt", images) if (root / "train.txt").exists() else []
        val = _read_list(root / "val.txt", images) if has_val else []
        if not (root / "train.txt").exists():
            train = sorted(set(images) - set(val))
        both = set(train) & set(val)
        if both:
            raise CissError(f"{root / 'val.txt'}: stem '{sorted(both)[0]}' is also in train.txt")
    else:
        train, val = hash_split(list(images))
    if not train and not val:
        raise CissError(f"{root}: both splits are empty")
    stems = sorted(set(train) | set(val))
    return _validate(root, classes, {s: images[s] for s in stems}, {s: masks[s] for s in stems},
                     train, val, has_val, "ciss", cache, None, problems, exif, shard)


def _open_voc(root: Path, cache: bool, problems: list[str] | None = None,
              exif: bool = True, shard: tuple[int, int] | None = None) -> DatasetFolder:
    classes = (ClassList.from_file(root / "classes.txt") if (root / "classes.txt").exists()
               else ClassList(VOC_CLASSES))
    mask_dir = root / "SegmentationClassAug"
    if not mask_dir.is_dir():
        mask_dir = root / "SegmentationClass"
    if not mask_dir.is_dir():
        raise CissError(f"{root}: VOC layout without SegmentationClass/ masks")
    images = _list_files(root / "JPEGImages", IMAGE_SUFFIXES)
    masks = _list_files(mask_dir, (".png",))
    sets = root / "ImageSets" / "Segmentation"
    # VOC ships far more JPEGs than masks: only listed stems are samples.
    paired = {s: images[s] for s in masks if s in images}
    train_file = sets / "train_aug.txt" if (sets / "train_aug.txt").exists() else sets / "train.txt"
    if not train_file.exists() or not (sets / "val.txt").exists():
        raise CissError(f"{sets}: VOC layout needs train.txt (or train_aug.txt) and val.txt")
    train = _read_list(train_file, paired)
    val = _read_list(sets / "val.txt", paired)
    train = [s for s in train if s not in set(val)]
    stems = sorted(set(train) | set(val))
    return _validate(root, classes, {s: images[s] for s in stems}, {s: masks[s] for s in stems},
                     train, val, True, "voc", cache, None, problems, exif, shard)


def _check_pair(stem: str, image_path: Path, mask_path: Path, n_classes: int,
                mask_reader: Callable[[str], np.ndarray] | None = None, exif: bool = True,
                decode: bool = True):
    """(stem, image or None, mask, classes present, pixel counts) after the checks; with
    ``decode`` False the image's size comes from its header and no pixel is decoded."""
    image = read_image(image_path, exif=exif) if decode else None
    size = image.shape[:2] if decode else image_size(image_path, exif=exif)
    mask = mask_reader(stem) if mask_reader is not None else read_mask(mask_path)
    if size != mask.shape:
        hint = ""
        if mask.shape == size[::-1]:
            other = "ignore" if exif else "apply"
            hint = (f"; it matches the image turned by its EXIF orientation: the annotation "
                    f"tool used the other orientation, so pass --exif {other} (or put "
                    f'{{"exif": "{other}"}} in ciss.json)')
        raise CissError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                        f"{image_path.name} is {size[1]}x{size[0]}{hint}")
    values = np.unique(mask)
    bad = [int(v) for v in values if v >= n_classes and v != IGNORE_INDEX]
    if bad:
        raise CissError(f"{mask_path}: mask values {bad[:5]} are not class ids of classes.txt "
                        f"(0..{n_classes - 1}, 255 = ignore)")
    present = frozenset(int(v) for v in values if v != IGNORE_INDEX)
    counts = np.bincount(mask.ravel(), minlength=256)[:n_classes].astype(np.int64)
    return stem, image, mask, present, counts


def _validate(root, classes, images, masks, train, val, has_val, layout, cache,
              mask_reader=None, problems: list[str] | None = None,
              exif: bool = True, shard: tuple[int, int] | None = None) -> DatasetFolder:
    stems = sorted(images)
    # under torchrun a rank other than 0 decodes only its shard of the train split
    own = (set(train[shard[0]::shard[1]]) if shard is not None and shard[0] > 0
           and shard[1] > 1 else None)

    def check(stem):
        try:
            return _check_pair(stem, images[stem], masks[stem], len(classes), mask_reader,
                               exif, decode=own is None or stem in own)
        except CissError as exc:
            if problems is None:
                raise
            problems.append(str(exc))
            return None

    presence: dict[str, frozenset[int]] = {}
    pixels: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple[int, int]] = {}
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    budget = CACHE_BUDGET_BYTES if cache else 0
    used = 0
    # PIL decoding releases the GIL: two threads use both cores of a small machine.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for result in pool.map(check, stems):
            if result is None:
                continue
            stem, image, mask, present, counts = result
            presence[stem] = present
            pixels[stem] = counts
            shapes[stem] = mask.shape
            if image is None:  # another rank's image: its size was checked, not its pixels
                continue
            size = image.nbytes + mask.nbytes
            if used + size <= budget:
                kept[stem] = (image, mask)
                used += size
    if used and len(kept) < len(presence if own is None else own):
        kept = {}  # a partial cache would make epochs uneven; decode everything on demand
    if len(presence) < len(stems):  # samples with problems (reported) are left out
        images = {s: p for s, p in images.items() if s in presence}
        masks = {s: p for s, p in masks.items() if s in presence}
        train = [s for s in train if s in presence]
        val = [s for s in val if s in presence]
    return DatasetFolder(root=root, classes=classes, images=images, masks=masks, train=train,
                         val=val, has_val_list=has_val, presence=presence, layout=layout,
                         mask_reader=mask_reader, pixels=pixels, shapes=shapes, exif=exif,
                         _cache=kept)
