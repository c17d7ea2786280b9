"""The foreign-data suite: dataset folders unlike `ciss data synthetic`, built offline from the
photographs scikit-image ships (textures, objects and backgrounds are crops of real photos).

Each dataset is a full-label ciss folder (classes.txt, images/, masks/, train.txt, val.txt) and
stresses one thing the synthetic world does not:

| name        | what it stresses                                                            |
|-------------|-----------------------------------------------------------------------------|
| small       | small objects (~1-3 % of the pixels per class), JPEG, 64-112 px, unlabelled |
|             | look-alikes (a class's texture on another shape) = background             |
| imbalance   | large objects, class frequencies 1:50, 64 px                                |
| sizes-grey  | grey images, 48-640 px sides, aspect ratios 1:2 to 2:1                      |
| many        | 32 classes (8 photo textures x 4 shapes), 64 px                             |
| few         | 80 training images, 64-80 px                                                |

``TUNE`` names the datasets the default recipe was tuned on; the others are held out and only
reported (BENCHMARKS.md §1). Usage: ``python benchmarks/foreign_suite.py --out DIR [--small]``
writes every dataset; tests call :func:`write_dataset` with ``scale`` < 1 for tiny versions.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Photographs used as object textures and as backgrounds; kept apart so that a background never
# shows an object texture by accident (look-alikes are added on purpose instead).
OBJECT_PHOTOS = ("brick", "grass", "gravel", "coffee", "chelsea", "hubble_deep_field",
                 "immunohistochemistry", "retina", "coins", "moon", "text", "cell")
BACKGROUND_PHOTOS = ("astronaut", "rocket", "camera", "page", "motorcycle")
SHAPES = ("ellipse", "rectangle", "triangle", "star", "ring", "cross", "horse")


@dataclass(frozen=True)
class ForeignSpec:
    """One dataset of the suite.

    Attributes:
        name: folder name.
        n_classes: object classes (background excluded).
        n_train, n_val: images per split.
        sides: range of the longer image side in pixels.
        aspect: range of width / height.
        grey: save single-channel images.
        area: range of one object's area as a fraction of the image.
        objects: range of labelled objects per image.
        lookalikes: range of unlabelled look-alike objects per image.
        rarity: frequency ratio of the most to the least common class (1 = uniform).
        new: classes added by the overlap add-classes step (the last ``new`` ones).
        jpeg: save images as JPEG (quality 90) instead of PNG.
        seed: the dataset depends only on its seed.
    """

    name: str
    n_classes: int
    n_train: int
    n_val: int
    sides: tuple[int, int] = (64, 112)
    aspect: tuple[float, float] = (1.0, 1.0)
    grey: bool = False
    area: tuple[float, float] = (0.04, 0.12)
    objects: tuple[int, int] = (1, 3)
    lookalikes: tuple[int, int] = (0, 0)
    rarity: float = 1.0
    new: int = 2
    jpeg: bool = True
    seed: int = 0


SUITE = {
    "small": ForeignSpec("small", 5, 420, 120, area=(0.07, 0.14), objects=(1, 3),
                         lookalikes=(1, 2), new=2, seed=11),
    "imbalance": ForeignSpec("imbalance", 8, 500, 150, sides=(64, 64), area=(0.10, 0.25),
                             objects=(1, 2), rarity=50.0, new=2, seed=12),
    "sizes-grey": ForeignSpec("sizes-grey", 6, 300, 90, sides=(48, 640), aspect=(0.5, 2.0),
                              grey=True, area=(0.05, 0.14), objects=(1, 3), new=2, seed=13),
    "many": ForeignSpec("many", 32, 900, 200, sides=(64, 64), area=(0.06, 0.14),
                        objects=(2, 4), new=8, seed=14),
    "few": ForeignSpec("few", 6, 80, 80, sides=(64, 80), area=(0.05, 0.15), objects=(1, 3),
                       new=2, seed=15),
}
TUNE = ("small", "imbalance")  # tuned on; the rest of the suite is held out


@cache
def _photo(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as float32 RGB in [0, 1]."""
    try:
        from skimage import data
    except ImportError as exc:  # the dev extra brings it
        raise SystemExit("the foreign-data suite needs scikit-image: pip install -e '.[dev]'"
                         ) from exc
    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    img = np.asarray(img, dtype=np.float32)
    if img.max() > 1.0:
        img = img / 255.0
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


