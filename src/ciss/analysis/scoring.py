"""Score any predictor (torch model, ONNX engine) on a labelled folder in a model's class space."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ciss.analysis.metrics import Scores, confusion_matrix, iou_per_class, restrict_predictions
from ciss.data.classes import ClassList
from ciss.data.dataset import label_lut
from ciss.data.folder import DatasetFolder
from ciss.store import Store
from ciss.store.retention import retention_sets

# (N,3,H,W) uint8 images -> (N,H,W) integer labels in the model's class ids.
Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass
class FolderScores(Scores):
    """Scores plus what the mapping did: classes scored and folder classes unknown to the model."""

    labelled: list[str] | None = None
    unknown: list[str] | None = None


def torch_predictor(model: torch.nn.Module, device: torch.device | str = "cpu") -> Predictor:
    """Argmax labels of a torch model, in eval mode and without gradients."""

    def predict(images: np.ndarray) -> np.ndarray:
        model.eval()
        with torch.inference_mode():
            x = torch.from_numpy(images).to(device)
            return model(x).argmax(1).cpu().numpy()

    return predict


BATCH_PIXELS = 2_000_000  # pixels per inference batch: memory follows pixels, not images


def batches(folder: DatasetFolder, stems: list[str], batch_size: int,
            max_pixels: int = BATCH_PIXELS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(N,3,H,W) uint8 images and (N,H,W) masks; consecutive samples of equal size share a
    batch of at most ``batch_size`` images and ``max_pixels`` pixels (a 12 Mpx photo goes
    alone: sixteen of them would need tens of GiB of activations)."""
    group: list[tuple[np.ndarray, np.ndarray]] = []
    for stem in stems:
        image, mask = folder.load(stem)
        if group and (len(group) == batch_size or group[0][1].shape != mask.shape
                      or (len(group) + 1) * mask.size > max_pixels):
            yield _stack(group)
            group = []
        group.append((image, mask))
    if group:
        yield _stack(group)


def at_most(images: np.ndarray, masks: np.ndarray, max_side: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """A batch of equal-size images (bilinear) and masks (nearest) shrunk so the longer side
    is at most ``max_side`` (unchanged when it already is)."""
    from PIL import Image

    n, _, h, w = images.shape
    if max(h, w) <= max_side:
        return images, masks
    f = max_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    small = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0)))
                                 .resize(size, Image.BILINEAR)).transpose(2, 0, 1)
                      for im in images])
    return small, np.stack([np.asarray(Image.fromarray(m).resize(size, Image.NEAREST))
                            for m in masks])


def _stack(group):
    return (np.stack([g[0].transpose(2, 0, 1) for g in group]),
            np.stack([g[1] for g in group]))


def score_folder(predict: Predictor, folder: DatasetFolder, stems: list[str],
                 model_classes: ClassList, batch_size: int = 16) -> FolderScores:
    """Per-class IoU of ``predict`` on ``stems`` of ``folder``, in the model's class space.

    Folder classes are matched to the model's by name; folder classes the model does not know
    count as background. Partial-label rule: only model classes the folder labels are scored,
    and predictions of the other model classes count as background (exact for every scored
    class when the folder labels only some classes, e.g. a retention set).
    """
    k = len(model_classes)
    lut = label_lut(folder.classes, model_classes)
    labelled = [model_classes.index(n) for n in folder.classes.names if n in model_classes]
    cm = np.zeros((k, k), dtype=np.int64)
    for images, masks in batches(folder, stems, batch_size):
        pred = torch.as_tensor(predict(images)).long()
        pred = restrict_predictions(pred, labelled)
        cm += confusion_matrix(pred, torch.from_numpy(lut[masks]), k)
    iou = iou_per_class(cm)
    iou = [v if i in labelled else None for i, v in enumerate(iou)]
    unknown = [n for n in folder.classes.names if n not in model_classes]
    return FolderScores(names=model_classes.names, iou=iou, cm=cm,
                        labelled=[model_classes.names[i] for i in labelled], unknown=unknown)


def score_retention(store: Store, step: int, predict, classes: ClassList
                    ) -> dict[str, dict[str, float | None]]:
    """Per-class IoU on the retention sets of ``step`` and its ancestors (partial-label rule),
    keyed by step."""
    return {s: score_folder(predict, folder, folder.val, classes).per_class()
            for s, folder in retention_sets(store, step).items()}
