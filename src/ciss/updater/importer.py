"""``ciss import``: a model the user already has (a torchvision segmentation model) becomes
step 0 of a store, scored and carded like a trained one.

Weights come from a state dict saved from the plain torchvision model (``.pth``/``.pt``, read
with ``weights_only=True``, or ``.safetensors``) or from torchvision's named weights (e.g.
``COCO_WITH_VOC_LABELS_V1``) in the local torch hub cache. Nothing reaches the store unless the
checkpoint matches the architecture and the class names exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ciss.analysis.learning import DEFAULT_FLOOR, learning_warnings, model_pixels
from ciss.analysis.scoring import score_folder, torch_predictor
from ciss.data.classes import BACKGROUND, ClassList
from ciss.data.folder import open_folder
from ciss.errors import CissError
from ciss.models.build import ARCHS
from ciss.store import StepCard, Store
from ciss.store.retention import retention_writer
from ciss.store.store import sha256_file
from ciss.updater.loop import FitResult
from ciss.updater.train import StepReport, retention_stems

AUX_PREFIX = "aux_classifier."
# the classifier's last convolution, whose output channels are the classes
CLASSIFIER_KEY = {"lraspp": "classifier.low_classifier.weight", "deeplabv3": "classifier.4.weight"}


@dataclass
class Source:
    """Where the weights came from, and the class names they carry (named weights only)."""

    state: dict[str, torch.Tensor]
    description: str
    sha256: str
    names: list[str] | None


def _named_weights(arch: str, name: str) -> Source:
    """torchvision's named weights for ``arch`` from the local torch hub cache."""
    from torchvision.models import get_model_weights

    from ciss.models.tv import hub_cache_path

    enum = get_model_weights(arch)
    try:
        weights = enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError:
        known = ", ".join(w.name for w in enum)
        raise CissError(f"--weights {name}: neither a file nor a named weight of {arch} "
                        f"({known})") from None
    path = hub_cache_path(weights.url)
    if not path.is_file():
        raise CissError(f"--weights {name}: not in the local torch hub cache; put "
                        f"{weights.url} at {path}")
    source = _file(path)
    names = [BACKGROUND if n == "__background__" else n for n in weights.meta["categories"]]
    return Source(source.state, f"{arch} {weights.name} ({path})", source.sha256, names)


def _file(path: Path) -> Source:
    from ciss.models.weights import read_state_dict

    return Source(read_state_dict(path), str(path.resolve()), sha256_file(path), None)


def resolve_source(arch: str, weights: str) -> Source:
    """A weights file, or a named torchvision weight of ``arch``."""
    path = Path(weights)
    return _file(path) if path.is_file() else _named_weights(arch, weights)


def torchvision_module(arch: str, state: dict[str, torch.Tensor], n_classes: int):
    """The plain torchvision model of ``arch`` with ``state`` loaded strictly.

    Raises:
        CissError: missing or unexpected keys, or shapes that do not fit (wrong arch).
    """
    from torchvision.models import segmentation as seg

    kwargs = {"aux_loss": False} if arch.startswith("deeplabv3") else {}
    tv = getattr(seg, arch)(weights=None, weights_backbone=None, num_classes=n_classes, **kwargs)
    own = tv.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:3])}"
                         + (", ..." if len(missing) > 3 else "") + ")")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:3])}"
                         + (", ..." if len(unexpected) > 3 else "") + ")")
        raise CissError(f"the checkpoint does not fit {arch}: " + "; ".join(parts)
                        + "; is --arch right, and was it saved from the plain torchvision "
                          "model?")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if state[k].shape != v.shape]
    if wrong:
        raise CissError(f"the checkpoint does not fit {arch}: {len(wrong)} tensors have other "
                        f"shapes, e.g. {wrong[0]}; is --arch right?")
    tv.load_state_dict(state)
    return tv


