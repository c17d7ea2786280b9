"""``ciss diagnose``: why did a step forget? Background shift vs new-class bias, stage by stage.

One pass runs the parent (``against``) and the child (``step``) on the same images and collects
everything that streams: partial-label confusion matrices, where each old class's pixels went,
flips, per-group logits, offset-calibration curves and sampled stage features for CKA. Then the
stage transplant re-scores the child with one parent stage put back at a time.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ciss.analysis.cka import linear_cka
from ciss.analysis.metrics import confusion_matrix, iou_per_class, restrict_predictions
from ciss.analysis.scoring import batches
from ciss.data.classes import IGNORE_INDEX, ClassList
from ciss.data.dataset import label_lut
from ciss.data.folder import DatasetFolder, open_folder
from ciss.errors import CissError
from ciss.store import Store
from ciss.store.retention import resolve_comparison, retention_sets

# Logit offsets tried when calibrating away a bias (logit units).
OFFSETS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


@dataclass
class EvalSet:
    """Images scored with the partial-label rule: only ``labelled`` child ids are exact."""

    name: str
    folder: DatasetFolder
    stems: list[str]
    lut: np.ndarray
    labelled: list[int]


@dataclass
class Diagnosis:
    """Every number of one diagnosis (``diagnosis.json``); IoU and shares are fractions."""

    step: int
    against: int
    arch: str
    method: str
    data: str
    images: int
    classes: dict
    new_classes: dict
    lost: dict
    cka: dict
    transplant: dict
    transplant_gain: dict
    bias: dict
    old_miou_before: float | None
    old_miou_after: float | None
    frozen: list[str] = field(default_factory=list)
    verdict: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def _eval_sets(store: Store, step: int, data: Path | None, child: ClassList,
               old_ids: list[int], max_images: int) -> list[EvalSet]:
    if data is not None:
        folder = open_folder(data, require_train=False)
        stems = folder.val if folder.has_val_list and folder.val else sorted(folder.images)
        folders = {str(data): (folder, stems)}
    else:
        folders = {f"retention set of step {s}": (f, f.val)
                   for s, f in retention_sets(store, step).items()}
    sets = []
    for name, (folder, stems) in folders.items():
        labelled = [child.index(n) for n in folder.classes.names if n in child]
        sets.append(EvalSet(name, folder, sorted(stems)[:max_images],
                            label_lut(folder.classes, child), labelled))
    if not any(set(s.labelled) & set(old_ids) for s in sets):
        where = data if data is not None else f"the retention sets of step {step}"
        raise CissError(f"{where}: labels no old class (none of "
                        f"{', '.join(child.names[i] for i in old_ids[:5])}...); nothing to "
                        "diagnose")
    return sets


def _forward(model, images: np.ndarray) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and each stage's output (the state entry the stage created)."""
    device = next(model.parameters()).device
    x = torch.from_numpy(images).to(device)
    state = model.begin(x)
    outs = {}
    for name in model.stage_names:
        before = dict(state)
        state = model.run(state, [name])
        outs[name] = next(v for k, v in state.items() if before.get(k) is not v)
    # the statistics below run on the CPU, whatever device ran the models
    return model.finish(state, x.shape[-2:]).cpu(), {k: v.cpu() for k, v in outs.items()}


class _Sampler:
    """Same random pixel positions of a stage's map in parent and child, up to ``max_rows``."""

    def __init__(self, max_rows: int, per_image: int, seed: int) -> None:
        self.max_rows, self.per_image = max_rows, per_image
        self.rng = np.random.default_rng(seed)
        self.rows: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.count: dict[str, int] = {}

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.count.get(name, 0) >= self.max_rows:
            return
        n, _, h, w = a.shape
        idx = self.rng.integers(0, h * w, (n, min(self.per_image, h * w)))
        take = torch.from_numpy(idx)
        pa = torch.stack([a[i].flatten(1)[:, take[i]].T for i in range(n)]).flatten(0, 1)
        pb = torch.stack([b[i].flatten(1)[:, take[i]].T for i in range(n)]).flatten(0, 1)
        self.rows.setdefault(name, []).append((pa.numpy(), pb.numpy()))
        self.count[name] = self.count.get(name, 0) + len(pa)

    def cka(self) -> dict[str, float]:
        out = {}
        for name, parts in self.rows.items():
            a = np.concatenate([p[0] for p in parts])[: self.max_rows]
            b = np.concatenate([p[1] for p in parts])[: self.max_rows]
            v = linear_cka(a, b)
            out[name] = None if np.isnan(v) else v  # a constant map: no similarity to speak of
        return out


