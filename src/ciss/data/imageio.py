"""Decoding images and masks the same way everywhere (training, evaluation, serving)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ciss.errors import CissError


class ImageTooLarge(CissError):
    """The image has more pixels than allowed (decompression bomb protection)."""


# PIL's own bomb limit is ~89 Mpx with a warning first; we refuse early and clearly instead.
MAX_PIXELS = 64_000_000


def _open_header(source: Path | bytes, what: str, max_pixels: int) -> Image.Image:
    """Open lazily (the header only) with the readability, size and bomb checks."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as exc:  # PIL refuses > ~179 Mpx before we can look
        raise ImageTooLarge(f"{what}: {exc}") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise CissError(f"{what}: not a readable image ({exc.__class__.__name__})") from exc
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(
            f"{what}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels} "
            "(decompression bomb protection)"
        )
    if w < 1 or h < 1:
        raise CissError(f"{what}: empty image ({w}x{h})")
    return img


def _open(source: Path | bytes, what: str, max_pixels: int) -> Image.Image:
    """Open and decode, with ``_open_header``'s checks and the truncation check."""
    img = _open_header(source, what, max_pixels)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CissError(f"{what}: truncated or corrupt image ({exc})") from exc
    return img


def to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode (grey, 16-bit, RGBA, palette, CMYK) to uint8 RGB, HxWx3."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.int64)
        # 16-bit greys use the full 0..65535 range; scale by the type's range, not the image's.
        arr = np.clip(arr >> 8, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip(arr, 0.0, 255.0).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite over black so transparent pixels do not carry arbitrary hidden colours.
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(base, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def read_image(source: Path | bytes, what: str | None = None, *,
               max_pixels: int = MAX_PIXELS, exif: bool = True) -> np.ndarray:
    """Decode an image file or bytes to uint8 RGB HxWx3, EXIF orientation applied (as a
    viewer displays it) unless ``exif`` is False (the pixels as stored).

    Raises:
        CissError: naming ``what`` (the path by default) and the problem.
    """
    what = what or str(source if isinstance(source, Path) else "image")
    img = _open(source, what, max_pixels)
    # A broken EXIF block must not make an otherwise good image unusable.
    if exif:
        with contextlib.suppress(Exception):
            img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def image_size(path: Path, *, exif: bool = True, max_pixels: int = MAX_PIXELS
               ) -> tuple[int, int]:
    """(height, width) of an image as :func:`read_image` would return it, from the file's
    header (no pixel is decoded): for the images of other ranks' shards under torchrun.

    Raises:
        CissError: not an image, empty, or over ``max_pixels``.
    """
    with _open_header(path, str(path), max_pixels) as img:
        w, h = img.size
        turned = False
        if exif:
            with contextlib.suppress(Exception):  # as read_image: a broken EXIF is ignored
                turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # Orientation
    return (w, h) if turned else (h, w)


def open_image(path: Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file lazily with the size and bomb checks, without converting it (a
    mask's mode says how to read it)."""
    return _open(path, str(path), max_pixels)


def read_mask(path: Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode an 8-bit single-channel or palette PNG mask to uint8 HxW (values = class ids)."""
    img = _open(path, str(path), max_pixels)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit index masks are common; they are exact whenever the values fit 8 bits
        arr = np.asarray(img, dtype=np.int64)
        if arr.size and arr.min() >= 0 and arr.max() <= 255:
            return arr.astype(np.uint8)
        raise CissError(f"{path}: 16-bit mask with values up to {int(arr.max())}; class ids "
                        "must fit 8 bits (0..254, 255 = ignore)")
    if img.mode not in ("L", "P"):
        hint = (RGB_MASK_HINT if img.mode in ("RGB", "RGBA") else
                "save it as an 8-bit index PNG")
        raise CissError(f"{path}: mask is a colour image (mode {img.mode}), not an index "
                        f"mask; {hint}")
    # Palette masks: the pixel value is the palette index, which is the class id (VOC style).
    return np.asarray(img, dtype=np.uint8)


RGB_MASK_HINT = ("colour masks are read only in the CVAT layout (a labelmap.txt naming each "
                 "class's colour beside SegmentationClass/); otherwise save each mask as an "
                 "8-bit PNG whose pixel value is the class's line in classes.txt, e.g. "
                 "Image.fromarray(ids.astype('uint8'), mode='L').save('mask.png')")


def _mask_image(mask: np.ndarray, palette: list[int] | None) -> Image.Image:
    img = Image.fromarray(mask.astype(np.uint8), mode="L").convert("P")
    img.putpalette(palette or voc_palette())
    return img


def write_mask(path: Path, mask: np.ndarray, palette: list[int] | None = None) -> None:
    """Write a uint8 HxW class-id mask as a palette PNG (values stay the class ids)."""
    _mask_image(mask, palette).save(path, format="PNG", optimize=False)


def mask_png(mask: np.ndarray, palette: list[int] | None = None) -> bytes:
    """The palette PNG of :func:`write_mask`, as bytes (for HTTP responses)."""
    buf = io.BytesIO()
    _mask_image(mask, palette).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def voc_palette() -> list[int]:
    """The Pascal VOC colour map (bit-interleaved), 256 entries; 255 is drawn near white."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    palette[255 * 3: 256 * 3] = [224, 224, 192]
    return palette