def import_model(store: Store, data_dir: Path, *, arch: str, weights: str,
                 classes_file: Path | None = None, floor: float = DEFAULT_FLOOR,
                 say=lambda _m: None, exif: str | None = None) -> StepReport:
    """Write an existing torchvision model as step 0 of ``store``.

    Args:
        data_dir: a labelled folder; its val split becomes the step's retention set and the
            step is scored on it (classes matched by name).
        weights: a ``.pth``/``.pt``/``.safetensors`` file, or a named torchvision weight.
        classes_file: the model's class names, one per line, background first (named weights
            bring their own).
        say: receives one-line notes (dropped auxiliary keys).

    Raises:
        CissError: the store has steps, an unknown or non-torchvision arch, a checkpoint that
            does not fit, class names that do not match its outputs (nothing is written).
    """
    if arch not in ARCHS or arch == "tiny":
        choices = ", ".join(a for a in ARCHS if a != "tiny")
        raise CissError(f"--arch {arch}: import takes a torchvision architecture ({choices})")
    if store.steps():
        raise CissError(f"{store.root}: already has steps; import into a new --store")
    source = resolve_source(arch, weights)
    aux = sorted(k for k in source.state if k.startswith(AUX_PREFIX))
    state = {k: v for k, v in source.state.items() if not k.startswith(AUX_PREFIX)}
    if aux:
        say(f"dropped {len(aux)} auxiliary-classifier keys (aux_classifier.*): ciss trains and "
            "serves without the auxiliary head")
    if classes_file is not None:
        classes = ClassList.from_file(classes_file)
    elif source.names is not None:
        classes = ClassList(tuple(source.names))
    else:
        raise CissError("--classes: a weights file does not name its classes; give a "
                        "classes.txt (one name per line, background first)")
    key = CLASSIFIER_KEY["lraspp" if arch.startswith("lraspp") else "deeplabv3"]
    if key not in state:
        raise CissError(f"{source.description}: no {key}: the checkpoint does not fit {arch}; "
                        "is --arch right?")
    outputs = state[key].shape[0]
    if outputs != len(classes):
        where = classes_file or "the named weights"
        raise CissError(f"{where}: {len(classes)} class names but the checkpoint's classifier "
                        f"has {outputs} output channels")
    folder = open_folder(data_dir, require_train=False, exif=exif)
    known = [classes.index(n) for n in folder.classes.objects if n in classes]
    if not known:
        raise CissError(f"{data_dir}: labels none of the model's classes "
                        f"({', '.join(classes.objects[:5])}...); classes are matched by name")
    from ciss.models.tv import LRASPP, DeepLabV3

    tv = torchvision_module(arch, state, len(classes))
    wrap = LRASPP if arch.startswith("lraspp") else DeepLabV3
    model = wrap(arch, len(classes), tv=tv).eval()
    folder_ids = [folder.classes.index(n) for n in folder.classes.objects if n in classes]
    keep = retention_stems(folder, folder_ids)
    if not keep:
        raise CissError(f"{data_dir}: no val image shows a class of the model; the step needs "
                        "a retention set (add val images or a val.txt)")
    t0 = time.perf_counter()
    scores = score_folder(torch_predictor(model), folder, keep, classes)
    warnings = learning_warnings(list(classes.names), known, scores.iou, scores.cm,
                                 model_pixels(folder, folder.train + folder.val, classes),
                                 floor=floor)
    card = StepCard(
        step=0, parent=None, classes=list(classes.names), new_classes=list(classes.objects),
        arch=arch, frozen=[], method="imported",
        hparams={"weights": weights},
        data={"folder": str(Path(data_dir).resolve()), "fingerprint": folder.fingerprint(),
              "val_images": len(folder.val), "retention_images": len(keep),
              "retention_max_side": max(max(folder.shapes[k]) for k in keep),
              "layout": folder.layout},
        retention={"0": {"torch": scores.per_class()}},
        timings={"eval_s": round(time.perf_counter() - t0, 2)},
        extra={"origin": "imported", "source": source.description,
               "source_sha256": source.sha256, "dropped_keys": aux,
               "learning": {"floor": floor, "warnings": [w.to_json() for w in warnings]},
               "torch": torch.__version__})
    step = store.write_step(card, model, {"retention": retention_writer(folder, keep)})
    return StepReport(step=step, card=store.card(step), scores=scores, fit=FitResult(),
                      warnings=warnings)

