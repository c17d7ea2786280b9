"""Paired image/mask transforms: bilinear for images, NEAREST for masks, 255 padding."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ciss.data.classes import IGNORE_INDEX


@dataclass(frozen=True)
class TrainTransform:
    """Random scale, pad-and-crop to ``crop_size`` and horizontal flip.

    Attributes:
        crop_size: side of the square training crop.
        scale: range of the random rescale factor.
        hflip: flip left-right with probability 1/2.
    """

    crop_size: int
    scale: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True

    def fixed_geometry(self, max_side: int) -> bool:
        """True when the only randomness is the flip (no rescale, no random crop)."""
        return self.scale == (1.0, 1.0) and max_side <= self.crop_size

    def __call__(self, image: np.ndarray, mask: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool]:
        """Transformed copies of ``image`` and ``mask``, and whether they were flipped."""
        h, w = mask.shape
        f = rng.uniform(*self.scale)
        nh, nw = max(1, round(h * f)), max(1, round(w * f))
        if (nh, nw) != (h, w):
            image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
            mask = np.asarray(Image.fromarray(mask).resize((nw, nh), Image.NEAREST))
        image, mask = pad_to(image, mask, self.crop_size, self.crop_size)
        h, w = mask.shape
        top = int(rng.integers(0, h - self.crop_size + 1))
        left = int(rng.integers(0, w - self.crop_size + 1))
        image = image[top:top + self.crop_size, left:left + self.crop_size]
        mask = mask[top:top + self.crop_size, left:left + self.crop_size]
        flipped = bool(self.hflip and rng.random() < 0.5)
        if flipped:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return np.ascontiguousarray(image), np.ascontiguousarray(mask), flipped


def pad_to(image: np.ndarray, mask: np.ndarray, height: int,
           width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad bottom/right to at least ``height`` x ``width``: image with 0, mask with 255."""
    h, w = mask.shape
    ph, pw = max(0, height - h), max(0, width - w)
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    return image, mask


SERVE_MAX_SIDE = 1024  # the serving resize: images are shrunk to this longer side for inference


def resize_longest(image: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink an image so its longer side is at most ``max_side`` (never enlarges)."""
    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def auto_crop_size(shapes: list[tuple[int, int]], cap: int = 512) -> int:
    """A crop side for training: the median shorter side, at most ``cap``, a multiple of 8."""
    if not shapes:
        return cap
    short = int(np.median([min(h, w) for h, w in shapes]))
    return max(32, min(cap, short) // 8 * 8)
