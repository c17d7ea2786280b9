"""The parity gate: an engine must reproduce PyTorch on the step's retention images."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ciss.analysis.metrics import confusion_matrix, iou_per_class, mean_iou, restrict_predictions
from ciss.analysis.scoring import at_most, batches
from ciss.data.classes import ClassList
from ciss.data.dataset import label_lut
from ciss.data.folder import DatasetFolder
from ciss.data.transforms import SERVE_MAX_SIDE


@dataclass(frozen=True)
class ParityTolerance:
    """Pass criteria (DESIGN §7): label agreement, mIoU change, and a logit bound scaled by
    the logits' magnitude (exact equality is meaningless across kernels)."""

    min_agreement: float = 0.999
    max_miou_delta: float = 0.005
    max_rel_logit_diff: float = 1e-3


@dataclass
class ParityReport:
    """What the gate measured, and its verdict."""

    engine: str
    images: int
    max_abs_logit_diff: float | None
    logit_scale: float
    label_agreement: float
    miou_torch: float | None
    miou_engine: float | None
    per_set: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    shapes_checked: list[list[int]] = field(default_factory=list)
    device: str = "cpu"  # where both sides ran (TF32 off on a GPU: see exact_fp32)
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def exact_fp32():
    """torch's fp32 without TF32 while inside (cuDNN convolutions and matmuls): on Ampere and
    later GPUs TF32 rounds inputs to 10 mantissa bits, which alone can exceed the parity
    gate's 1e-3 logit tolerance. Nothing changes on a CPU."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def check_parity(model: torch.nn.Module, run_engine, engine_name: str,
                 sets: dict[str, DatasetFolder], classes: ClassList,
                 tol: ParityTolerance = ParityTolerance(), compare_logits: bool = True,
                 extra_shapes: tuple[tuple[int, int, int], ...] = ((2, 37, 53),),
                 max_side: int = SERVE_MAX_SIDE) -> ParityReport:
    """Compare ``run_engine`` (uint8 NCHW -> {"logits"?, "labels"}) with ``model``.

    Args:
        sets: retention folders by step; all of each folder's val split is used.
        compare_logits: False for quantised engines, whose logits differ by design.
        extra_shapes: (N, H, W) random inputs that exercise the dynamic axes.
        max_side: retention images are compared at most this large (the serving resize).
    """
    model = model.eval()
    dev = next(model.parameters()).device
    k = len(classes)
    agree = total = n_images = 0
    max_diff, scale = 0.0, 0.0
    cm_t_all = np.zeros((k, k), np.int64)
    cm_e_all = np.zeros((k, k), np.int64)
    per_set = {}
    for name, folder in sets.items():
        lut = label_lut(folder.classes, classes)
        labelled = [classes.index(c) for c in folder.classes.names if c in classes]
        cm_t = np.zeros((k, k), np.int64)
        cm_e = np.zeros((k, k), np.int64)
        for images, masks in batches(folder, folder.val, 8):
            # at the serving size: what will be served, and a 12 Mpx photo's activations in
            # torch and ONNX Runtime at once would need ~10 GiB
            images, masks = at_most(images, masks, max_side)
            with torch.inference_mode():
                logits_t = model(torch.from_numpy(images).to(dev)).float().cpu()
            out = run_engine(images)
            labels_t = logits_t.argmax(1)
            labels_e = torch.from_numpy(out["labels"].astype(np.int64))
            if compare_logits and "logits" in out:
                max_diff = max(max_diff, float((logits_t - torch.from_numpy(
                    out["logits"])).abs().max()))
            scale = max(scale, float(logits_t.abs().max()))
            agree += int((labels_t == labels_e).sum())
            total += labels_t.numel()
            n_images += len(images)
            target = torch.from_numpy(lut[masks])
            cm_t += confusion_matrix(restrict_predictions(labels_t, labelled), target, k)
            cm_e += confusion_matrix(restrict_predictions(labels_e, labelled), target, k)
        iou_t, iou_e = iou_per_class(cm_t), iou_per_class(cm_e)
        per_set[name] = {"torch": {classes.names[i]: iou_t[i] for i in labelled},
                         engine_name: {classes.names[i]: iou_e[i] for i in labelled}}
        cm_t_all += cm_t
        cm_e_all += cm_e
    shapes = []
    gen = torch.Generator().manual_seed(0)
    for n, h, w in extra_shapes:
        x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=gen)
        with torch.inference_mode():
            lt = model(x.to(dev)).float().cpu()
        out = run_engine(x.numpy())
        if out["labels"].shape != (n, h, w):
            raise AssertionError(f"engine returned labels {out['labels'].shape} for "
                                 f"input {(n, 3, h, w)}")
        agree += int((lt.argmax(1) == torch.from_numpy(out["labels"].astype(np.int64))).sum())
        total += n * h * w
        if compare_logits and "logits" in out:
            max_diff = max(max_diff, float((lt - torch.from_numpy(out["logits"])).abs().max()))
        shapes.append([n, 3, h, w])
    m_t, m_e = mean_iou(iou_per_class(cm_t_all)), mean_iou(iou_per_class(cm_e_all))
    report = ParityReport(engine=engine_name, images=n_images,
                          max_abs_logit_diff=max_diff if compare_logits else None,
                          logit_scale=scale, label_agreement=agree / max(1, total),
                          miou_torch=m_t, miou_engine=m_e, per_set=per_set,
                          shapes_checked=shapes, device=str(dev))
    if report.label_agreement < tol.min_agreement:
        report.reasons.append(f"label agreement {100 * report.label_agreement:.3f}% < "
                              f"{100 * tol.min_agreement:.1f}%")
    if m_t is not None and m_e is not None and abs(m_t - m_e) > tol.max_miou_delta:
        report.reasons.append(f"mIoU {100 * m_e:.2f} vs torch {100 * m_t:.2f}: differs by more "
                              f"than {100 * tol.max_miou_delta:.1f} points")
    if compare_logits and max_diff > tol.max_rel_logit_diff * max(1.0, scale):
        report.reasons.append(f"max logit difference {max_diff:.2e} exceeds "
                              f"{tol.max_rel_logit_diff:.0e} x logit scale {scale:.1f}")
    report.passed = not report.reasons
    return report
