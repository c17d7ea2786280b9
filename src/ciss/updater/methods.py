"""Per-batch losses of each incremental method, with the frozen trunk shared by student and
teacher (run once per batch, or read from a cache)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ciss.data.classes import IGNORE_INDEX
from ciss.models.staged import SegmentationModel, State
from ciss.updater import losses
from ciss.updater.pod import local_pod
from ciss.updater.pseudo import pseudo_label

METHODS = ("mib", "ft", "lwf", "ilt", "plop")


@dataclass(frozen=True)
class MethodConfig:
    """Loss settings.

    Attributes:
        method: mib (unbiased CE + unbiased KD), ft (plain CE), lwf (CE + KD on old channels),
            ilt (lwf + feature MSE), plop (CE on entropy pseudo-labels + Local POD on the
            trainable stages).
        kd_weight: lambda of the distillation term (mib 10, lwf/ilt 100 as in the literature).
        alpha: teacher sharpening in the distillation terms.
        feature_weight: weight of ILT's feature term.
        pseudo: mib only: background pixels the parent is confident about take its label.
        pod_weight: PLOP's Local POD factor per layer.
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
                 collect: bool) -> tuple[State, list[torch.Tensor]]:
        """The parent's outputs: from the shared trunk when there is one, else from the image.

        The parent is fixed and in eval mode, so its logits (and ILT's features) for one exact
        input never change: they are cached with the trunk. Local POD's per-stage maps are
        too large to keep and are recomputed.
        """
        def run(rows: list[int] | None, collect: bool) -> tuple[State, list[torch.Tensor]]:
            if shared is not None:
                start = shared if rows is None else {k: v[rows] for k, v in shared.items()}
                return run_collect(self.teacher, start, self.tail, collect)
            x = images if rows is None else images[rows]
            state, maps = run_collect(self.teacher, self.teacher.begin(x),
                                      self.teacher.stage_names, collect)
            return state, maps[len(maps) - len(self.tail) + 1:]  # the student's stages only

        with torch.no_grad():
            if collect or self.cache is None or keys is None:
                return run(None, collect)
            return self.cache.batch(keys, "teacher", lambda rows: {
                k: v for k, v in run(rows, False)[0].items() if k in ("logits", "features")}), []

    def __call__(self, images: torch.Tensor, masks: torch.Tensor,
                 keys: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        size = images.shape[-2:]
        cfg = self.config
        need_teacher = cfg.method != "ft"
        collect = cfg.method == "plop"  # Local POD needs each trainable stage's output
        shared = self._trunk(images, keys) if self.trunk else None
        # --freeze none (the reference recipe): the teacher runs on the image by itself
        s_state, s_maps = run_collect(
            self.student, shared if shared is not None else self.student.begin(images),
            self.tail, collect)
        if need_teacher:
            t_state, t_maps = self._teacher(images, keys, shared, collect)
        # losses in fp32 whatever autocast chose for the network: logsumexp and softmax over
        # channels, then means over many pixels, lose too much in bf16/fp16
        if cfg.loss_at == "logits":  # the labels come down to the logits instead
            size = s_state["logits"].shape[-2:]
            masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0].long()
        logits = self.student.finish(s_state, size).float()
        if cfg.method == "ft":
            ce = losses.cross_entropy(logits, masks)
            return {"loss": ce, "ce": ce.detach()}
        t_logits = self.teacher.finish(t_state, size).float()
        if cfg.method == "plop":
            return self._plop(logits, t_logits, masks, s_maps, t_maps)
        if cfg.method == "mib":
            if cfg.pseudo:  # confident old-class pixels take their label; the rest stay 0
                masks, _ = pseudo_label(masks, t_logits, self.thresholds, unsure=0)
            ce = losses.unbiased_cross_entropy(logits, masks, self.num_old)
            kd = losses.unbiased_distillation(logits, t_logits, alpha=cfg.alpha)
        else:
            ce = losses.cross_entropy(logits, masks)
            kd = losses.distillation(logits, t_logits, alpha=cfg.alpha)
        parts = {"ce": ce.detach(), "kd": kd.detach()}
        loss = ce + cfg.kd_weight * kd
        if cfg.method == "mib" and cfg.new_dice:
            dice = losses.new_class_dice(logits, masks, self.num_old)
            loss = loss + dice
            parts["dice"] = dice.detach()
        if cfg.method == "ilt":
            fd = losses.feature_distillation(s_state["features"].float(),
                                             t_state["features"].float())
            loss = loss + cfg.feature_weight * fd
            parts["feat"] = fd.detach()
        parts["loss"] = loss
        return parts

    def _plop(self, logits, t_logits, masks, s_maps, t_maps) -> dict[str, torch.Tensor]:
        """PLOP: CE on pseudo-labels (unconfident background ignored), each image weighted by
        its share of confident background pixels, plus Local POD on the trainable stages."""
        labels, share = pseudo_label(masks, t_logits, self.thresholds)
        per_pixel = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
        valid = (labels != IGNORE_INDEX).flatten(1)
        per_image = (per_pixel.flatten(1) * valid).sum(1) / valid.sum(1).clamp(min=1)
        ce = (per_image * share).mean()
        pod = local_pod(s_maps, t_maps, logits.shape[1], logits.shape[1] - self.num_old,
                        self.config.pod_weight)
        return {"loss": ce + pod, "ce": ce.detach(), "pod": pod.detach()}


def run_collect(model: SegmentationModel, state: State, names: list[str], collect: bool
                ) -> tuple[State, list[torch.Tensor]]:
    """Run ``names`` stages; with ``collect``, also return what each stage but the classifier
    produced (the maps Local POD distils)."""
    if not collect:
        return model.run(state, names), []
    maps = []
    for name in names:
        before = dict(state)
        state = model.run(state, [name])
        if name != "classifier":
            maps.append(next(v for k, v in state.items() if before.get(k) is not v))
    return state, maps
