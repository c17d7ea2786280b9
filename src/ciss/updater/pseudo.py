"""Pseudo-labels from the parent on background pixels (PLOP's entropy rule).

In a new-classes folder, "background" pixels may show old classes. The parent model knows
them: where it is confident, its prediction replaces the background label. Confidence is the
normalised entropy of the parent's softmax, H = -sum_c p_c log p_c / log K_old in [0, 1], and a
pixel is confident when H is below the threshold of the class the parent predicts there. The
thresholds are per-class medians of H over the background pixels of the training set (so about
half of each class's background pixels are relabelled), at least ``floor``.

PLOP's released code divides the entropy once more by log(K); that only rescales the
thresholds and is left out here (the median rule is scale-free).
"""

from __future__ import annotations

import numpy as np
import torch

from ciss.data.classes import IGNORE_INDEX


def normalised_entropy(logits: torch.Tensor) -> torch.Tensor:
    """[N, K, H, W] logits -> [N, H, W] entropy of the softmax divided by log K (0..1)."""
    logp = torch.log_softmax(logits.float(), dim=1)
    h = -(logp.exp() * logp).sum(1)
    return h / float(np.log(logits.shape[1]))


class EntropyHistogram:
    """Per-class histograms of normalised entropy (``bins`` bins on [0, 1]), for medians."""

    def __init__(self, n_classes: int, bins: int = 100) -> None:
        self.bins = bins
        self.counts = np.zeros((n_classes, bins), np.int64)

    def add(self, teacher_logits: torch.Tensor, target: torch.Tensor) -> None:
        """Count the background-labelled pixels of one batch by the parent's argmax class."""
        bg = target == 0
        if not bg.any():
            return
        cls = teacher_logits.argmax(1)[bg].cpu().numpy()
        h = normalised_entropy(teacher_logits)[bg].cpu().numpy()
        b = np.minimum((h * self.bins).astype(np.int64), self.bins - 1)
        np.add.at(self.counts, (cls, b), 1)

    def thresholds(self, floor: float = 0.001) -> np.ndarray:
        """Per-class median entropy (the upper edge of the bin holding the median pixel), at
        least ``floor``; classes never predicted on background get ``floor``."""
        out = np.full(len(self.counts), floor)
        for c, row in enumerate(self.counts):
            n = row.sum()
            if n:
                median_bin = int(np.searchsorted(np.cumsum(row), (n + 1) / 2))
                out[c] = max(floor, (median_bin + 1) / self.bins)
        return out


def pseudo_label(target: torch.Tensor, teacher_logits: torch.Tensor, thresholds: torch.Tensor,
                 *, unsure: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Relabel background pixels with the parent's confident predictions.

    Args:
        target: [N, H, W] labels (0 = background, new classes, 255); not modified.
        teacher_logits: [N, K_old, H, W] the parent's logits.
        thresholds: [K_old] entropy thresholds per class.
        unsure: what an unconfident background pixel becomes: 255 (PLOP: ignored) or 0
            (kept as background, for the unbiased losses of ``mib --pseudo``).

    Returns:
        the new labels, and per image the share of background pixels that were confident
        (PLOP's ``classif_adaptive_factor``).
    """
    pred = teacher_logits.argmax(1)
    confident = normalised_entropy(teacher_logits) < thresholds.to(pred.device)[pred]
    bg = target == 0
    out = target.clone()
    out[bg & confident] = pred[bg & confident]
    out[bg & ~confident] = unsure
    n_bg = bg.flatten(1).sum(1).clamp(min=1)
    share = (bg & confident).flatten(1).sum(1) / n_bg
    return out, share.float()
