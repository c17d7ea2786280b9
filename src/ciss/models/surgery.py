"""Model surgery: grow the classifier for new classes, freeze early stages."""

from __future__ import annotations

import math

import torch
from torch import nn

from ciss.errors import CissError
from ciss.models.staged import SegmentationModel

INITS = ("mib", "background", "random")


def _grown(conv: nn.Conv2d, n_new: int) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels + n_new, conv.kernel_size,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                    bias=conv.bias is not None)
    new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight[: conv.out_channels].copy_(conv.weight)
        if conv.bias is not None:
            new.bias[: conv.out_channels].copy_(conv.bias)
    return new


def grow_classifier(model: SegmentationModel, n_new: int, init: str = "mib") -> None:
    """Append ``n_new`` output channels to the model's classifier, in place.

    Old channels keep their weights exactly. New channels are initialised by ``init``:
    ``mib`` copies the background row and sets the new biases and the background bias to
    b_bg - log(n_new + 1), so P(background or new) equals the old P(background);
    ``background`` copies the background row and bias unchanged; ``random`` keeps PyTorch's
    default init.
    """
    if n_new < 1:
        raise CissError("grow_classifier: n_new must be at least 1")
    if init not in INITS:
        raise CissError(f"--init {init}: unknown; choose from {', '.join(INITS)}")
    convs = model.classifier_convs()
    k_old = model.num_classes
    for i, conv in enumerate(convs):
        new = _grown(conv, n_new)
        with torch.no_grad():
            if init in ("mib", "background"):
                new.weight[k_old:].copy_(conv.weight[0:1].expand(n_new, *conv.weight.shape[1:]))
                if conv.bias is not None:
                    new.bias[k_old:].fill_(float(conv.bias[0]))
            # With several summed classifiers (LRASPP) the log shift is applied once, to the last.
            if init == "mib" and i == len(convs) - 1:
                shift = math.log(n_new + 1)
                if new.bias is None:
                    raise CissError("mib init needs a classifier bias")
                new.bias[k_old:] -= shift
                new.bias[0] -= shift
        _replace(model, conv, new)
    model.num_classes = k_old + n_new


def fuse_endpoints(student: SegmentationModel, parent: SegmentationModel, n_old: int,
                   n_new: int) -> float:
    """EWF's endpoint fusion (Xiao et al., CVPR 2023, its released code), in place: every
    weight and buffer the parent has becomes (1 - w) x the parent's + w x the student's, with
    w = sqrt(n_new / (n_new + n_old)); the new classes' classifier rows stay as trained.
    Returns w."""
    w = math.sqrt(n_new / (n_new + n_old))
    k_old = parent.num_classes
    old = parent.state_dict()
    with torch.no_grad():
        for name, value in student.state_dict().items():
            ref = old.get(name)
            if ref is None or not value.is_floating_point():
                continue  # counters (BatchNorm's num_batches_tracked) stay the student's
            if ref.shape == value.shape:
                value.copy_((1 - w) * ref + w * value)
            elif ref.shape[1:] == value.shape[1:] and ref.shape[0] == k_old:  # a grown row set
                value[:k_old].copy_((1 - w) * ref + w * value[:k_old])
    return w


def sigmoid_form(model: SegmentationModel) -> None:
    """Rewrite the classifier so that the background logit is the constant 0, in place.

    Every row (weights and bias) has the background row subtracted, and the background row
    becomes zero: each logit becomes z_c - z_0, so the argmax over channels, and with it every
    prediction, is unchanged, and sigmoid(z_c - z_0) = p_c / (p_c + p_0) reads as "class c
    rather than background". Methods that score classes with sigmoids (DKD) start from it.
    Summed classifiers (LRASPP) are rewritten each: a sum of differences is the difference
    of the sums. Applying it twice changes nothing.
    """
    with torch.no_grad():
        for conv in model.classifier_convs():
            conv.weight -= conv.weight[0:1].clone()
            if conv.bias is not None:
                conv.bias -= conv.bias[0].clone()


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise RuntimeError("classifier conv not found in the model")


def resolve_stage(model: SegmentationModel, upto: str | None) -> int:
    """Index of stage ``upto`` (``None`` or ``"none"``: -1, nothing frozen)."""
    if upto is None or upto == "none":
        return -1
    names = model.stage_names
    if upto not in names:
        raise CissError(f"--freeze {upto}: unknown stage for {model.arch}; "
                        f"choose from none, {', '.join(names[:-1])}")
    if upto == names[-1]:
        raise CissError("--freeze classifier: nothing would be left to train")
    return names.index(upto)


def freeze(model: SegmentationModel, upto: str | None) -> None:
    """Freeze every stage up to and including ``upto``: no gradients, BatchNorm in eval mode."""
    last = resolve_stage(model, upto)
    model.frozen_upto = last
    for i, name in enumerate(model.stage_names):
        for p in model.stages[name].parameters():
            p.requires_grad_(i > last)
    model.train(model.training)


def freeze_bn_stats(model: SegmentationModel, frozen: bool = True) -> None:
    """Keep every BatchNorm's running mean and variance as they are while training.

    A new-class folder is not the base data: its images show other scenes and few old objects,
    and batch statistics taken from it shift what the parent's layers see on old data. With
    frozen statistics the trainable stages adapt their weights only (BENCHMARKS.md §2).
    """
    model.bn_stats_frozen = frozen
    model.train(model.training)


def frozen_stages(model: SegmentationModel) -> tuple[str, ...]:
    return model.stage_names[: model.frozen_upto + 1]