@dataclass
class _Tally:
    """Streaming counts of the main pass."""

    k: int
    k_old: int
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    dest: np.ndarray = None  # [k_old, 4]: kept, background, new, other old (child)
    flips: np.ndarray = None  # [k_old, 3]: background, new, other old
    logit_sum: dict = field(default_factory=dict)
    logit_n: dict = field(default_factory=dict)
    offsets: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.dest = np.zeros((self.k_old, 4), np.int64)
        self.flips = np.zeros((self.k_old, 3), np.int64)


def _destinations(t: _Tally, gt: torch.Tensor, pp: torch.Tensor, pc: torch.Tensor,
                  old_ids: list[int]) -> None:
    is_new = pc >= t.k_old
    for c in old_ids:
        m = gt == c
        if not m.any():
            continue
        p = pc[m]
        t.dest[c] += [int((p == c).sum()), int((p == 0).sum()), int((p >= t.k_old).sum()),
                      int(((p != c) & (p != 0) & (p < t.k_old)).sum())]
        lost = m & (pp == c) & (pc != c)
        t.flips[c] += [int((lost & (pc == 0)).sum()), int((lost & is_new).sum()),
                       int((lost & (pc != 0) & ~is_new).sum())]


def _logits(t: _Tally, who: str, logits: torch.Tensor, valid: torch.Tensor, groups) -> None:
    lg = logits.permute(0, 2, 3, 1)[valid]  # [pixels, K]
    for g, ids in groups.items():
        if ids and max(ids) < lg.shape[1]:
            key = f"{who}/{g}"
            t.logit_sum[key] = t.logit_sum.get(key, 0.0) + float(lg[:, ids].mean(1).sum())
            t.logit_n[key] = t.logit_n.get(key, 0) + lg.shape[0]


def _offsets(t: _Tally, name: str, logits: torch.Tensor, gt: torch.Tensor,
             labelled: list[int], groups) -> None:
    for kind, ids in (("new", groups["new"]), ("background", [0])):
        shift = torch.zeros(t.k)
        shift[ids] = 1.0
        for d in OFFSETS:
            pred = restrict_predictions((logits - d * shift.view(1, -1, 1, 1)).argmax(1),
                                        labelled)
            key = (kind, d, name)
            t.offsets[key] = t.offsets.get(key, 0) + confusion_matrix(pred, gt, t.k)


def _main_pass(parent, child, sets: list[EvalSet], k_old: int, batch_size: int,
               sampler: _Sampler) -> _Tally:
    k = child.num_classes
    t = _Tally(k, k_old)
    old_ids = list(range(1, k_old))
    groups = {"background": [0], "old": old_ids, "new": list(range(k_old, k))}
    for s in sets:
        t.before[s.name] = np.zeros((k, k), np.int64)
        t.after[s.name] = np.zeros((k, k), np.int64)
        parent_labelled = [c for c in s.labelled if c < k_old]
        for images, masks in batches(s.folder, s.stems, batch_size):
            gt = torch.from_numpy(s.lut[masks]).long()
            with torch.inference_mode():
                lp, fp = _forward(parent, images)
                lc, fc = _forward(child, images)
            for name in fp:
                sampler.add(name, fp[name], fc[name])
            pp, pc = lp.argmax(1), lc.argmax(1)
            t.before[s.name] += confusion_matrix(restrict_predictions(pp, parent_labelled), gt, k)
            t.after[s.name] += confusion_matrix(restrict_predictions(pc, s.labelled), gt, k)
            _destinations(t, gt, pp, pc, old_ids)
            valid = gt != IGNORE_INDEX
            _logits(t, "child", lc, valid, groups)
            _logits(t, "parent", lp, valid, {g: v for g, v in groups.items() if g != "new"})
            _offsets(t, s.name, lc, gt, s.labelled, groups)
    return t


