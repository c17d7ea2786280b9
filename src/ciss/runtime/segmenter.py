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

    def _batch(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 -> the engine's uint8 [1,3,h,w] at the serving resize."""
        return np.ascontiguousarray(resize_longest(image, self.max_side).transpose(2, 0, 1)[None])

    @staticmethod
    def _back(labels: np.ndarray, image: np.ndarray) -> np.ndarray:
        """Labels at the serving resize -> at the image's own size (NEAREST)."""
        h, w = image.shape[:2]
        if labels.shape == (h, w):
            return labels
        return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize((w, h), Image.NEAREST))

    def segment(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> uint8 HxW class ids at the image's own size."""
        # labels only: the K x H x W logits never leave the engine
        return self._back(self.engine.predict_labels(self._batch(image))[0], image)

    def segment_scored(self, image: np.ndarray, calibration=None
                       ) -> tuple[np.ndarray, dict | None]:
        """As :meth:`segment`, plus the image's scores (``runtime.scoring``) from the
        logits of the same engine run (at the serving resize); None if scoring failed."""
        from ciss.runtime.scoring import safe_scores

        out = self.engine.run(self._batch(image))
        return (self._back(out["labels"][0], image),
                safe_scores(out["logits"][0], calibration))

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
