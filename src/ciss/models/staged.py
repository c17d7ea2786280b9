"""The staged model interface every architecture implements.

A forward pass is a chain of named stages over a small state dict, so that the updater can run
the frozen trunk once and fork the rest (student and teacher), and the analysis can read or
transplant any stage.

What a family must provide (the contract the updater, exporters and analysis rely on):

- ``stages``: an ordered ModuleDict whose names are an in-order subset of ``STAGES`` that
  ends with ``head`` and ``classifier``; encoder stages a family does not have are left out
  (SegFormer has no stem). Freezing, CKA and transplants go stage by stage.
- ``run_stage(name, state)``: runs one stage on the state dict. Keys every family writes:
  ``features`` (the encoder's last output, after the last encoder stage: ILT distils it) and
  ``logits`` (the classifier's output, at any resolution: ``finish`` brings it to the input
  size). Other keys are the family's own.
- ``classifier_convs()``: the convolutions whose outputs are (summed into) the logits, the
  only place that knows where the classes are (growing the classifier, import checks).
- ``config``: a JSON-able dict that, with the arch name and ``num_classes``, rebuilds the
  same module (it is written on the step card); ``mean``/``std`` in pixel units 0..255.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STAGES = ("stem", "stage1", "stage2", "stage3", "stage4", "head", "classifier")
State = dict[str, torch.Tensor]


class SegmentationModel(nn.Module):
    """Base class: uint8 or float [N,3,H,W] images in 0..255, logits [N,K,H,W] out.

    Normalisation lives inside the model so that exported graphs take raw pixels.
    Subclasses fill ``self.stages`` (an ordered ModuleDict) and implement ``run_stage``.

    Attributes:
        arch: the ARCHS name.
        num_classes: output channels (background included).
        frozen_upto: index of the last frozen stage, -1 when nothing is frozen.
        bn_stats_frozen: every BatchNorm keeps its running statistics in training too (the
            trainable stages still learn their weights); see ``freeze_bn_stats``.
    """

    features_stage = "stage4"

    def __init__(self, arch: str, num_classes: int,
                 mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        """``mean``/``std``: the author's normalisation of x/255 (ImageNet's by default)."""
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.frozen_upto = -1
        self.bn_stats_frozen = False
        self.config: dict = {}
        self.stages = nn.ModuleDict()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0,
                             persistent=False)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(self.stages.keys())

    @property
    def preprocessing(self) -> dict[str, list[float]]:
        """The normalisation applied to x/255 inside the model (and so inside its exports)."""
        return {"mean": [round(float(v) / 255.0, 6) for v in self.mean.flatten()],
                "std": [round(float(v) / 255.0, 6) for v in self.std.flatten()]}

    def set_preprocessing(self, mean, std) -> None:
        """Normalise x/255 with ``mean``/``std`` (three values each; std > 0) from now on, and
        say so in ``config`` (so the card rebuilds it)."""
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean {mean}, std {std}: three values each, std > 0")
        self.mean.copy_(torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.std.copy_(torch.tensor(std).view(1, 3, 1, 1) * 255.0)
        self.config.update(self.preprocessing)

    def check_stages(self) -> None:
        """Refuse a family whose stages break the contract above (a programming error)."""
        names = self.stage_names
        if names[-2:] != ("head", "classifier") or [n for n in STAGES if n in names] != list(
                names):
            raise RuntimeError(f"{self.arch}: stages {names} are not an ordered subset of "
                               f"{STAGES} ending with head, classifier")

    def begin(self, image: torch.Tensor) -> State:
        """Normalise raw pixels into the initial state."""
        return {"x": (image.float() - self.mean) / self.std}

    def run_stage(self, name: str, state: State) -> State:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, state: State, names: tuple[str, ...] | list[str]) -> State:
        """Run ``names`` in order; returns a new state (the input dict is not modified)."""
        state = dict(state)
        for name in names:
            state = self.run_stage(name, state)
        return state

    def finish(self, state: State, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """Logits at the input resolution."""
        return F.interpolate(state["logits"], size=size, mode="bilinear", align_corners=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.finish(self.run(self.begin(image), self.stage_names), image.shape[-2:])

    def classifier_convs(self) -> list[nn.Conv2d]:
        """The 1x1 convolutions whose outputs are (summed into) the logits."""
        return [self.stages["classifier"]]

    def train(self, mode: bool = True) -> SegmentationModel:
        super().train(mode)
        # Frozen stages keep BatchNorm in eval mode: running statistics must not drift.
        for name in self.stage_names[: self.frozen_upto + 1]:
            self.stages[name].eval()
        if mode and self.bn_stats_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self