def _per_class(cms: dict[str, np.ndarray], sets: list[EvalSet]) -> dict[int, float | None]:
    """Each class's IoU from the set that labels it (and has its pixels)."""
    out: dict[int, float | None] = {}
    for s in sets:
        for c, v in enumerate(iou_per_class(cms[s.name])):
            if c in s.labelled and v is not None and out.get(c) is None:
                out[c] = v
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _unchanged(theirs: dict, mine: dict) -> bool:
    for key, value in theirs.items():
        w = mine[key]
        if w.shape != value.shape and w.ndim and w.shape[1:] == value.shape[1:]:
            w = w[: value.shape[0]]
        if w.shape != value.shape or not torch.equal(w, value):
            return False
    return True


def _transplant(parent, child, sets: list[EvalSet], k_old: int, batch_size: int
                ) -> tuple[dict[str, float | None], list[str]]:
    """Old-class mIoU of the child with each stage's parent weights put back."""
    from ciss.analysis.scoring import torch_predictor

    old_ids = list(range(1, k_old))
    old_sets = [s for s in sets if set(s.labelled) & set(old_ids)]
    out, same = {}, []
    for name in child.stage_names:
        theirs = parent.stages[name].state_dict()
        if _unchanged(theirs, child.stages[name].state_dict()):
            same.append(name)  # frozen or untouched: putting it back changes nothing
            out[name] = None
            continue
        model = copy.deepcopy(child).eval()
        sd = model.stages[name].state_dict()
        for key, value in theirs.items():
            if sd[key].shape == value.shape:
                sd[key] = value.clone()
            else:  # the grown classifier: only the rows of the classes the parent knows
                sd[key] = sd[key].clone()
                sd[key][: value.shape[0]] = value
        model.stages[name].load_state_dict(sd)
        predict = torch_predictor(model, next(model.parameters()).device)
        per_class: dict[int, float | None] = {}
        for s in old_sets:
            cm = np.zeros((child.num_classes,) * 2, np.int64)
            for images, masks in batches(s.folder, s.stems, batch_size):
                pred = restrict_predictions(torch.as_tensor(predict(images)).long(), s.labelled)
                cm += confusion_matrix(pred, torch.from_numpy(s.lut[masks]), child.num_classes)
            for c, v in enumerate(iou_per_class(cm)):
                if c in old_ids and c in s.labelled and v is not None:
                    per_class.setdefault(c, v)
        out[name] = _mean(per_class.values())
    return out, same


def _offset_curves(t: _Tally, sets: list[EvalSet], old_ids: list[int], new_ids: list[int]
                   ) -> dict:
    from ciss.analysis.metrics import harmonic_iou

    curves = {}
    for kind in ("new", "background"):
        old, new, both = [], [], []
        for d in OFFSETS:
            per = _per_class({s.name: t.offsets[(kind, d, s.name)] for s in sets}, sets)
            o = _mean(per.get(c) for c in old_ids)
            n = _mean(per.get(c) for c in new_ids)
            old.append(o)
            new.append(n)
            both.append(harmonic_iou(o, n) if n is not None else o)
        best = max(range(len(OFFSETS)), key=lambda i: -1 if both[i] is None else both[i])
        gain = None if old[best] is None or old[0] is None else 100 * (old[best] - old[0])
        cost = None if new[best] is None or new[0] is None else 100 * (new[0] - new[best])
        curves[kind] = {"offsets": list(OFFSETS), "old_miou": old, "new_miou": new,
                        "best_offset": OFFSETS[best], "old_miou_gain": gain,
                        "new_miou_cost": cost}
    return curves


def _weight_norms(model, groups: dict[str, list[int]]) -> dict[str, float | None]:
    rows = torch.cat([c.weight.detach().flatten(1) for c in model.classifier_convs()], dim=1)
    norms = rows.norm(dim=1)
    return {g: float(norms[ids].mean()) if ids and max(ids) < len(norms) else None
            for g, ids in groups.items()}


