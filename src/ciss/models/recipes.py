"""Training recipes per model family: what `ciss train` and `ciss add-classes` do by default.

Each recipe says where it comes from: measured here (BENCHMARKS.md) or taken from a
publication where nothing here can measure it (ImageNet encoders on photos, GPUs). Plain data:
the updater turns a recipe plus the user's options into one ``LoopConfig`` (updater/defaults).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BaseRecipe:
    """The step-0 recipe (``ciss train``).

    Attributes:
        iterations: optimiser steps at one process's batch size (the budget).
        lr: peak learning rate (poly decay after a linear warm-up).
        optimizer: "adamw" or "sgd".
        loss: one of ``losses.BASE_LOSSES``.
        scale: random rescale range of the training crops.
        warmup: fraction of the budget with linear warm-up.
        evals: validation points whose best weights are kept.
        encoder_lr: the encoder stages' learning rate as a fraction of ``lr``.
        source: where the recipe comes from.
    """

    iterations: int
    lr: float
    optimizer: str = "adamw"
    loss: str = "ce+dice"
    scale: tuple[float, float] = (1.0, 1.0)
    warmup: float = 0.03
    evals: int = 4
    encoder_lr: float = 1.0
    source: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepRecipe:
    """The add-classes recipe.

    Attributes:
        iterations: optimiser steps at one process's batch size: a ceiling when
            ``max_epochs`` is set.
        lr: peak learning rate of the head and classifier.
        optimizer: "adamw" or "sgd" (momentum 0.9).
        encoder_lr: the trainable encoder stages' rate as a fraction of ``lr`` (the
            literature trains the backbone at a tenth of the head's rate).
        bn_stats: "frozen" (BatchNorm keeps the parent's running statistics) or "update".
        max_epochs: passes over the new-class folder that the budget does not exceed...
        min_iterations: ...unless that would be fewer optimiser steps than this.
        evals: validation points whose best weights are kept (0: the last weights).
        warmup: fraction of the budget with linear warm-up.
        scale: random rescale range of the training crops.
        pretune: share of the budget spent first on NeST's classifier pre-tuning, for the
            methods whose row asks for it (``updater.pretune``; 0: none).
        source: where the recipe comes from.
    """

    iterations: int
    lr: float
    optimizer: str = "adamw"
    encoder_lr: float = 1.0
    bn_stats: str = "frozen"
    max_epochs: int | None = 20
    min_iterations: int = 315
    evals: int = 0
    warmup: float = 0.03
    scale: tuple[float, float] = (1.0, 1.0)
    pretune: float = 0.0
    source: str = ""

    def to_json(self) -> dict:
        return asdict(self)


# NeST's VOC 15-x scripts: 5 epochs of classifier pre-tuning before a 30-epoch step
NEST_SHARE = 5 / 30

# tiny is trained from scratch by ciss itself: both recipes were chosen on synthetic seed 0 and
# the foreign small/imbalance sets, and reported on held-out ones (BENCHMARKS.md §1-3).
TINY_BASE = BaseRecipe(iterations=1800, lr=4e-3, source="measured: BENCHMARKS.md §1 (tiny)")
# The pre-tuning's share: NeST's 5/30 and 1/3 were tried on seed 0's 15-5, 15-1 and 10-1; 1/3
# was at least as good as mib and as 5/30 on all three (BENCHMARKS.md §11j).
TINY_STEP = StepRecipe(iterations=630, lr=3e-3, pretune=1 / 3,
                       source="measured: BENCHMARKS.md §2-3 (tiny, synthetic 15-5/15-1); "
                              "pre-tuning 1/3 of the step: §11j")

# Models with an encoder trained elsewhere (torchvision, SMP, Hugging Face; ImageNet or the
# user's own training). The shape of the step follows DKD and STAR (their VOC scripts): SGD,
# backbone at a tenth of the head's rate, BatchNorm statistics frozen, poly decay. The head's
# rate was measured (BENCHMARKS.md §10, tuned on a torchvision model trained by a plain SGD
# loop, reported on SMP and SegFormer models it was not tuned on): within this budget the
# publications' 1e-3 (tuned for 30-60 epochs on a GPU) learned almost nothing new (new-class
# mIoU 0.007 against 0.054 at 1e-2, old classes kept alike). Chosen again on parents on an
# ImageNet encoder (BENCHMARKS.md §12d: tuned on an SMP Unet at 0.655 mIoU, reported on two
# held-out ones): MiB's init, lr 3e-2 and distillation weight 1 each lost on old or new
# classes; NeST's pre-tuning added half a point of old classes at 1.09x the time. On
# one-class steps (10-1, §12h) 3e-2 learned more of each new class on both seeds measured;
# it is documented advice (docs/pretrained.md), not the rate: on five-class steps it kept
# only 0.84x of one held-out parent's old classes. What nothing here can measure (photos, a
# GPU) is the publications'.
PRETRAINED_STEP = StepRecipe(
    iterations=630, lr=1e-2, optimizer="sgd", encoder_lr=0.1, bn_stats="frozen",
    source="measured: BENCHMARKS.md §10 and §12d (head 1e-2, encoder x0.1; re-chosen on an "
           "ImageNet-encoder parent at 0.655); shape from DKD (Baek et al. 2022) and STAR "
           "(Chen et al. 2023): SGD, encoder at a tenth, BN frozen, poly (their VOC scripts "
           "use head 1e-3 over 30-60 epochs)")
# Base training of those families from a random or ImageNet init: AdamW as their libraries'
# examples train them (SMP, transformers' SegFormer fine-tuning); not tuned here beyond the
# budget, which keeps ``ciss train`` within CPU minutes on the synthetic data.
LIBRARY_BASE = BaseRecipe(
    iterations=4000, lr=1e-3,
    source="library examples: AdamW 1e-3 poly (torchvision references use SGD 0.01 for "
           "DeepLabV3 on COCO); not tuned here")
SEGFORMER_BASE = BaseRecipe(
    iterations=4000, lr=6e-5 * 10, encoder_lr=0.1,
    source="publication: SegFormer (Xie et al. 2021) AdamW 6e-5 on the encoder, head x10, "
           "poly")
