"""`tiny`: a small U-Net-style network built for fast CPU training on small images.

Most of the compute sits in the encoder (stem..stage4) and the decoder is light. That split
follows the CiSS finding that forgetting lives in the deep, classifier-side layers: the
encoder can be frozen and shared with the teacher when new classes arrive, and what remains
to train is cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ciss.models.staged import SegmentationModel, State


def conv_bn(cin: int, cout: int, stride: int = 1, dilation: int = 1,
            kernel: int = 3) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Fuse(nn.Module):
    """Upsample to the skip's size, concatenate, mix with a 1x1 then a 3x3 convolution."""

    def __init__(self, cin: int, cskip: int, cout: int) -> None:
        super().__init__()
        self.mix = conv_bn(cin + cskip, cout, kernel=1)
        self.conv = conv_bn(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(self.mix(torch.cat([x, skip], dim=1)))


class TinyHead(nn.Module):
    def __init__(self, c_feat: int, c_s1: int, c_s0: int) -> None:
        super().__init__()
        self.reduce = conv_bn(c_feat, c_s1, kernel=1)
        self.fuse1 = Fuse(c_s1, c_s1, c_s1)
        self.fuse0 = Fuse(c_s1, c_s0, c_s0)

    def forward(self, features: torch.Tensor, s1: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
        return self.fuse0(self.fuse1(self.reduce(features), s1), s0)


class TinySeg(SegmentationModel):
    """Encoder to 1/8 with dilated context, light two-level decoder back to 1/2; logits are
    upsampled bilinearly to the input size.

    Stages: stem (1/2), stage1 (1/4), stage2 (1/8), stage3 and stage4 (1/8, dilated), head,
    classifier.
    """

    def __init__(self, num_classes: int, width: int = 24) -> None:
        super().__init__("tiny", num_classes)
        w0, w1, w2, w3 = width, width * 2, width * 4, width * 5
        # A full-resolution conv first: textures have 2-3 px periods that a strided conv
        # would alias. It has 3 input channels, so it is cheap.
        self.stages["stem"] = nn.Sequential(conv_bn(3, 16), conv_bn(16, w0, stride=2))
        self.stages["stage1"] = nn.Sequential(conv_bn(w0, w1, stride=2), conv_bn(w1, w1))
        self.stages["stage2"] = nn.Sequential(conv_bn(w1, w2, stride=2), conv_bn(w2, w2))
        self.stages["stage3"] = nn.Sequential(conv_bn(w2, w3, dilation=2),
                                              conv_bn(w3, w3, dilation=4))
        self.stages["stage4"] = nn.Sequential(conv_bn(w3, w3, dilation=2), conv_bn(w3, w3))
        self.stages["head"] = TinyHead(w3, w1, w0)
        self.stages["classifier"] = nn.Conv2d(w0, num_classes, 1)

    def run_stage(self, name: str, state: State) -> State:
        m = self.stages[name]
        if name == "stem":
            state["s0"] = m(state.pop("x"))
        elif name == "stage1":
            state["s1"] = m(state["s0"])
        elif name == "stage2":
            state["h"] = m(state["s1"])
        elif name == "stage3":
            state["h"] = m(state.pop("h"))
        elif name == "stage4":
            state["features"] = m(state.pop("h"))
        elif name == "head":
            state["head"] = m(state["features"], state.pop("s1"), state.pop("s0"))
        elif name == "classifier":
            state["logits"] = m(state.pop("head"))
        else:
            raise KeyError(name)
        return state
