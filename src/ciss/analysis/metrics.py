"""Confusion-matrix segmentation metrics (IoU per class, mIoU over groups, hIoU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ciss.data.classes import IGNORE_INDEX
from ciss.errors import CissError


def confusion_matrix(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray,
                     num_classes: int) -> np.ndarray:
    """K x K matrix, rows = ground truth, columns = prediction.

    Target pixels outside 0..K-1 (255, the ignore label, and any id the scored class list does
    not have) are skipped. A prediction outside 0..K-1 is refused: it means the model and the
    class list it is scored against do not match, and counting it as some other class (as a
    clamp would) would hide that behind a plausible score (docs/decisions.md).

    Raises:
        CissError: a prediction outside 0..K-1 on a scored pixel.
    """
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long()
    keep = (target >= 0) & (target < num_classes) & (target != IGNORE_INDEX)
    scored = pred[keep]
    bad = (scored < 0) | (scored >= num_classes)
    if bool(bad.any()):
        raise CissError(f"{int(bad.sum())} scored pixels are predicted as class ids outside "
                        f"0..{num_classes - 1} (e.g. {int(scored[bad][0])}): the model's "
                        f"outputs and the {num_classes} classes scored do not match")
    idx = num_classes * target[keep] + scored
    counts = torch.bincount(idx, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def iou_per_class(cm: np.ndarray) -> list[float | None]:
    """IoU of each class; None where the class has no ground-truth pixel."""
    tp = np.diag(cm).astype(np.float64)
    gt = cm.sum(axis=1)
    union = gt + cm.sum(axis=0) - tp
    return [float(tp[i] / union[i]) if gt[i] > 0 else None for i in range(len(cm))]


def mean_iou(ious: list[float | None], ids: list[int] | range | None = None) -> float | None:
    """Mean over ``ids`` (all classes by default) of the classes that have ground truth."""
    ids = range(len(ious)) if ids is None else ids
    vals = [ious[i] for i in ids if ious[i] is not None]
    return float(np.mean(vals)) if vals else None


def harmonic_iou(old: float | None, new: float | None) -> float | None:
    """hIoU: the harmonic mean of old- and new-class mIoU."""
    if old is None or new is None:
        return None
    return 0.0 if old + new == 0 else 2 * old * new / (old + new)


def restrict_predictions(pred: torch.Tensor, labelled: list[int]) -> torch.Tensor:
    """Partial-label rule: predictions of classes outside ``labelled`` count as background."""
    keep = torch.zeros(int(pred.max().item()) + 1 if pred.numel() else 1, dtype=torch.bool)
    keep[[c for c in labelled if c < len(keep)]] = True
    return torch.where(keep[pred], pred, torch.zeros_like(pred))


@dataclass
class Scores:
    """Per-class IoU over a model's class list, with group means.

    Attributes:
        names: the model's class names (ids are positions).
        iou: per-class IoU, None where unscored (no ground truth or unlabelled).
        cm: the confusion matrix the IoUs come from.
    """

    names: tuple[str, ...]
    iou: list[float | None]
    cm: np.ndarray

    def miou(self, ids: list[int] | range | None = None) -> float | None:
        return mean_iou(self.iou, ids)

    def per_class(self) -> dict[str, float | None]:
        return dict(zip(self.names, self.iou))
