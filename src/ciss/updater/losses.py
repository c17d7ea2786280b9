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


def binary_labelled(logits: torch.Tensor, target: torch.Tensor, first: int, last: int,
                    pixels: torch.Tensor) -> torch.Tensor:
    """One binary cross-entropy per channel ``first..last-1`` over the ``pixels`` mask: a pixel
    labelled with the channel's class is a positive, any other selected pixel a negative; the
    mean over selected pixels per channel, summed over channels (DKD's L_mbce reduction)."""
    part = logits[:, first:last]
    ids = torch.arange(first, last, device=target.device).view(1, -1, 1, 1)
    onehot = (target.unsqueeze(1) == ids).to(part.dtype)
    per = F.binary_cross_entropy_with_logits(part, onehot, reduction="none")
    sel = pixels.unsqueeze(1).to(part.dtype)
    return ((per * sel).sum((0, 2, 3)) / sel.sum().clamp(min=1.0)).sum()


def binary_new_classes(logits: torch.Tensor, target: torch.Tensor, num_old: int,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """DKD's L_mbce: one binary cross-entropy per new class (channels K_old..K-1), the pixels
    labelled with it positive and every other labelled pixel negative. Ignored pixels (255)
    count for no class (DKD's released code makes them negatives)."""
    return binary_labelled(logits, target, num_old, logits.shape[1], target != ignore_index)


def binary_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """BCE of the student's logits against the teacher's sigmoid, the mean over pixels per
    channel summed over channels (DKD's L_kd and L_dkd, with its reduction)."""
    per = F.binary_cross_entropy_with_logits(student, torch.sigmoid(teacher.detach()),
                                             reduction="none")
    return per.mean((0, 2, 3)).sum()


def decomposed_logits(x: torch.Tensor, conv: torch.nn.Conv2d, first: int, last: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """DKD's positive and negative reasoning of classes ``first..last-1``: the classifier
    applied to its input ``x`` with only its positive (resp. negative) weights, no bias.
    Their sum is the logit without its bias."""
    w = conv.weight[first:last].float()
    args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                groups=conv.groups)
    return (F.conv2d(x, w.clamp(min=0), **args), F.conv2d(x, w.clamp(max=0), **args))


# -- base-training losses for imbalanced data (BENCHMARKS.md §1 measures them) ----------------
BASE_LOSSES = ("ce", "wce", "ce+dice", "ohem")


def class_weights(pixel_counts: torch.Tensor, power: float = 0.5,
                  cap: float = 10.0) -> torch.Tensor:
    """Per-class cross-entropy weights from training pixel counts.

    w_c is proportional to f_c^-power (f_c = the class's pixel share), scaled so that the
    pixel-weighted mean weight is 1 (the loss keeps its scale) and capped at ``cap`` times the
    smallest weight (a class seen on a few pixels must not dominate). Absent classes get the
    largest weight.
    """
    counts = pixel_counts.to(torch.float64)
    share = counts / counts.sum().clamp(min=1.0)
    seen = share > 0
    w = torch.ones_like(share)
    w[seen] = share[seen] ** -power
    w[~seen] = w[seen].max() if seen.any() else 1.0
    w = torch.minimum(w, w.min() * cap)
    w = w / (share * w).sum().clamp(min=1e-12)
    return w.to(torch.float32)


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                           ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """sum_p w_{y_p} * CE_p / (number of labelled pixels): weights change each class's pull,
    not the loss's normalisation (PyTorch's weighted mean would divide by sum_p w_{y_p})."""
    ce = F.cross_entropy(logits.float(), target, weight=weights.to(logits.device),
                         ignore_index=ignore_index, reduction="sum")
    return ce / (target != ignore_index).sum().clamp(min=1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor,
              ignore_index: int = IGNORE_INDEX, eps: float = 1.0,
              first: int = 0) -> torch.Tensor:
    """Soft Dice, 1 - 2|P∩Y| / (|P| + |Y|), averaged over the classes present in the batch's
    labels (background included); ignored pixels are left out of both sets. With ``first``,
    only channels ``first..K-1`` are scored (softmax still over all K); every other label is
    a negative for them."""
    prob = logits.float().softmax(1)[:, first:]
    valid = (target != ignore_index).unsqueeze(1)
    ids = torch.arange(first, logits.shape[1], device=target.device).view(1, -1, 1, 1)
    onehot = ((target.unsqueeze(1) == ids) & valid).to(prob.dtype)
    prob = prob * valid
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = 1 - (2 * inter + eps) / (denom + eps)
    return dice[present].mean() if present.any() else logits.sum() * 0


def new_class_dice(logits: torch.Tensor, target: torch.Tensor, num_old: int,
                   ignore_index: int = IGNORE_INDEX, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice over the new classes' channels only (K_old..K-1), averaged over the new classes
    present in the batch. Background and old-class pixels are negatives for every new class,
    which the overlap setting guarantees (new classes are labelled wherever they appear)."""
    return dice_loss(logits, target, ignore_index, eps, first=num_old)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, keep: float = 0.25,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Bootstrapped cross-entropy: the mean over the hardest ``keep`` fraction of labelled
    pixels (Wu et al. 2016), so easy background pixels stop dominating the gradient."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    ce = ce[target != ignore_index]
    if ce.numel() == 0:
        return logits.sum() * 0
    k = max(1, int(ce.numel() * keep))
    return ce.topk(k).values.mean()


def base_loss(name: str, logits: torch.Tensor, target: torch.Tensor,
              weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The step-0 loss named ``name`` (one of BASE_LOSSES), with its parts.

    Computed in fp32 whatever autocast chose for the logits: softmax sums over many pixels
    lose precision in bf16/fp16.
    """
    logits = logits.float()
    if name == "ce":
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        return {"loss": ce, "ce": ce.detach()}
    if name == "wce":
        ce = weighted_cross_entropy(logits, target, weights)
        return {"loss": ce, "wce": ce.detach()}
    if name == "ce+dice":
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        dice = dice_loss(logits, target)
        return {"loss": ce + dice, "ce": ce.detach(), "dice": dice.detach()}
    if name == "ohem":
        ce = ohem_cross_entropy(logits, target)
        return {"loss": ce, "ohem": ce.detach()}
    raise ValueError(f"unknown loss {name!r}; choose from {', '.join(BASE_LOSSES)}")
