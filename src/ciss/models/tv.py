"""Adapters that expose torchvision's segmentation models through the staged interface.

The torchvision modules are reused as they are (same parameter objects, same forward maths);
only the order in which they are called is made explicit, stage by stage.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ciss.errors import CissError
from ciss.models.staged import SegmentationModel, State

# MobileNetV3-Large feature blocks 0..16 grouped so that LRASPP's "low" tap (block 4, the first
# stride-8 block) ends a stage.
MOBILENET_STAGES = {"stem": (0, 2), "stage1": (2, 4), "stage2": (4, 5), "stage3": (5, 13),
                    "stage4": (13, 17)}


def _backbone_weights(arch: str, weights: str | None):
    """torchvision's ImageNet weights for ``--weights imagenet``, fetched into the torch hub
    cache first (None for no weights or a local file, which ``load_backbone_file`` reads)."""
    if weights is None or weights != "imagenet":
        if weights is not None and not Path(weights).is_file():
            raise CissError(f"--weights {weights}: neither 'imagenet' nor an existing file")
        return None
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, ResNet101_Weights
    w = {"resnet50": ResNet50_Weights.IMAGENET1K_V1,
         "resnet101": ResNet101_Weights.IMAGENET1K_V1,
         "mobilenet": MobileNet_V3_Large_Weights.IMAGENET1K_V1}[arch]
    fetch_to_hub_cache(w.url)
    return w


def _init_record(backbone, weights: str | None) -> dict:
    """The card's record of the backbone's initial weights (``models.imagenet``)."""
    from ciss.models.imagenet import init_record, sha256_of

    if backbone is None:
        return init_record(weights)
    return {"weights": "imagenet", "source": f"torchvision: {backbone.url}",
            "sha256": sha256_of(hub_cache_path(backbone.url))}


def hub_cache_path(url: str) -> Path:
    """Where torchvision looks for (and downloads) the file at ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def fetch_to_hub_cache(url: str) -> Path:
    """The cached file for ``url``, downloaded first when missing.

    Raises:
        CissError: offline (or the download failed): one line saying which file to put where.
    """
    path = hub_cache_path(url)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except (OSError, ValueError) as exc:  # URLError is an OSError
        raise CissError(f"cannot download {url} ({exc.__class__.__name__}); put that file at "
                        f"{path}, or pass --weights PATH to a local backbone file") from None
    return path


def load_backbone_file(tv: nn.Module, weights: str | None) -> None:
    """``--weights PATH``: a backbone state dict (as torchvision's ImageNet classifiers save
    it; classifier keys such as ``fc.*`` are ignored) loaded into ``tv.backbone``."""
    if weights is None or weights == "imagenet":
        return
    from ciss.models.weights import load_encoder_file

    load_encoder_file(tv.backbone, Path(weights), ("backbone.", "features."),
                      "a backbone of this architecture")


def _mobilenet_stages(features: nn.Module) -> nn.ModuleDict:
    blocks = list(features.children())
    if len(blocks) != 17:
        raise RuntimeError(f"unexpected MobileNetV3 layout: {len(blocks)} blocks")
    return nn.ModuleDict({name: nn.Sequential(*blocks[a:b])
                          for name, (a, b) in MOBILENET_STAGES.items()})


class DeepLabV3(SegmentationModel):
    """torchvision DeepLabV3 (ResNet or MobileNetV3 backbone), aux head dropped.

    Stages: stem, stage1..stage4 (backbone), head (ASPP + 3x3 conv), classifier (1x1 conv).
    """

    def __init__(self, arch: str, num_classes: int, weights: str | None = None,
                 tv: nn.Module | None = None) -> None:
        """``tv``: an existing torchvision model to wrap (``ciss import``); else one is built."""
        super().__init__(arch, num_classes)
        if tv is None:
            from torchvision.models import segmentation as seg

            backbone_key = "mobilenet" if "mobilenet" in arch else arch.rsplit("_", 1)[-1]
            backbone = _backbone_weights(backbone_key, weights)
            tv = getattr(seg, arch)(weights=None, weights_backbone=backbone,
                                    num_classes=num_classes, aux_loss=False)
            load_backbone_file(tv, weights)
            self.config["init"] = _init_record(backbone, weights)
        body = tv.backbone
        if "mobilenet" in arch:
            # IntermediateLayerGetter keeps the feature blocks as children "0".."16".
            self.stages.update(_mobilenet_stages(nn.Sequential(*body.children())))
        else:
            self.stages["stem"] = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool)
            for i in range(1, 5):
                self.stages[f"stage{i}"] = getattr(body, f"layer{i}")
        head = list(tv.classifier.children())
        self.stages["head"] = nn.Sequential(*head[:-1])
        self.stages["classifier"] = head[-1]

    def run_stage(self, name: str, state: State) -> State:
        if name == "stem":
            state["h"] = self.stages[name](state.pop("x"))
        elif name.startswith("stage"):
            state["h"] = self.stages[name](state.pop("h"))
            if name == "stage4":
                state["features"] = state.pop("h")
        elif name == "head":
            state["head"] = self.stages[name](state["features"])
        elif name == "classifier":
            state["logits"] = self.stages[name](state.pop("head"))
        else:
            raise KeyError(name)
        return state