def diagnose(store: Store, step: int | None = None, against: int | None = None,
             data: Path | None = None, *, max_images: int = 300, batch_size: int = 16,
             cka_rows: int = 4096, seed: int = 0, device: str = "cpu") -> Diagnosis:
    """Diagnose what ``step`` forgot relative to ``against`` (default: its parent).

    Args:
        data: a labelled folder (its classes matched by name); default: the retention sets of
            ``step`` and its ancestors, each scored with the partial-label rule.
        max_images: images used per set (the first ones, sorted by name).
        cka_rows: sampled pixels per stage for CKA.
        device: where the two models run ("auto": CUDA when present).

    Raises:
        CissError: unknown step, ``against`` not an ancestor, data with no old class.
    """
    from ciss.analysis.verdict import write_verdict

    t0 = time.perf_counter()
    step, against, _ = resolve_comparison(store, step, against)
    card = store.card(step)
    if against is None:
        raise CissError(f"step {step} has no parent: nothing can have been forgotten "
                        "(pass --against an earlier step of its line, if any)")
    from ciss.engines.load import torch_device

    dev = str(torch_device(device))
    parent, pcard = store.load_model(against, device=dev)
    child, _ = store.load_model(step, device=dev)
    parent.eval()
    child.eval()
    k_old = len(pcard.classes)
    if list(card.classes[:k_old]) != list(pcard.classes):
        raise CissError(f"step {step}'s classes do not extend step {against}'s")
    names = ClassList(tuple(card.classes))
    old_ids, new_ids = list(range(1, k_old)), list(range(k_old, len(names)))
    sets = _eval_sets(store, step, data, names, old_ids, max_images)
    sampler = _Sampler(cka_rows, per_image=64, seed=seed)
    t = _main_pass(parent, child, sets, k_old, batch_size, sampler)
    before, after = _per_class(t.before, sets), _per_class(t.after, sets)
    classes = {}
    for c in old_ids:
        total = int(t.dest[c].sum())
        shares = (t.dest[c] / total).tolist() if total else [None] * 4
        flips = int(t.flips[c].sum())
        classes[names.names[c]] = {
            "iou_before": before.get(c), "iou_after": after.get(c), "pixels": total,
            "kept": shares[0], "to_background": shares[1], "to_new": shares[2],
            "to_old": shares[3], "flipped": flips}
    lost_total = int(t.flips.sum())
    lost = {"pixels": lost_total, **{k: (float(v) / lost_total if lost_total else None)
                                     for k, v in zip(("to_background", "to_new", "to_old"),
                                                     t.flips.sum(0))}}
    transplant, same = _transplant(parent, child, sets, k_old, batch_size)
    old_after = _mean(after.get(c) for c in old_ids)
    gain = {k: None if v is None or old_after is None else 100 * (v - old_after)
            for k, v in transplant.items()}
    groups = {"background": [0], "old": old_ids, "new": new_ids}
    bias = {"mean_logit": {k: t.logit_sum[k] / t.logit_n[k] for k in t.logit_sum},
            "weight_norm": {"parent": _weight_norms(parent, groups),
                            "child": _weight_norms(child, groups)},
            "offset": _offset_curves(t, sets, old_ids, new_ids)}
    cka = sampler.cka()
    result = Diagnosis(
        step=step, against=against, arch=card.arch, method=card.method,
        data=str(data) if data is not None else "retention sets (partial-label rule)",
        images=sum(len(s.stems) for s in sets), classes=classes,
        new_classes={names.names[c]: {"iou_after": after.get(c)} for c in new_ids},
        lost=lost, cka={n: cka.get(n) for n in child.stage_names}, transplant=transplant,
        transplant_gain=gain, bias=bias,
        old_miou_before=_mean(before.get(c) for c in old_ids), old_miou_after=old_after,
        frozen=same)
    result.verdict = write_verdict(result)
    result.seconds = round(time.perf_counter() - t0, 1)
    return result
