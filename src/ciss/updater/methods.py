"""Per-batch losses of each incremental method, with the frozen trunk shared by student and
teacher (run once per batch, or read from a cache)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ciss.data.classes import IGNORE_INDEX
from ciss.models.staged import SegmentationModel, State
from ciss.updater import losses
from ciss.updater.method_table import method_row
from ciss.updater.pod import local_pod
from ciss.updater.pseudo import pseudo_label


@dataclass(frozen=True)
class MethodConfig:
    """Loss settings.

    Attributes:
        method: a name of ``method_table.METHODS`` (mib, ft, lwf, ilt, plop, dkd).
        kd_weight: lambda of the distillation terms (each row's default: mib 10, lwf/ilt
            100, dkd 5, as in the literature).
        alpha: teacher sharpening in the distillation terms.
        feature_weight: weight of ILT's feature term.
        pseudo: mib only: background pixels the parent is confident about take its label.
        pod_weight: PLOP's Local POD factor per encoder stage.
        pod_logits_weight: PLOP's Local POD factor on the logits (its "after" option).
        loss_at: "input" (logits upsampled to the image, the literature's way) or "logits"
            (labels nearest-downsampled to the logits' resolution, teacher alike: cheaper).
        new_dice: mib: add a soft Dice over the new classes' channels (small new objects do
            not drown in background, as the base recipe's CE + Dice).
    """

    method: str = "mib"
    kd_weight: float = 10.0
    alpha: float = 1.0
    feature_weight: float = 100.0
    pseudo: bool = False
    pod_weight: float = 0.01
    pod_logits_weight: float = 0.0005
    loss_at: str = "input"
    new_dice: bool = False


class TrunkCache:
    """Per-input results that cannot change during a step, within a byte budget (first come,
    first kept): the frozen trunk's states and the parent's outputs.

    A key is one exact input (an image and whether it was flipped, see SegmentationDataset);
    ``kind`` separates what is kept for it ("trunk", "teacher").
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self.items: dict[tuple[str, int], State] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: int, kind: str = "trunk") -> State | None:
        item = self.items.get((kind, key))
        if item is None:
            self.misses += 1
        else:
            self.hits += 1
        return item

    def put(self, key: int, state: State, kind: str = "trunk") -> None:
        size = sum(t.numel() * t.element_size() for t in state.values())
        if (kind, key) not in self.items and self.used + size <= self.budget:
            self.items[(kind, key)] = state
            self.used += size

    def batch(self, keys: torch.Tensor, kind: str, compute) -> State:
        """The batch's states for ``keys``: cached ones read, the rest computed together by
        ``compute(indices) -> State`` (batched along dim 0) and kept."""
        states = [self.get(int(k), kind) for k in keys]
        missing = [i for i, s in enumerate(states) if s is None]
        if missing:
            fresh = compute(missing)
            for j, i in enumerate(missing):
                # clone: a row view would keep the whole batch's storage alive in the cache
                states[i] = {k: v[j].clone() for k, v in fresh.items()}
                self.put(int(keys[i]), states[i], kind)
        return {k: torch.stack([s[k] for s in states]) for k in states[0]}


class IncrementalStep:
    """The step function for ``fit``: trunk once, then student and teacher tails."""

    def __init__(self, student: SegmentationModel, teacher: SegmentationModel, num_old: int,
                 config: MethodConfig, cache: TrunkCache | None = None,
                 thresholds: torch.Tensor | None = None) -> None:
        self.student = student
        self.teacher = teacher.eval()
        self.num_old = num_old
        self.config = config
        self.cache = cache
        self.thresholds = thresholds  # per old class entropy thresholds (plop, --pseudo)
        self.row = method_row(config.method)
        if self.row.name not in LOSSES:  # a row without its losses is a programming error
            raise RuntimeError(f"method {self.row.name!r} has no loss function")
        names = student.stage_names
        self.trunk = names[: student.frozen_upto + 1]
        self.tail = names[student.frozen_upto + 1:]

    def _trunk(self, images: torch.Tensor, keys: torch.Tensor | None) -> State:
        with torch.no_grad():
            if self.cache is None or keys is None:
                return self.student.run(self.student.begin(images), self.trunk)
            return self.cache.batch(keys, "trunk", lambda rows: self.student.run(
                self.student.begin(images[rows]), self.trunk))

    def _teacher(self, images: torch.Tensor, keys: torch.Tensor | None, shared: State | None,
                 collect: bool, cacheable: bool = True
                 ) -> tuple[State, dict[str, torch.Tensor]]:
        """The parent's outputs: from the shared trunk when there is one, else from the image.

        The parent is fixed and in eval mode, so its logits (and ILT's features) for one exact
        input never change: they are cached with the trunk. Local POD's per-stage maps are
        too large to keep and are recomputed; so is everything when the caller needs the run
        itself (``cacheable`` False: DKD's hooks read the classifier's input).
        """
        def run(rows: list[int] | None, collect: bool
                ) -> tuple[State, dict[str, torch.Tensor]]:
            if shared is not None:
                start = shared if rows is None else {k: v[rows] for k, v in shared.items()}
                return run_collect(self.teacher, start, self.tail, collect)
            x = images if rows is None else images[rows]
            state, maps = run_collect(self.teacher, self.teacher.begin(x),
                                      self.teacher.stage_names, collect)
            return state, {k: v for k, v in maps.items() if k in self.tail}  # the student's

        with torch.no_grad():
            if collect or not cacheable or self.cache is None or keys is None:
                return run(None, collect)
            return self.cache.batch(keys, "teacher", lambda rows: {
                k: v for k, v in run(rows, False)[0].items() if k in ("logits", "features")}), {}

    def __call__(self, images: torch.Tensor, masks: torch.Tensor,
                 keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        size = images.shape[-2:]
        cfg, row = self.config, self.row
        collect = row.stage_maps  # Local POD needs each trainable stage's output
        shared = self._trunk(images, keys) if self.trunk else None
        # --freeze none (the reference recipe): the teacher runs on the image by itself
        with capture_inputs(self.student, row.classifier_inputs) as s_inputs:
            s_state, s_maps = run_collect(
                self.student, shared if shared is not None else self.student.begin(images),
                self.tail, collect)
        t_state, t_maps, t_inputs = None, {}, []
        if row.teacher:
            with capture_inputs(self.teacher, row.classifier_inputs) as t_inputs:
                t_state, t_maps = self._teacher(images, keys, shared, collect,
                                                cacheable=not row.classifier_inputs)
        # losses in fp32 whatever autocast chose for the network: logsumexp and softmax over
        # channels, then means over many pixels, lose too much in bf16/fp16
        if cfg.loss_at == "logits":  # the labels come down to the logits instead
            size = s_state["logits"].shape[-2:]
            masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()
        batch = Batch(
            logits=self.student.finish(s_state, size).float(), masks=masks,
            num_old=self.num_old, config=cfg,
            t_logits=None if t_state is None else self.teacher.finish(t_state, size).float(),
            s_state=s_state, t_state=t_state, s_maps=s_maps, t_maps=t_maps,
            thresholds=self.thresholds,
            s_inputs=list(s_inputs), t_inputs=list(t_inputs),
            s_convs=self.student.classifier_convs(), t_convs=self.teacher.classifier_convs())
        return LOSSES[row.name](batch)


@dataclass
class Batch:
    """What a method's loss function reads for one batch (teacher fields None for ft)."""

    logits: torch.Tensor  # the student's, fp32, at the loss resolution
    masks: torch.Tensor
    num_old: int
    config: MethodConfig
    t_logits: torch.Tensor | None = None
    s_state: State | None = None
    t_state: State | None = None
    s_maps: dict[str, torch.Tensor] = field(default_factory=dict)  # encoder stage -> output
    t_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    thresholds: torch.Tensor | None = None
    s_inputs: list[torch.Tensor] = field(default_factory=list)  # each classifier conv's input
    t_inputs: list[torch.Tensor] = field(default_factory=list)
    s_convs: list[nn.Conv2d] = field(default_factory=list)
    t_convs: list[nn.Conv2d] = field(default_factory=list)


def _ft(b: Batch) -> dict[str, torch.Tensor]:
    ce = losses.cross_entropy(b.logits, b.masks)
    return {"loss": ce, "ce": ce.detach()}


def _mib(b: Batch) -> dict[str, torch.Tensor]:
    cfg, masks = b.config, b.masks
    if cfg.pseudo:  # confident old-class pixels take their label; the rest stay 0
        masks, _ = pseudo_label(masks, b.t_logits, b.thresholds, unsure=0)
    ce = losses.unbiased_cross_entropy(b.logits, masks, b.num_old)
    kd = losses.unbiased_distillation(b.logits, b.t_logits, alpha=cfg.alpha)
    loss = ce + cfg.kd_weight * kd
    parts = {"ce": ce.detach(), "kd": kd.detach()}
    if cfg.new_dice:
        dice = losses.new_class_dice(b.logits, masks, b.num_old)
        loss = loss + dice
        parts["dice"] = dice.detach()
    return {"loss": loss, **parts}


def _lwf(b: Batch) -> dict[str, torch.Tensor]:
    ce = losses.cross_entropy(b.logits, b.masks)
    kd = losses.distillation(b.logits, b.t_logits, alpha=b.config.alpha)
    return {"loss": ce + b.config.kd_weight * kd, "ce": ce.detach(), "kd": kd.detach()}


def _ilt(b: Batch) -> dict[str, torch.Tensor]:
    parts = _lwf(b)
    fd = losses.feature_distillation(b.s_state["features"].float(),
                                     b.t_state["features"].float())
    return {**parts, "loss": parts["loss"] + b.config.feature_weight * fd, "feat": fd.detach()}


def _plop(b: Batch) -> dict[str, torch.Tensor]:
    """PLOP (Douillard et al. 2021, its released code's VOC options): CE on pseudo-labels
    (unconfident background ignored), each image weighted by its share of confident
    background pixels; Local POD on the trainable encoder stages' outputs (factor
    ``pod_weight``), and on the logits at the classifier's resolution (factor
    ``pod_logits_weight``, the student's new channels summed into its background)."""
    labels, share = pseudo_label(b.masks, b.t_logits, b.thresholds)
    per_pixel = F.cross_entropy(b.logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).flatten(1)
    per_image = (per_pixel.flatten(1) * valid).sum(1) / valid.sum(1).clamp(min=1)
    ce = (per_image * share).mean()
    k, cfg = b.logits.shape[1], b.config
    names = [n for n in b.s_maps if n in b.t_maps]
    pod = local_pod([b.s_maps[n] for n in names], [b.t_maps[n] for n in names], k,
                    k - b.num_old, cfg.pod_weight)
    s_small, t_small = b.s_state["logits"].float(), b.t_state["logits"].float()
    s_small = torch.cat([s_small[:, :1] + s_small[:, b.num_old:].sum(1, keepdim=True),
                         s_small[:, 1:b.num_old]], dim=1)
    pod_logits = local_pod([s_small], [t_small], k, k - b.num_old, cfg.pod_logits_weight)
    # PLOP averages over every distilled layer, the logits included
    n = len(names) + 1
    pod = (pod * len(names) + pod_logits) / n
    return {"loss": ce + pod, "ce": ce.detach(), "pod": pod.detach()}


def _dkd(b: Batch) -> dict[str, torch.Tensor]:
    """DKD (Baek et al. 2022) on a classifier in sigmoid form (background logit 0): BCE on
    the new classes, BCE distillation of the old classes' logits, and of the positive and
    negative parts of each old class's logit at the classifier's resolution. DKD's
    auxiliary "unknown" head and its loss are left out: here the background is the
    constant logit 0, which no loss trains. As in DKD-M, a replayed memory image teaches the
    old classes through distillation only: supervising the old sigmoids on its old-class
    labels made it forget (BENCHMARKS.md §11), since a softmax parent's z_c - z_0 is large
    for several classes on any object pixel, where the background is unlikely."""
    w = b.config.kd_weight
    new = losses.binary_new_classes(b.logits, b.masks, b.num_old)
    kd = losses.binary_distillation(b.logits[:, 1:b.num_old], b.t_logits[:, 1:b.num_old])
    pos = neg = b.logits.new_zeros(())
    for x_s, x_t, c_s, c_t in zip(b.s_inputs, b.t_inputs, b.s_convs, b.t_convs):
        ps, ns = losses.decomposed_logits(x_s.float(), c_s, 1, b.num_old)
        with torch.no_grad():
            pt, nt = losses.decomposed_logits(x_t.float(), c_t, 1, b.num_old)
        pos = pos + losses.binary_distillation(ps, pt)
        neg = neg + losses.binary_distillation(ns, nt)
    loss = new + w * (kd + pos + neg)
    return {"loss": loss, "bce": new.detach(), "kd": kd.detach(), "pos": pos.detach(),
            "neg": neg.detach()}


# one loss function per row of method_table.METHODS (tests check that both name the same set)
LOSSES: dict[str, Callable[[Batch], dict[str, torch.Tensor]]] = {
    "mib": _mib, "ft": _ft, "lwf": _lwf, "ilt": _ilt, "plop": _plop, "dkd": _dkd}


@contextlib.contextmanager
def capture_inputs(model: SegmentationModel, enabled: bool) -> Iterator[list[torch.Tensor]]:
    """Collect what each of the model's classifier convolutions receives while inside."""
    seen: list[torch.Tensor] = []
    if not enabled:
        yield seen
        return
    hooks = [c.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
             for c in model.classifier_convs()]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def run_collect(model: SegmentationModel, state: State, names: tuple[str, ...] | list[str],
                collect: bool) -> tuple[State, dict[str, torch.Tensor]]:
    """Run ``names`` stages; with ``collect``, also return what each encoder stage among them
    produced (the maps Local POD distils: PLOP distils the backbone's stages, not the
    decoder's output, which must stay free to serve the new classes)."""
    if not collect:
        return model.run(state, names), {}
    maps = {}
    for name in names:
        before = dict(state)
        state = model.run(state, [name])
        if name not in ("head", "classifier"):
            maps[name] = next(v for k, v in state.items() if before.get(k) is not v)
    return state, maps
