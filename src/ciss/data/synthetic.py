"""Procedural scenes: the embedded dataset (numpy only, deterministic per seed).

20 object classes = 4 textures x 5 shapes, drawn on a smooth, cluttered background with pixel
noise; 1-4 objects per image, later objects occlude earlier ones. Colours are random per object,
so a class is only its shape and its texture: the model must learn both. Classes are ordered
texture-major, so a 15-5 split makes the dotted shapes the new classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ciss.data.classes import BACKGROUND, ClassList
from ciss.data.imageio import write_mask
from ciss.errors import CissError

TEXTURES = ("solid", "stripes", "checker", "dots")
SHAPES = ("disc", "square", "triangle", "ring", "cross")
CLASS_NAMES = tuple(f"{t}-{s}" for t in TEXTURES for s in SHAPES)


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator settings.

    Attributes:
        size: image side in pixels (textures need >= 2 px periods: keep >= 48).
        n_train, n_val: images per split.
        seed: images depend only on (seed, index).
        min_objects, max_objects: objects per image.
    """

    size: int = 64
    n_train: int = 2000
    n_val: int = 300
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 4


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = rng.random((cells, cells, 3), dtype=np.float32)
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    d = np.sqrt(u * u + v * v)
    if shape == "disc":
        return d <= r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= r * 0.8
    if shape == "triangle":
        # Equilateral triangle with circumradius r, pointing "up" in the rotated frame.
        return (v <= r * 0.5) & (np.sqrt(3) * u - v <= r) & (-np.sqrt(3) * u - v <= r)
    if shape == "ring":
        return (d <= r) & (d >= r * 0.55)
    if shape == "cross":
        arm = r * 0.32
        return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    raise ValueError(shape)


def _texture(texture: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    """1 where the second colour shows, 0 elsewhere."""
    if texture == "solid":
        return np.zeros_like(u, dtype=bool)
    if texture == "stripes":
        return np.floor(u / (period / 2)) % 2 == 1
    if texture == "checker":
        return (np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2 == 1
    if texture == "dots":
        du = (u % period) - period / 2
        dv = (v % period) - period / 2
        return du * du + dv * dv <= (period * 0.3) ** 2
    raise ValueError(texture)


def _contrasting_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    a = rng.random(3, dtype=np.float32)
    b = rng.random(3, dtype=np.float32)
    # Push the two colours apart in brightness so textures stay visible after noise.
    if a.mean() < b.mean():
        a, b = b, a
    a = np.clip(a * 0.5 + 0.5, 0, 1)
    b = np.clip(b * 0.5, 0, 1)
    return (a, b) if rng.random() < 0.5 else (b, a)


def make_scene(seed: int, index: int, size: int = 64, min_objects: int = 1,
               max_objects: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 HxWx3) and its full label mask (uint8 HxW, 0 = background)."""
    rng = np.random.default_rng([seed, index])
    img = _smooth_noise(rng, size, cells=int(rng.integers(3, 7)))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Clutter: lines and small blobs that belong to the background class.
    for _ in range(int(rng.integers(2, 7))):
        colour = rng.random(3, dtype=np.float32)
        if rng.random() < 0.5:
            cx, cy, ang = rng.random() * size, rng.random() * size, rng.random() * np.pi
            dist = np.abs((xx - cx) * np.sin(ang) - (yy - cy) * np.cos(ang))
            img[dist <= rng.uniform(0.5, 1.5)] = colour
        else:
            cx, cy, rad = rng.random() * size, rng.random() * size, rng.uniform(1.5, 4.0)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= rad * rad] = colour
    mask = np.zeros((size, size), dtype=np.uint8)
    scale = size / 64.0
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        cls = int(rng.integers(0, len(CLASS_NAMES)))
        texture, shape = TEXTURES[cls // len(SHAPES)], SHAPES[cls % len(SHAPES)]
        r = rng.uniform(9.0, 17.0) * scale
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
        ang = rng.random() * 2 * np.pi
        c, s = np.cos(ang), np.sin(ang)
        u = (xx - cx) * c + (yy - cy) * s
        v = -(xx - cx) * s + (yy - cy) * c
        inside = _shape_mask(shape, u, v, r)
        pat_ang = rng.random() * np.pi
        pc, ps = np.cos(pat_ang), np.sin(pat_ang)
        second = _texture(texture, xx * pc + yy * ps, -xx * ps + yy * pc,
                          period=rng.uniform(4.5, 6.5) * scale)
        col_a, col_b = _contrasting_colours(rng)
        img[inside & ~second] = col_a
        img[inside & second] = col_b
        mask[inside] = cls + 1
    img = img + rng.normal(0.0, 0.04, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask


def write_synthetic(out: Path, config: SyntheticConfig) -> Path:
    """Write a full-label dataset folder (classes.txt, images/, masks/, train.txt, val.txt).

    Raises:
        CissError: when ``out`` exists and is not empty, or the settings make no sense.
    """
    out = Path(out)
    if config.size < 32:
        raise CissError(f"--size {config.size}: textures need at least 32 px images")
    if config.n_train < 1 or config.n_val < 1:
        raise CissError("--train and --val must be at least 1")
    if out.exists() and any(out.iterdir()):
        raise CissError(f"{out}: exists and is not empty; choose a new folder")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    ClassList((BACKGROUND,) + CLASS_NAMES).write(out / "classes.txt")
    stems = {"train": [], "val": []}
    total = config.n_train + config.n_val
    for i in range(total):
        split = "train" if i < config.n_train else "val"
        stem = f"{split}_{i:05d}"
        image, mask = make_scene(config.seed, i, config.size, config.min_objects,
                                 config.max_objects)
        Image.fromarray(image).save(out / "images" / f"{stem}.png", compress_level=1)
        write_mask(out / "masks" / f"{stem}.png", mask)
        stems[split].append(stem)
    for split, names in stems.items():
        (out / f"{split}.txt").write_text("\n".join(names) + "\n")
    return out
