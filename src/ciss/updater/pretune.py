"""NeST's classifier pre-tuning (Xie et al., ECCV 2024), before an add-classes step.

A new class's classifier row is not learned from a random start: it is *generated* from the
parent's rows. For new class c and old class k, a per-channel importance ``m[c, k, d]`` and a
mixing weight ``a[c, k]`` give

    w_c[d] = sum_k a[c, k] * m[c, k, d] * W_old[k, d]

and the background row becomes ``s[d] * W_old[0, d]``, rescaled to the parent's background
norm. Only ``m``, ``a``, ``s`` and the new biases train, every other weight frozen, with MiB's
unbiased cross-entropy, for a share of the step's budget; the rows are then written into the
classifier and the step trains as usual. The start is NeST's: over the training pixels of
class c, ``m[c, k, d]`` is the mean of ``p_k * 1[f_d * W_old[k, d] > 0]`` (``p_k`` the parent's
probability of old class k, ``f`` the classifier's input) and ``a[c] = softmax_k(sum_d
m[c, k, d])``; the new biases start at the background's.

Written from the paper and its released code (``zhengyuan-xie/ECCV24_NeST``: ``select``,
``avg_weight_output``, ``init_via_weight``), for the staged models: several summed classifier
convolutions (LRASPP) each get their own generated rows; a k x k classifier (SMP's heads)
shares one importance per channel over its taps (the sign test uses the taps' sum). Left out:
the code's final rescaling of the new rows and biases to the old ones' norms (``align_weight``,
``gamma_b``); the background norm is kept inside the parametrisation, so what was fitted is
exactly what is written (the code rescales after fitting). docs/decisions.md has the entry.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ciss.models.staged import SegmentationModel
from ciss.updater.distributed import DistInfo
from ciss.updater.loop import LoopConfig, fit
from ciss.updater.losses import unbiased_cross_entropy
from ciss.updater.methods import capture_inputs

STATS_IMAGES = 500  # images read for the importance start (NeST reads every one, at 128 px)


@dataclass
class PretuneResult:
    """What the pre-tuning did (written to the card's ``extra.pretune``; its share is the
    card's ``config.update.pretune``, its seconds ``timings.pretune_s``)."""

    iterations: int
    seconds: float
    first_loss: float
    last_loss: float
    stats_images: int

    def to_json(self) -> dict:
        """The card's ``extra.pretune`` (the seconds go to the card's timings only)."""
        return {k: round(v, 5) if isinstance(v, float) else v
                for k, v in asdict(self).items() if k != "seconds"}


class GeneratedRows(nn.Module):
    """Weight parametrisation: the background row scaled per channel (norm kept), old rows as
    they are, new rows generated from the old ones."""

    def __init__(self, importance: torch.Tensor, mix: torch.Tensor, k_old: int) -> None:
        super().__init__()
        self.k_old = k_old
        self.importance = nn.Parameter(importance.clone())  # [n_new, K_old, D]
        self.mix = nn.Parameter(mix.clone())  # [n_new, K_old]
        self.bg_scale = nn.Parameter(torch.ones(importance.shape[-1], dtype=importance.dtype,
                                                device=importance.device))  # [D]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        old = weight[: self.k_old]  # [K_old, D, kh, kw]; the rows after it are replaced
        rows = torch.einsum("nk,nkd,kdhw->ndhw", self.mix, self.importance, old)
        bg = old[0] * self.bg_scale.view(-1, 1, 1)
        bg = bg * (old[0].norm() / bg.norm().clamp_min(1e-12))
        return torch.cat([bg.unsqueeze(0), old[1:], rows.to(old.dtype)])


class NewBiases(nn.Module):
    """Bias parametrisation: old biases as they are, the new ones trainable."""

    def __init__(self, start: torch.Tensor, k_old: int) -> None:
        super().__init__()
        self.k_old = k_old
        self.new = nn.Parameter(start.clone())

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        return torch.cat([bias[: self.k_old], self.new.to(bias.dtype)])


def importance_sums(features: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor,
                    weight: torch.Tensor, new_ids: list[int]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each new class c, the sum over its pixels of ``p_k * 1[f_d * W[k, d] > 0]`` and
    the pixel count.

    Args:
        features: [N, D, h, w] the classifier conv's input.
        probs: [N, K_old, h, w] the parent's softmax at the same resolution.
        labels: [N, h, w] class ids at that resolution.
        weight: [K_old, D, kh, kw] the parent's rows (the taps are summed for the sign).
        new_ids: the new classes' ids.

    Returns:
        ([n_new, K_old, D] sums, [n_new] pixel counts).
    """
    w = weight.sum(dim=(2, 3))  # the response to a constant input decides the sign
    f = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float()
    p = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1]).float()
    y = labels.reshape(-1)
    sums = torch.zeros(len(new_ids), *w.shape, device=w.device)
    counts = torch.zeros(len(new_ids), device=w.device)
    for i, c in enumerate(new_ids):
        sel = y == c
        if not bool(sel.any()):
            continue
        fc, pc = f[sel], p[sel]
        # f_d * W_kd > 0 exactly when both are positive or both negative: two matrix products
        sums[i] = ((pc.T @ (fc > 0).float()) * (w > 0) + (pc.T @ (fc < 0).float()) * (w < 0))
        counts[i] = sel.sum()
    return sums, counts


def start_from_parent(teacher: SegmentationModel, folder, stems: list[str], lut: np.ndarray,
                      new_ids: list[int], device: torch.device, info: DistInfo
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """NeST's start, per classifier conv: (importance [n_new, K_old, D], mix [n_new, K_old])
    from the parent's view of the new classes' training pixels (summed over ranks). A class
    with no pixel at the classifier's resolution starts as the plain mean of the old rows."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from ciss.analysis.scoring import batches

    convs = teacher.classifier_convs()
    k_old = teacher.num_classes
    totals = [(torch.zeros(len(new_ids), k_old, c.in_channels, device=device),
               torch.zeros(len(new_ids), device=device)) for c in convs]
    teacher.eval()
    with torch.inference_mode():
        for images, masks in batches(folder, stems, 8):
            labels = torch.from_numpy(lut[masks].astype(np.int64)).to(device)
            with capture_inputs(teacher, True) as inputs:
                probs = teacher(torch.from_numpy(images).to(device)).softmax(dim=1)
            for (sums, counts), conv, x in zip(totals, convs, inputs):
                size = x.shape[-2:]
                p = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
                y = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0]
                got_sums, got_counts = importance_sums(x, p, y.long(), conv.weight[:k_old],
                                                       new_ids)
                sums += got_sums
                counts += got_counts
        starts = []
        for conv, (sums, counts) in zip(convs, totals):
            if info.enabled:  # every rank read its own shard
                for t in (sums, counts):
                    dist.all_reduce(t)
            importance = sums / counts.clamp_min(1.0).view(-1, 1, 1)
            unseen = counts == 0
            importance[unseen] = 1.0
            mix = importance.sum(dim=-1).softmax(dim=-1)
            mix[unseen] = 1.0 / k_old
            starts.append((importance.to(conv.weight.dtype), mix.to(conv.weight.dtype)))
    # clones made outside inference mode: parameters are built from them
    return [(i.clone(), m.clone()) for i, m in starts]


def pretune(student: SegmentationModel, teacher: SegmentationModel, k_old: int, dataset,
            folder, lut: np.ndarray, new_ids: list[int], share: float, loop: LoopConfig,
            info: DistInfo, workers: int = 0, progress: bool = True) -> PretuneResult:
    """Fit the generated classifier rows for ``share`` of the step's optimiser steps, then
    write them into ``student``'s classifier, in place.

    Every other weight and every BatchNorm statistic is left exactly as it was; which
    parameters train afterwards is restored too.

    Args:
        student: the grown model (its new rows' values are replaced).
        teacher: the parent (the importance start reads its probabilities).
        k_old: the parent's channel count.
        dataset: the step's training dataset (the one the step itself trains on).
        folder: the new-class folder, for the importance start.
        lut: folder ids to model ids.
        new_ids: the new classes' model ids.
        share: fraction of the step's budget (``loop``'s, at this dataset's size).
        loop: the step's loop settings (optimiser, rate, batch size, seed).
        info: this rank under torchrun.

    Raises:
        CissError: a folder smaller than one batch (``fit`` refuses it).
    """
    t0 = time.perf_counter()
    per_epoch = (len(dataset) // info.world_size) // loop.batch_size
    steps = max(1, round(share * loop.total_iterations(max(1, per_epoch), info.world_size)))
    own = folder.train[info.rank::info.world_size] if info.enabled else folder.train
    wanted = set(np.flatnonzero(np.isin(lut, new_ids)).tolist())  # the new classes' folder ids
    stems = [s for s in own if folder.presence[s] & wanted]
    stems = stems[:: max(1, len(stems) // STATS_IMAGES)][:STATS_IMAGES]
    device = next(student.parameters()).device
    starts = start_from_parent(teacher, folder, stems, lut, new_ids, device, info)

    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    frozen_upto = student.frozen_upto
    for p in student.parameters():
        p.requires_grad_(False)
    # every stage but the classifier in eval mode: no BatchNorm statistic moves
    student.frozen_upto = len(student.stage_names) - 2
    convs = student.classifier_convs()
    for conv, (importance, mix) in zip(convs, starts):
        parametrize.register_parametrization(conv, "weight", GeneratedRows(importance, mix,
                                                                           k_old))
        if conv.bias is not None:
            parametrize.register_parametrization(
                conv, "bias", NewBiases(conv.bias[:1].detach().expand(len(new_ids)), k_old))
    for conv in convs:
        for original in conv.parametrizations.values():
            original.original.requires_grad_(False)

    names = student.stage_names

    def step(images: torch.Tensor, masks: torch.Tensor, *_keys) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            state = student.run(student.begin(images), names[:-1])
        logits = student.finish(student.run(state, names[-1:]), images.shape[-2:])
        return {"loss": unbiased_cross_entropy(logits, masks, k_old)}

    cfg = replace(loop, iterations=steps * info.world_size, epochs=None, max_epochs=None,
                  min_iterations=0, evals=0, encoder_lr=1.0)
    try:
        result = fit(student, step, dataset, cfg, desc="pretune", progress=progress,
                     dist_info=info, workers=workers)
    finally:
        for conv in convs:
            for name in list(conv.parametrizations):
                parametrize.remove_parametrizations(conv, name, leave_parametrized=True)
        student.frozen_upto = frozen_upto
        for name, p in student.named_parameters():
            p.requires_grad_(flags[name])
    return PretuneResult(iterations=result.iterations,
                         seconds=time.perf_counter() - t0,
                         first_loss=result.history[0]["loss"],
                         last_loss=result.history[-1]["loss"], stats_images=len(stems))