@cache
def _horse() -> np.ndarray:
    from skimage import data

    h = ~np.asarray(data.horse(), dtype=bool)  # True on the horse
    ys, xs = np.nonzero(h)
    return h[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _crop(photo: np.ndarray, h: int, w: int, rng: np.random.Generator,
          zoom: tuple[float, float] = (0.6, 1.6)) -> np.ndarray:
    """A random h x w window of ``photo`` at a random zoom."""
    ph, pw = photo.shape[:2]
    f = rng.uniform(*zoom)
    ch, cw = min(ph, max(4, round(h / f))), min(pw, max(4, round(w / f)))
    y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    win = (photo[y:y + ch, x:x + cw] * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(win).resize((w, h), Image.BILINEAR),
                      dtype=np.float32) / 255.0


def _shape(shape: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean h x w mask of ``shape`` filling its box, rotated at random."""
    if shape == "horse":
        m = Image.fromarray(_horse().astype(np.uint8) * 255)
    else:
        s = 64
        m = Image.new("L", (s, s), 0)
        d = ImageDraw.Draw(m)
        if shape == "ellipse":
            d.ellipse([2, 10, s - 3, s - 11], fill=255)
        elif shape == "rectangle":
            d.rectangle([6, 14, s - 7, s - 15], fill=255)
        elif shape == "triangle":
            d.polygon([(s / 2, 3), (s - 3, s - 6), (3, s - 6)], fill=255)
        elif shape == "star":
            pts = [(s / 2 + (s / 2 - 2) * (1 if k % 2 == 0 else 0.42) * np.sin(k * np.pi / 5),
                    s / 2 - (s / 2 - 2) * (1 if k % 2 == 0 else 0.42) * np.cos(k * np.pi / 5))
                   for k in range(10)]
            d.polygon(pts, fill=255)
        elif shape == "ring":
            d.ellipse([2, 2, s - 3, s - 3], fill=255)
            d.ellipse([s * 0.3, s * 0.3, s * 0.7, s * 0.7], fill=0)
        elif shape == "cross":
            d.rectangle([s * 0.36, 2, s * 0.64, s - 3], fill=255)
            d.rectangle([2, s * 0.36, s - 3, s * 0.64], fill=255)
        else:
            raise ValueError(shape)
    m = m.rotate(float(rng.uniform(0, 360)), resample=Image.NEAREST, expand=True)
    return np.asarray(m.resize((w, h), Image.NEAREST)) > 127


def class_table(spec: ForeignSpec) -> list[tuple[str, str, tuple[float, float, float]]]:
    """(texture photo, shape, tint) per class: every class a distinct pair.

    Classes cycle through textures first, then shapes, so neighbouring classes differ in
    texture and classes sharing a texture differ in shape: the model must learn both.
    """
    n_tex = min(len(OBJECT_PHOTOS), max(2, int(np.ceil(np.sqrt(spec.n_classes * 2)))))
    rng = np.random.default_rng(spec.seed)
    tints = rng.uniform(0.7, 1.0, size=(n_tex, 3))  # mild casts: objects blend in
    table = []
    for k in range(spec.n_classes):
        tex, shape = k % n_tex, (k // n_tex + k % n_tex) % (len(SHAPES) - 1)  # horse: look-alikes
        table.append((OBJECT_PHOTOS[tex], SHAPES[shape], tuple(float(t) for t in tints[tex])))
    if len({(t, s) for t, s, _ in table}) != len(table):
        raise ValueError(f"{spec.name}: two classes share texture and shape")
    return table


def class_weights(spec: ForeignSpec) -> np.ndarray:
    """Sampling probability of each class: geometric from 1 down to 1/rarity.

    Rare and common classes alternate so that both the base and the added classes hold some.
    """
    order = np.arange(spec.n_classes)
    order = np.concatenate([order[0::2], order[1::2]])  # 0,2,4,.. common; 1,3,5,.. rare
    ranks = np.empty(spec.n_classes)
    ranks[order] = np.arange(spec.n_classes) / max(1, spec.n_classes - 1)
    w = spec.rarity ** (-ranks)
    return w / w.sum()


def _paste(img, mask, value, box_mask, texture, y, x) -> None:
    h, w = box_mask.shape
    H, W = mask.shape
    y0, x0, y1, x1 = max(0, y), max(0, x), min(H, y + h), min(W, x + w)
    if y1 <= y0 or x1 <= x0:
        return
    m = box_mask[y0 - y:y1 - y, x0 - x:x1 - x]
    img[y0:y1, x0:x1][m] = texture[y0 - y:y1 - y, x0 - x:x1 - x][m]
    if value is not None:
        mask[y0:y1, x0:x1][m] = value


def _object(spec, table, cls, H, W, rng, shape=None):
    """Texture and box mask of one object of class ``cls`` (optionally another shape)."""
    tex, own_shape, tint = table[cls]
    area = rng.uniform(*spec.area) * H * W
    aspect = rng.uniform(0.7, 1.4)
    h = max(4, round(np.sqrt(area / aspect) * 1.15))
    w = max(4, round(np.sqrt(area * aspect) * 1.15))
    texture = _crop(_photo(tex), h, w, rng) * np.asarray(tint, dtype=np.float32)
    return texture, _shape(shape or own_shape, h, w, rng)


def make_image(spec: ForeignSpec, index: int) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 HxWx3, or HxW when grey) and its full-label mask."""
    rng = np.random.default_rng([spec.seed, index])
    table, weights = class_table(spec), class_weights(spec)
    side = int(round(np.exp(rng.uniform(np.log(spec.sides[0]), np.log(spec.sides[1] + 1)))))
    aspect = float(np.exp(rng.uniform(np.log(spec.aspect[0]), np.log(spec.aspect[1]))))
    W, H = (side, max(8, round(side / aspect))) if aspect >= 1 else (max(8, round(side * aspect)),
                                                                      side)
    bg = BACKGROUND_PHOTOS[int(rng.integers(len(BACKGROUND_PHOTOS)))]
    img = _crop(_photo(bg), H, W, rng, zoom=(0.3, 1.2))
    mask = np.zeros((H, W), dtype=np.uint8)
    # look-alikes first, so labelled objects may occlude them (never the reverse: a labelled
    # pixel is always what it shows)
    for _ in range(int(rng.integers(spec.lookalikes[0], spec.lookalikes[1] + 1))):
        cls = int(rng.integers(spec.n_classes))
        texture, box = _object(spec, table, cls, H, W, rng, shape="horse")
        _paste(img, mask, None, box, texture, int(rng.integers(-box.shape[0] // 3, H)),
               int(rng.integers(-box.shape[1] // 3, W)))
    for _ in range(int(rng.integers(spec.objects[0], spec.objects[1] + 1))):
        cls = int(rng.choice(spec.n_classes, p=weights))
        texture, box = _object(spec, table, cls, H, W, rng)
        bh, bw = box.shape
        _paste(img, mask, cls + 1, box, texture, int(rng.integers(-bh // 4, max(1, H - bh // 2))),
               int(rng.integers(-bw // 4, max(1, W - bw // 2))))
    img = np.clip(img + rng.normal(0, 0.02, img.shape).astype(np.float32), 0, 1)
    out = (img * 255).round().astype(np.uint8)
    if spec.grey:
        out = np.asarray(Image.fromarray(out).convert("L"))
    return out, mask


def class_names(spec: ForeignSpec) -> list[str]:
    return ["background"] + [f"{t.split('_')[0]}-{s}" for t, s, _ in class_table(spec)]


def write_dataset(spec: ForeignSpec, out: Path, scale: float = 1.0) -> Path:
    """Write ``spec`` as a full-label ciss folder under ``out/spec.name``.

    Args:
        scale: fraction of the images to write (tests use ~0.1).
    """
    from ciss.data.imageio import write_mask

    root = Path(out) / spec.name
    (root / "images").mkdir(parents=True, exist_ok=False)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(class_names(spec)) + "\n")
    n_train = max(8, round(spec.n_train * scale))
    n_val = max(8, round(spec.n_val * scale))
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        stem = f"{split}_{i:05d}"
        image, mask = make_image(spec, i)
        pil = Image.fromarray(image)
        if spec.jpeg:
            pil.save(root / "images" / f"{stem}.jpg", quality=90)
        else:
            pil.save(root / "images" / f"{stem}.png", compress_level=1)
        write_mask(root / "masks" / f"{stem}.png", mask)
        splits[split].append(stem)
    for split, stems in splits.items():
        (root / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return root


def scenario_for(spec: ForeignSpec) -> str:
    """The overlap add-classes scenario: base classes, then the last ``new`` in one step."""
    return f"{spec.n_classes - spec.new}-{spec.new}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=list(SUITE))
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    from ciss.data.folder import open_folder
    from ciss.data.scenarios import parse_scenario, write_split

    for name in args.only:
        spec = SUITE[name]
        root = write_dataset(replace(spec), args.out, args.scale)
        folder = open_folder(root)
        write_split(folder, parse_scenario(scenario_for(spec)), args.out / f"{name}-split")
        share = {}
        for s in folder.train:
            m = folder.load(s)[1]
            for c, n in zip(*np.unique(m, return_counts=True)):
                share[int(c)] = share.get(int(c), 0) + int(n)
        total = sum(share.values())
        print(f"{name}: {len(folder.train)} train / {len(folder.val)} val, "
              f"{spec.n_classes} classes, background {share.get(0, 0) / total:.1%}, "
              f"object classes {min(v for k, v in share.items() if k) / total:.2%}"
              f"-{max(v for k, v in share.items() if k) / total:.2%} of the pixels")


if __name__ == "__main__":
    main()
