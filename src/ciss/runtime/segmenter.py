"""``Segmenter``: an engine plus pre- and post-processing (decode, resize, labels back)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ciss.data.imageio import MAX_PIXELS, read_image
from ciss.data.transforms import SERVE_MAX_SIDE, resize_longest


@dataclass
class Segmenter:
    """Segment decoded images or raw bytes with any engine.

    Attributes:
        engine: has ``run(uint8 [N,3,H,W]) -> {"labels": uint8 [N,H,W], "logits": ...}`` and
            ``predict_labels(uint8 [N,3,H,W]) -> uint8 [N,H,W]``.
        classes: the model's class names.
        max_side: images are shrunk so the longer side is at most this before inference;
            labels are resized back (NEAREST) to the input's size.
        max_pixels: decoded images above this are refused (decompression bombs).
    """

    engine: object
    classes: list[str]
    max_side: int = SERVE_MAX_SIDE
    max_pixels: int = MAX_PIXELS

    def segment(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> uint8 HxW class ids at the image's own size."""
        h, w = image.shape[:2]
        small = resize_longest(image, self.max_side)
        # labels only: the K x H x W logits never leave the engine
        labels = self.engine.predict_labels(np.ascontiguousarray(small.transpose(2, 0, 1)[None]))[0]
        if labels.shape != (h, w):
            labels = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((w, h),
                                                                           Image.NEAREST))
        return labels

    def segment_scored(self, image: np.ndarray, calibration=None) -> tuple[np.ndarray, dict]:
        """As :meth:`segment`, plus the image's scores (``runtime.scoring``) from the
        logits of the same engine run (at the serving resize)."""
        from ciss.runtime.scoring import safe_scores

        h, w = image.shape[:2]
        small = resize_longest(image, self.max_side)
        out = self.engine.run(np.ascontiguousarray(small.transpose(2, 0, 1)[None]))
        labels, scores = out["labels"][0], safe_scores(out["logits"][0], calibration)
        if labels.shape != (h, w):
            labels = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((w, h),
                                                                           Image.NEAREST))
        return labels, scores

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,3,H,W] -> uint8 [N,H,W] through :meth:`segment`, i.e. with the serving
        resize: what the retention gate must measure is what will be served."""
        return np.stack([self.segment(np.ascontiguousarray(im.transpose(1, 2, 0)))
                         for im in images])

    def decode(self, data: bytes, what: str = "request body") -> np.ndarray:
        """Image bytes -> uint8 HxWx3 RGB (EXIF orientation applied; any PIL mode).

        Raises:
            CissError: not an image, truncated; ImageTooLarge beyond ``max_pixels``.
        """
        return read_image(data, what, max_pixels=self.max_pixels)

    def segment_bytes(self, data: bytes, what: str = "request body") -> np.ndarray:
        return self.segment(self.decode(data, what))