class LRASPPHeadPart(nn.Module):
    """LRASPP's shared part: x = cbr(high) * scale(high), upsampled to the low branch."""

    def __init__(self, cbr: nn.Module, scale: nn.Module) -> None:
        super().__init__()
        self.cbr = cbr
        self.scale = scale

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        x = self.cbr(high) * self.scale(high)
        return F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)


class LRASPPClassifier(nn.Module):
    """LRASPP's two classifiers, whose outputs are summed into the logits."""

    def __init__(self, low_classifier: nn.Conv2d, high_classifier: nn.Conv2d) -> None:
        super().__init__()
        self.low_classifier = low_classifier
        self.high_classifier = high_classifier

    def forward(self, low: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        return self.low_classifier(low) + self.high_classifier(head)


class LRASPP(SegmentationModel):
    """torchvision LRASPP on MobileNetV3-Large.

    Stages: stem, stage1..stage4, head (cbr x scale), classifier (low + high 1x1 convs).
    """

    def __init__(self, arch: str, num_classes: int, weights: str | None = None,
                 tv: nn.Module | None = None) -> None:
        """``tv``: an existing torchvision model to wrap (``ciss import``); else one is built."""
        super().__init__(arch, num_classes)
        if tv is None:
            from torchvision.models.segmentation import lraspp_mobilenet_v3_large

            backbone = _backbone_weights("mobilenet", weights)
            tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=backbone,
                                           num_classes=num_classes)
            load_backbone_file(tv, weights)
            self.config["init"] = _init_record(backbone, weights)
        self.stages.update(_mobilenet_stages(nn.Sequential(*tv.backbone.children())))
        h = tv.classifier
        self.stages["head"] = LRASPPHeadPart(h.cbr, h.scale)
        self.stages["classifier"] = LRASPPClassifier(h.low_classifier, h.high_classifier)

    def run_stage(self, name: str, state: State) -> State:
        if name == "stem":
            state["h"] = self.stages[name](state.pop("x"))
        elif name.startswith("stage"):
            state["h"] = self.stages[name](state.pop("h"))
            if name == "stage2":
                state["low"] = state["h"]
            if name == "stage4":
                state["features"] = state.pop("h")
        elif name == "head":
            state["head"] = self.stages[name](state["features"], state["low"])
        elif name == "classifier":
            state["logits"] = self.stages[name](state.pop("low"), state.pop("head"))
        else:
            raise KeyError(name)
        return state

    def classifier_convs(self) -> list[nn.Conv2d]:
        c = self.stages["classifier"]
        return [c.low_classifier, c.high_classifier]


def torchvision_module(arch: str, num_classes: int) -> nn.Module:
    """The plain torchvision model of ``arch`` (random init, no auxiliary head)."""
    from torchvision.models import segmentation as seg

    kwargs = {"aux_loss": False} if arch.startswith("deeplabv3") else {}
    return getattr(seg, arch)(weights=None, weights_backbone=None, num_classes=num_classes,
                              **kwargs)


def wrap_torchvision(arch: str, tv: nn.Module, num_classes: int) -> SegmentationModel:
    """``tv`` (a torchvision segmentation model of ``arch``) through the staged interface."""
    return (LRASPP if arch.startswith("lraspp") else DeepLabV3)(arch, num_classes, tv=tv)
