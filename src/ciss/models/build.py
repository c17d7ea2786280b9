"""The ARCHS table and the one front door, ``build_model``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ciss.errors import CissError
from ciss.models.staged import SegmentationModel
from ciss.models.tiny import TinySeg
from ciss.models.tv import LRASPP, DeepLabV3

STAGES = ("stem", "stage1", "stage2", "stage3", "stage4", "head", "classifier")


@dataclass(frozen=True)
class ArchSpec:
    """One row of the architecture table.

    Attributes:
        builder: ``(num_classes, weights) -> SegmentationModel``.
        default_freeze: the last stage frozen by ``add-classes`` unless told otherwise.
        pretrained: whether ``--weights imagenet`` is available.
        note: one line for ``--help`` and the README.
    """

    builder: Callable[[int, str | None], SegmentationModel]
    default_freeze: str
    pretrained: bool
    note: str


def _tiny(num_classes: int, weights: str | None) -> SegmentationModel:
    if weights is not None:
        raise CissError("--weights: 'tiny' has no pretrained weights; train it from scratch")
    return TinySeg(num_classes)


ARCHS: dict[str, ArchSpec] = {
    "tiny": ArchSpec(_tiny, "stem", False, "our own fast U-Net, the CPU default"),
    "lraspp_mobilenet_v3_large": ArchSpec(
        lambda k, w: LRASPP("lraspp_mobilenet_v3_large", k, w), "stage3", True,
        "torchvision LRASPP, MobileNetV3-Large"),
    "deeplabv3_mobilenet_v3_large": ArchSpec(
        lambda k, w: DeepLabV3("deeplabv3_mobilenet_v3_large", k, w), "stage3", True,
        "torchvision DeepLabV3, MobileNetV3-Large"),
    "deeplabv3_resnet50": ArchSpec(
        lambda k, w: DeepLabV3("deeplabv3_resnet50", k, w), "stage3", True,
        "torchvision DeepLabV3, ResNet-50"),
    "deeplabv3_resnet101": ArchSpec(
        lambda k, w: DeepLabV3("deeplabv3_resnet101", k, w), "stage3", True,
        "torchvision DeepLabV3, ResNet-101 (the CiSS paper standard)"),
}


def build_model(arch: str, *, num_classes: int, weights: str | None = None) -> SegmentationModel:
    """Build a segmentation model from the ARCHS table.

    Args:
        arch: an ARCHS name.
        num_classes: output channels, background included.
        weights: None (random init, nothing downloads) or "imagenet" (backbone weights,
            downloaded by torchvision on first use).

    Raises:
        CissError: unknown architecture, or weights it does not offer.
    """
    if arch not in ARCHS:
        from difflib import get_close_matches

        hint = get_close_matches(arch, list(ARCHS), n=1)
        raise CissError(f"unknown architecture '{arch}'"
                        + (f"; did you mean '{hint[0]}'?" if hint else "")
                        + f" (choose from {', '.join(ARCHS)})")
    if num_classes < 2:
        raise CissError(f"num_classes={num_classes}: a model needs background and one class")
    model = ARCHS[arch].builder(num_classes, weights)
    assert model.stage_names == STAGES, model.stage_names
    return model
