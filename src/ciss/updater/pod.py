"""Local POD (PLOP): distil the spatial statistics of intermediate features at several scales.

For a feature map x [N, C, H, W], squared element-wise, and each scale s in ``scales``: split
H x W into s x s windows; in each window take the mean over width (a C x h vector along the
height) and the mean over height (C x w along the width); concatenate everything into one
embedding per image. The loss of a layer is the L2 norm of (embedding_old - embedding_new) per
image, averaged over the batch (PLOP's released code: no normalisation of the embeddings).
"""

from __future__ import annotations

import torch


def pod_embedding(x: torch.Tensor, scales: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """[N, C, H, W] -> [N, D] local POD embedding (see the module docstring)."""
    x = x.float() ** 2
    n, _, h, w = x.shape
    parts = []
    for s in scales:
        hs, ws = max(1, h // s), max(1, w // s)
        for i in range(s):
            for j in range(s):
                win = x[:, :, i * hs:(i + 1) * hs if i < s - 1 else h,
                        j * ws:(j + 1) * ws if j < s - 1 else w]
                if win.numel() == 0:
                    continue
                parts.append(win.mean(3).flatten(1))  # along the height (mean over width)
                parts.append(win.mean(2).flatten(1))  # along the width (mean over height)
    return torch.cat(parts, dim=1)


def local_pod(student: list[torch.Tensor], teacher: list[torch.Tensor], n_classes: int,
              n_new: int, factor: float = 0.01) -> torch.Tensor:
    """The POD loss over matching feature maps: per layer ``factor`` x sqrt(K / K_new) x the
    mean over the batch of ||emb_t - emb_s||_2, summed and divided by the number of layers."""
    if not student:
        return torch.zeros(())
    weight = factor * (n_classes / max(1, n_new)) ** 0.5
    total = 0.0
    for s, t in zip(student, teacher):
        diff = pod_embedding(t) - pod_embedding(s)
        total = total + weight * diff.norm(dim=1).mean()
    return total / len(student)
