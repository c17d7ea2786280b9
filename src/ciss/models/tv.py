"""Adapters that expose torchvision's segmentation models through the staged interface.

The torchvision modules are reused as they are (same parameter objects, same forward maths);
only the order in which they are called is made explicit, stage by stage.
"""

from __future__ import annotations

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
    if weights is None:
        return None
    if weights != "imagenet":
        raise CissError(f"--weights {weights}: unknown; use 'imagenet' (or leave it out)")
    from torchvision.models import MobileNet_V3_Large_Weights, ResNet50_Weights, ResNet101_Weights
    return {"resnet50": ResNet50_Weights.IMAGENET1K_V1,
            "resnet101": ResNet101_Weights.IMAGENET1K_V1,
            "mobilenet": MobileNet_V3_Large_Weights.IMAGENET1K_V1}[arch]


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

    def __init__(self, arch: str, num_classes: int, weights: str | None = None) -> None:
        super().__init__(arch, num_classes)
        from torchvision.models import segmentation as seg

        builder = getattr(seg, arch)
        backbone_key = "mobilenet" if "mobilenet" in arch else arch.rsplit("_", 1)[-1]
        tv = builder(weights=None, weights_backbone=_backbone_weights(backbone_key, weights),
                     num_classes=num_classes, aux_loss=False)
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

    def __init__(self, arch: str, num_classes: int, weights: str | None = None) -> None:
        super().__init__(arch, num_classes)
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        tv = lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=_backbone_weights("mobilenet", weights),
            num_classes=num_classes)
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
