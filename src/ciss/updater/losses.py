"""The incremental losses (DESIGN §5). Channel order: background, old classes, new classes.

K = all channels of the student, K_old = the parent's channels (background included).
Every function returns a scalar; ``method_loss`` returns the parts for logging.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ciss.data.classes import IGNORE_INDEX


def _masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_pixel.mean()
    mask = mask.to(per_pixel.dtype)
    return (per_pixel * mask).sum() / mask.sum().clamp(min=1.0)


def unbiased_cross_entropy(logits: torch.Tensor, target: torch.Tensor, num_old: int,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """MiB's unbiased cross-entropy.

    A pixel labelled background (0) may hide an old class, so it is scored against
    P(background or any old class) = LSE(z_0..z_{K_old-1}) - LSE(z). Pixels labelled with a
    new or an old class c cost -(z_c - LSE(z)). Mean over non-ignored pixels; ``target`` is
    never modified.

    Args:
        logits: [N, K, H, W] student logits.
        target: [N, H, W] class ids, ``ignore_index`` for unlabelled pixels.
        num_old: K_old, the parent's channel count (background included).
    """
    lse_all = torch.logsumexp(logits, dim=1)
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    log_p = logits.gather(1, safe.unsqueeze(1)).squeeze(1) - lse_all
    log_bg = torch.logsumexp(logits[:, :num_old], dim=1) - lse_all
    per_pixel = -torch.where(safe == 0, log_bg, log_p)
    return _masked_mean(per_pixel, valid)


def unbiased_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                          alpha: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """MiB's unbiased knowledge distillation.

    The teacher's background is matched to the student's P(background or any new class);
    old classes are matched one to one. Per pixel -(1/K_old) sum_c p_c log q_c with
    p = softmax(alpha * teacher); mean over pixels (or over ``mask``). ``alpha`` scales the
    teacher only (no T^2 factor), as in MiB.
    """
    k_old = teacher_logits.shape[1]
    lse_all = torch.logsumexp(student_logits, dim=1, keepdim=True)
    bg_and_new = torch.cat([student_logits[:, :1], student_logits[:, k_old:]], dim=1)
    log_q = torch.cat([torch.logsumexp(bg_and_new, dim=1, keepdim=True),
                       student_logits[:, 1:k_old]], dim=1) - lse_all
    p = torch.softmax(alpha * teacher_logits, dim=1)
    per_pixel = -(p * log_q).sum(dim=1) / k_old
    return _masked_mean(per_pixel, mask)


def distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 alpha: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain (LwF) distillation: the student's first K_old channels, renormalised over those."""
    k_old = teacher_logits.shape[1]
    log_q = torch.log_softmax(student_logits[:, :k_old], dim=1)
    p = torch.softmax(alpha * teacher_logits, dim=1)
    return _masked_mean(-(p * log_q).sum(dim=1) / k_old, mask)


def feature_distillation(student_features: torch.Tensor,
                         teacher_features: torch.Tensor) -> torch.Tensor:
    """ILT's feature term: mean squared error between backbone outputs."""
    return F.mse_loss(student_features, teacher_features)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                  ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    return F.cross_entropy(logits, target, ignore_index=ignore_index)
