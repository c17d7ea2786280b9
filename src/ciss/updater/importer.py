"""``ciss import``: a model the user already has becomes step 0 of a store, scored and
carded like a trained one.

Weights come from a folder its library wrote with ``save_pretrained`` (SMP or transformers:
the architecture and often the class names are in its config), from a state dict saved from
the plain torchvision model (``.pth``/``.pt``, read with ``weights_only=True``, or
``.safetensors``; needs ``--arch``) or from torchvision's named weights (e.g.
``COCO_WITH_VOC_LABELS_V1``) in the local torch hub cache. Nothing reaches the store unless the
checkpoint matches the architecture and the class names exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ciss.analysis.learning import DEFAULT_FLOOR, learning_warnings, model_pixels
from ciss.analysis.scoring import score_folder, torch_predictor
from ciss.data.classes import BACKGROUND, ClassList
from ciss.data.folder import open_folder
from ciss.errors import CissError
from ciss.models.build import ARCHS, arch_spec
from ciss.models.staged import SegmentationModel
from ciss.store import StepCard, Store
from ciss.store.retention import retention_writer
from ciss.store.store import sha256_file
from ciss.updater.config import ImportConfig, StepConfig
from ciss.updater.job import JobContext, Outcome, StepJob, StepReport, run_job
from ciss.updater.loop import FitResult
from ciss.updater.train import retention_stems

AUX_PREFIX = "aux_classifier."


@dataclass
class Source:
    """Where the weights came from, and the class names they carry (named weights only)."""

    state: dict[str, torch.Tensor]
    description: str
    sha256: str
    names: list[str] | None
    dropped: list[str] = field(default_factory=list)


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


def _key_report(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {what} keys ({', '.join(keys[:3])}"
                         + (", ..." if len(keys) > 3 else "") + ")")
    return "; ".join(parts)


def torchvision_model(arch: str, state: dict[str, torch.Tensor], classes: ClassList,
                      where: str) -> SegmentationModel:
    """The staged model of ``arch`` with ``state`` loaded strictly.

    The classifier is found by asking the model (``classifier_convs``), so a class count
    that does not match is said as such, before any other mismatch.

    Raises:
        CissError: missing or unexpected keys, shapes that do not fit (wrong arch), or a
            classifier with another number of outputs than ``classes`` has names.
    """
    from ciss.models.tv import torchvision_module, wrap_torchvision

    tv = torchvision_module(arch, len(classes))
    model = wrap_torchvision(arch, tv, len(classes))
    own = tv.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CissError(f"the checkpoint does not fit {arch}: "
                        + _key_report(missing, unexpected)
                        + "; is --arch right, and was it saved from the plain torchvision "
                          "model?")
    names = {id(p): n for n, p in tv.named_parameters()}
    key = names[id(model.classifier_convs()[0].weight)]
    if state[key].shape[0] != len(classes):
        raise CissError(f"{where}: {len(classes)} class names but the checkpoint's classifier "
                        f"has {state[key].shape[0]} output channels")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if state[k].shape != v.shape]
    if wrong:
        raise CissError(f"the checkpoint does not fit {arch}: {len(wrong)} tensors have other "
                        f"shapes, e.g. {wrong[0]}; is --arch right?")
    tv.load_state_dict(state)
    return model


def _from_file(arch: str | None, weights: str, classes_file: Path | None, say
               ) -> tuple[SegmentationModel, ClassList, Source]:
    """A torchvision state dict (file or named weight): ``--arch`` says what it is."""
    choices = ", ".join(a for a, s in ARCHS.items() if s.family.name == "torchvision")
    if arch is None:  # a state dict does not say which model it belongs to
        raise CissError(f"--weights {weights}: a state-dict file needs --arch (one of "
                        f"{choices}); SMP and transformers models are imported from their "
                        "save_pretrained folder (--weights DIR), which names its model")
    if arch_spec(arch).family.name != "torchvision":
        raise CissError(f"--arch {arch}: a state-dict file is imported as a torchvision "
                        f"architecture ({choices}); SMP and transformers models are imported "
                        "from their save_pretrained folder (--weights DIR)")
    source = resolve_source(arch, weights)
    aux = sorted(k for k in source.state if k.startswith(AUX_PREFIX))
    state = {k: v for k, v in source.state.items() if not k.startswith(AUX_PREFIX)}
    if aux:
        say(f"dropped {len(aux)} auxiliary-classifier keys (aux_classifier.*): ciss trains and "
            "serves without the auxiliary head")
    source.dropped = aux
    if classes_file is not None:
        classes = ClassList.from_file(classes_file)
    elif source.names is not None:
        classes = ClassList(tuple(source.names))
    else:
        raise CissError("--classes: a weights file does not name its classes; give a "
                        "classes.txt (one name per line, background first)")
    model = torchvision_model(arch, state, classes, str(classes_file or "the named weights"))
    return model, classes, source


def _from_folder(arch: str | None, folder: Path, classes_file: Path | None, say, norm: dict
                 ) -> tuple[SegmentationModel, ClassList, Source]:
    """An SMP or transformers save_pretrained folder: its config names the architecture."""
    from ciss.models.pretrained import load_library_folder

    loaded = load_library_folder(folder, **norm)
    model = loaded.model
    if arch is not None and arch != model.arch:
        raise CissError(f"--arch {arch}: {folder} holds a {model.arch}; leave --arch out for "
                        "a save_pretrained folder")
    for note in loaded.notes:
        say(note)
    where = classes_file or (folder / "config.json")
    if classes_file is not None:
        classes = ClassList.from_file(classes_file)
    elif loaded.names is not None:
        classes = ClassList(tuple(loaded.names))  # refuses a list without background first
    else:
        raise CissError(f"{folder}: the model does not name its classes; give --classes "
                        "classes.txt (one name per line, background first)")
    outputs = model.classifier_convs()[0].out_channels
    if outputs != len(classes):
        raise CissError(f"{where}: {len(classes)} class names but the model's classifier has "
                        f"{outputs} output channels")
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    sha = sha256_file(files[0]) if files else ""
    return model, classes, Source({}, f"{loaded.library} {model.arch} ({Path(folder).resolve()})",
                                  sha, loaded.names)


def import_model(store: Store, data_dir: Path, *, weights: str = "", arch: str | None = None,
                 classes_file: Path | None = None, floor: float = DEFAULT_FLOOR,
                 say=lambda _m: None, exif: str | None = None,
                 device: str = "auto", mean=None, std=None,
                 config: StepConfig | None = None) -> StepReport:
    """Write an existing model as step 0 of ``store``.

    ``config`` (``config.resolve_step("import", ...)``) says everything; without it, the
    keyword arguments do.

    Args:
        data_dir: a labelled folder; its val split becomes the step's retention set and the
            step is scored on it (classes matched by name).
        weights: an SMP or transformers ``save_pretrained`` folder (``arch`` not needed), a
            ``.pth``/``.pt``/``.safetensors`` torchvision state dict, or a named torchvision
            weight.
        arch: the torchvision architecture of a state-dict file.
        classes_file: the model's class names, one per line, background first (named weights
            and folders whose config names its classes bring their own).
        say: receives one-line notes (dropped auxiliary keys, preprocessing used).
        device: where the model is scored ("auto": CUDA when present).
        mean, std: the normalisation of x/255 to use instead of the one the model implies
            (a folder's encoder or preprocessor config; ImageNet's for torchvision files).

    Raises:
        CissError: the store has steps, an unknown or unsupported model, a checkpoint that
            does not fit, class names that do not match its outputs (nothing is written).
    """
    if config is None:
        config = StepConfig(command="import", floor=floor,
                            source=ImportConfig(weights=str(weights), arch=arch,
                                                classes_file=classes_file, device=device,
                                                exif=exif, mean=mean, std=std))
    return run_job(store, ImportJob(data_dir, config, say))


class ImportJob(StepJob):
    """``ciss import``: a model trained elsewhere becomes step 0, scored and carded."""

    prefix = "import"
    trains = False

    def __init__(self, data_dir: Path, config: StepConfig, say=lambda _m: None) -> None:
        self.config, self.data_dir, self.say = config, Path(data_dir), say
        self.folder = None

    def fingerprint(self) -> str:
        # the weights are named in the configuration; what they are scored on is the folder
        self.folder = open_folder(self.data_dir, require_train=False,
                                  exif=self.config.source.exif)
        return self.folder.fingerprint()

    def check(self, store: Store) -> None:
        if store.steps():
            raise CissError(f"{store.root}: already has steps; import into a new --store")

    def outcome(self, ctx: JobContext, fit: FitResult) -> Outcome:
        from ciss.models.pretrained import is_library_folder

        src, say = self.config.source, self.say
        if is_library_folder(Path(src.weights)):
            model, classes, source = _from_folder(src.arch, Path(src.weights),
                                                  src.classes_file, say,
                                                  {"mean": src.mean, "std": src.std})
        else:
            model, classes, source = _from_file(src.arch, src.weights, src.classes_file, say)
            if src.mean is not None or src.std is not None:
                p = model.preprocessing
                try:
                    model.set_preprocessing(p["mean"] if src.mean is None else src.mean,
                                            p["std"] if src.std is None else src.std)
                except ValueError as exc:
                    raise CissError(f"--mean/--std: {exc}") from None
        model = model.eval()
        folder, data_dir = self.folder, self.data_dir
        known = [classes.index(n) for n in folder.classes.objects if n in classes]
        if not known:
            raise CissError(f"{data_dir}: labels none of the model's classes "
                            f"({', '.join(classes.objects[:5])}...); classes are matched by "
                            "name")
        folder_ids = [folder.classes.index(n) for n in folder.classes.objects if n in classes]
        keep = retention_stems(folder, folder_ids)
        if not keep:
            raise CissError(f"{data_dir}: no val image shows a class of the model; the step "
                            "needs a retention set (add val images or a val.txt)")
        t0 = time.perf_counter()
        dev = ctx.device
        scores = score_folder(torch_predictor(model.to(dev), dev), folder, keep, classes)
        model = model.cpu()
        floor = self.config.floor
        warnings = learning_warnings(list(classes.names), known, scores.iou, scores.cm,
                                     model_pixels(folder, folder.train + folder.val, classes),
                                     floor=floor, command="import")
        card = StepCard(
            step=0, parent=None, classes=list(classes.names),
            new_classes=list(classes.objects), arch=model.arch, frozen=[], method="imported",
            data={"folder": str(data_dir.resolve()), "fingerprint": folder.fingerprint(),
                  "val_images": len(folder.val), "retention_images": len(keep),
                  "retention_max_side": max(max(folder.shapes[k]) for k in keep),
                  "layout": folder.layout},
            retention={"0": {"torch": scores.per_class()}},
            timings={"eval_s": round(time.perf_counter() - t0, 2)},
            extra={"origin": "imported", "source": source.description,
                   "source_sha256": source.sha256, "dropped_keys": source.dropped,
                   "preprocessing": model.preprocessing,
                   "learning": {"floor": floor, "warnings": [w.to_json() for w in warnings]},
                   "torch": torch.__version__, "device": str(dev)},
            model_config=model.config)
        return Outcome(card, model, {"retention": retention_writer(folder, keep)}, scores,
                       warnings)
