"""One resolved step configuration: the user's options and the family recipe merged once.

``ciss train``, ``ciss add-classes``, ``ciss import``, the demo, the benchmark and the
benchmark scripts all call :func:`resolve_step`; what it returns (:class:`StepConfig`) is what
the job runner (``updater.job``) trains with and what the step's card stores, once, under
``config`` (cards written before kept a flat copy in ``hparams``; :func:`step_settings` reads
either).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ciss.analysis.learning import DEFAULT_FLOOR
from ciss.errors import CissError
from ciss.models.build import arch_spec
from ciss.updater.defaults import base_defaults, recipe_of, step_defaults
from ciss.updater.loop import LoopConfig
from ciss.updater.memory import memory_budget
from ciss.updater.method_table import method_row
from ciss.updater.methods import MethodConfig

COMMANDS = ("train", "add-classes", "import")
BN_STATS = ("update", "frozen")


@dataclass(frozen=True)
class DataConfig:
    """How training crops are made.

    Attributes:
        crop_size: square crop side; None picks the median shorter side (at most 512).
        scale: random rescale range before cropping (photos: (0.5, 2.0) as in the
            literature; the synthetic default learns faster without it, see BENCHMARKS.md).
        workers: DataLoader worker processes; None picks by folder (0 when the decoded
            folder is held in memory, else up to 4).
        exif: "apply"/"ignore" the images' EXIF orientation (None: the folder's ciss.json).
    """

    crop_size: int | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    workers: int | None = None
    exif: str | None = None


@dataclass(frozen=True)
class UpdateConfig:
    """What add-classes does beyond the optimiser settings.

    Attributes:
        parent: step to start from (None: the latest).
        freeze: last frozen stage, "none", or None for the architecture's default.
        init: classifier init for new classes: mib, background or random (None: the
            method's row, ``method_table``).
        cache_trunk_mb: memory for caching, per exact training input, the frozen trunk's
            outputs and the parent's logits across epochs (used only when augmentation is
            flip-only); 0 disables it.
        bn_stats: "frozen" (every BatchNorm keeps the parent's running statistics: the
            measured default, BENCHMARKS.md §2) or "update" (those of the trainable stages
            follow the new-class data).
        memory: replay memory budget in images (``updater.memory``): None continues the
            parent's, 0 keeps none.
        fuse: after training, EWF's endpoint fusion of the weights with the parent's
            (``models.surgery.fuse_endpoints``).
        pretune: share of the step's budget spent first on NeST's classifier pre-tuning
            (``updater.pretune``); None: the family recipe's share for methods whose row
            asks for it, else none; 0: none.
        new_class_ok: folder class names to take as new even though they are a near miss of
            a known class's name (``data.classes.match_names``).
    """

    parent: int | None = None
    freeze: str | None = None
    init: str | None = None
    cache_trunk_mb: int = 1024
    bn_stats: str = "frozen"
    memory: int | None = None
    fuse: bool = False
    pretune: float | None = None
    new_class_ok: tuple[str, ...] = ()


@dataclass(frozen=True)
class BaseConfig:
    """What ``ciss train`` does beyond the optimiser settings.

    Attributes:
        arch: an ARCHS name (``ciss recipes``).
        weights: "imagenet", a backbone state-dict file, or None (random init).
        loss: one of ``losses.BASE_LOSSES``.
        memory: replay memory budget in images kept beside step 0 (0: none).
        mean, std: the normalisation of x/255 instead of the encoder's own (None: its own).
    """

    arch: str = "tiny"
    weights: str | None = None
    loss: str = "ce+dice"
    memory: int = 0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class ImportConfig:
    """What ``ciss import`` reads (``updater.importer``).

    Attributes:
        weights: a save_pretrained folder, a state-dict file or a named torchvision weight.
        arch: the torchvision architecture of a state-dict file (None for a folder).
        classes_file: classes.txt of the model's names, background first (or None).
        device: where the model is scored.
        exif: "apply"/"ignore" the scoring images' EXIF orientation (None: the folder's).
        mean, std: the normalisation of x/255 instead of the one the model implies.
    """

    weights: str = ""
    arch: str | None = None
    classes_file: Path | None = None
    device: str = "auto"
    exif: str | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class StepOptions:
    """What the user asked for, as the command line gives it: None keeps the recipe's value.

    One object for every step-writing command; each reads the fields that concern it
    (``resolve_step``). The names are the command-line parameters' own.
    """

    # the optimiser loop (train, add-classes)
    iterations: int | None = None
    epochs: int | None = None
    batch_size: int = 16
    lr: float | None = None
    optimizer: str | None = None
    encoder_lr: float | None = None
    seed: int = 0
    device: str = "auto"
    sync_bn: bool = False
    checkpoint_every: float | None = None
    # the training crops
    crop_size: int | None = None
    scale: tuple[float, float] | None = None
    workers: int | None = None
    exif: str | None = None
    floor: float = DEFAULT_FLOOR
    memory: int | None = None  # train: None = 0; add-classes: None = the parent's budget
    # train and import
    arch: str | None = None
    weights: str | None = None
    loss: str | None = None
    classes_file: Path | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    # add-classes
    parent: int | None = None
    method: str = "mib"
    kd_weight: float | None = None
    alpha: float = 1.0
    pseudo: bool = False
    new_dice: bool = False
    freeze: str | None = None
    init: str | None = None
    bn_stats: str | None = None
    cache_trunk_mb: int = 1024
    fuse: bool = False
    pretune: float | None = None
    new_class_ok: tuple[str, ...] = ()
    val_dir: Path | None = None

    @classmethod
    def of(cls, options: dict[str, Any]) -> StepOptions:
        """The options among ``options`` (a command's keyword arguments) that this class
        names; others (the store, the data folder, --quiet) are the command's own."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names})


@dataclass(frozen=True)
class StepConfig:
    """Everything a step is written with, resolved: the family recipe under the user's options.

    Attributes:
        command: train, add-classes or import.
        loop: the optimiser loop (None for import).
        data: the training crops (None for import).
        recipe: the family recipe it started from (``defaults.recipe_of``).
        floor: IoU (points) below which a trained class is named in a warning.
        base: train's model, weights, loss and memory.
        method: add-classes' losses.
        update: add-classes' parent, freezing, init, memory, fusion and pre-tuning, resolved
            (the method row's init, the family's stage, the parent's memory budget...).
        source: import's weights and class names.
        val_dir: add-classes: a fully labelled folder scored as well.
    """

    command: str
    loop: LoopConfig | None = None
    data: DataConfig | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    floor: float = DEFAULT_FLOOR
    base: BaseConfig | None = None
    method: MethodConfig | None = None
    update: UpdateConfig | None = None
    source: ImportConfig | None = None
    val_dir: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The card's ``config``: one object per part that applies, plus the recipe."""
        doc: dict[str, Any] = {"command": self.command}
        for name in ("loop", "data", "base", "method", "update", "source"):
            part = getattr(self, name)
            if part is not None:
                doc[name] = _plain(asdict(part))
        if self.recipe:
            doc["recipe"] = dict(self.recipe)
        doc["floor"] = self.floor
        if self.val_dir is not None:
            doc["val_dir"] = str(self.val_dir)
        return doc


def _plain(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in d.items()}


def pretune_share(update: UpdateConfig, method: str, arch: str) -> float:
    """The pre-tuning share a step runs: the user's, else the family's for the methods whose
    row asks for it.

    Raises:
        CissError: a share outside [0, 1], or one asked of a sigmoid-form method (the
            pre-tuning fits MiB's softmax form).
    """
    row = method_row(method)
    if update.pretune is None:
        return arch_spec(arch).family.step.pretune if row.pretune else 0.0
    if not 0.0 <= update.pretune <= 1.0:
        raise CissError(f"--pretune {update.pretune}: a share of the step's budget, from 0 "
                        "(none) to 1")
    if update.pretune and row.sigmoid_form:
        raise CissError(f"--pretune with --method {method}: {method} scores classes with "
                        "sigmoids against a constant background; the pre-tuning fits the "
                        "softmax form (mib, lwf, ilt, plop, ft)")
    return float(update.pretune)


def _loop_overrides(o: StepOptions) -> dict[str, Any]:
    return {"iterations": o.iterations, "epochs": o.epochs, "batch_size": o.batch_size,
            "lr": o.lr, "optimizer": o.optimizer, "encoder_lr": o.encoder_lr, "seed": o.seed,
            "device": o.device, "sync_bn": o.sync_bn, "checkpoint_every_s": o.checkpoint_every}


def resolve_step(command: str, options: StepOptions = StepOptions(), store=None) -> StepConfig:
    """The one merge of the family recipe (``models.recipes``) and the user's options.

    Args:
        command: train, add-classes or import.
        options: what the user asked (None fields keep the recipe's value).
        store: the store the step goes to (add-classes reads its parent's card: the family,
            the memory budget to continue).

    Raises:
        CissError: unknown method, a bad pre-tuning share, a missing parent step.
    """
    o = options
    if command == "train":
        arch = o.arch or "tiny"
        d = base_defaults(arch)
        return StepConfig(
            command=command, loop=d.loop(**_loop_overrides(o)),
            data=DataConfig(crop_size=o.crop_size, scale=o.scale or d.scale,
                            workers=o.workers, exif=o.exif),
            recipe=recipe_of(arch, "base"), floor=o.floor,
            base=BaseConfig(arch=arch, weights=o.weights, loss=o.loss or d.loss,
                            memory=0 if o.memory is None else o.memory,
                            mean=o.mean, std=o.std))
    if command == "import":
        return StepConfig(command=command, floor=o.floor,
                          data=None, source=ImportConfig(weights=str(o.weights or ""),
                                                         arch=o.arch,
                                                         classes_file=o.classes_file,
                                                         device=o.device, exif=o.exif,
                                                         mean=o.mean, std=o.std))
    if command != "add-classes":
        raise CissError(f"{command}: not a step-writing command ({', '.join(COMMANDS)})")
    row = method_row(o.method)  # an unknown name is refused before anything is read
    if store is None:
        raise CissError("add-classes needs the store its parent step is in")
    parent = store.card(store.resolve(o.parent))
    d = step_defaults(o.method, parent.arch)
    update = UpdateConfig(parent=o.parent, freeze=o.freeze or arch_spec(parent.arch).default_freeze,
                          init=o.init or row.init,
                          cache_trunk_mb=o.cache_trunk_mb, bn_stats=o.bn_stats or d.bn_stats,
                          memory=memory_budget(o.memory, parent), fuse=o.fuse,
                          pretune=o.pretune, new_class_ok=tuple(o.new_class_ok))
    if update.bn_stats not in BN_STATS:
        raise CissError(f"--bn-stats {update.bn_stats}: choose from {', '.join(BN_STATS)}")
    update = replace(update, pretune=pretune_share(update, o.method, parent.arch))
    return StepConfig(
        command=command, loop=d.loop(**_loop_overrides(o)),
        data=DataConfig(crop_size=o.crop_size, scale=o.scale or d.scale, workers=o.workers,
                        exif=o.exif),
        recipe=recipe_of(parent.arch, "step"), floor=o.floor,
        method=MethodConfig(method=o.method, kd_weight=d.kd_weight if o.kd_weight is None
                            else o.kd_weight, alpha=o.alpha, pseudo=o.pseudo,
                            new_dice=o.new_dice),
        update=update, val_dir=o.val_dir)


def step_settings(card) -> dict[str, Any]:
    """A step's settings as one flat mapping (``lr``, ``bn_stats``, ``world_size``...): from
    the card's ``config`` and ``extra``, or from ``hparams`` on cards written before the
    configuration was stored once."""
    legacy = getattr(card, "hparams", None) or {}
    if legacy:
        return dict(legacy)
    flat: dict[str, Any] = {}
    for name, part in (card.config or {}).items():
        if isinstance(part, dict) and name != "recipe":
            flat.update(part)
    run = (card.extra or {}).get("run", {})
    flat.update(run)
    return flat
