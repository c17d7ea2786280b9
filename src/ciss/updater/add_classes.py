"""``ciss add-classes``: learn a folder's new classes on top of a stored step, keep the old."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ciss import hints
from ciss.analysis.learning import (
    DEFAULT_FLOOR,
    ClassWarning,
    learning_warnings,
    model_pixels,
)
from ciss.analysis.scoring import FolderScores, score_folder, score_retention, torch_predictor
from ciss.data.classes import ClassList, match_names
from ciss.data.dataset import JoinedDataset, SegmentationDataset, label_lut
from ciss.data.folder import DatasetFolder, open_folder
from ciss.data.transforms import TrainTransform, auto_crop_size
from ciss.errors import CissError
from ciss.models import (
    freeze,
    freeze_bn_stats,
    frozen_stages,
    fuse_endpoints,
    grow_classifier,
    sigmoid_form,
)
from ciss.models.build import arch_spec
from ciss.store import StepCard, Store
from ciss.store.retention import retention_sets, retention_writer
from ciss.updater.config import (
    BN_STATS,
    DataConfig,
    StepConfig,
    UpdateConfig,
    pretune_share,
)
from ciss.updater.defaults import recipe_of
from ciss.updater.distributed import agree, env_shard, sync_batchnorm
from ciss.updater.job import JobContext, Outcome, StepJob, StepReport, run_job
from ciss.updater.loop import FitResult, LoopConfig, fit
from ciss.updater.memory import (
    MEMORY,
    choose_memory,
    memory_budget,
    memory_writer,
    open_memory,
)
from ciss.updater.method_table import method_row
from ciss.updater.methods import IncrementalStep, MethodConfig, TrunkCache
from ciss.updater.pretune import PretuneResult, pretune
from ciss.updater.train import loader_workers, retention_stems, validation_stems

__all__ = ["AddJob", "UpdateConfig", "add_classes", "pretune_share"]  # UpdateConfig,
# pretune_share: their home is updater.config; imported from here by older callers

def _new_classes(folder: DatasetFolder, parent: StepCard, data_dir: Path) -> list[str]:
    new = [n for n in folder.classes.objects if n not in parent.classes]
    if not new:
        raise CissError(f"{data_dir / 'classes.txt'}: no new class; every class is already "
                        f"known to step {parent.step} ({', '.join(parent.classes[1:])})")
    seen = set().union(*(folder.presence[s] for s in folder.train))
    missing = [n for n in new if folder.classes.index(n) not in seen]
    if missing:
        raise CissError(f"{data_dir}: new classes with no pixel in the training split: "
                        f"{', '.join(missing)}")
    return new


def add_classes(store: Store, data_dir: Path, *, method: MethodConfig = MethodConfig(),
                update: UpdateConfig = UpdateConfig(), loop: LoopConfig = LoopConfig(),
                data: DataConfig = DataConfig(scale=(1.0, 1.0)), val_dir: Path | None = None,
                floor: float = DEFAULT_FLOOR, progress: bool = True,
                after_epoch=None, config: StepConfig | None = None,
                warn=None) -> StepReport:
    """Train a new step that adds ``data_dir``'s unknown classes to the parent step.

    ``config`` (``config.resolve_step("add-classes", ...)``) says everything; without it, the
    keyword arguments do. Names already known keep their ids and supervise normally; unknown
    names become new classes appended in the folder's order. Every other pixel is background,
    which may hide old classes: that is what the mib losses are for. A repeat of a request
    whose step was written writes nothing (``StepReport.written_before``). ``warn`` receives
    a line before training when the parent has classes it never learned.

    Raises:
        CissError: bad data, unknown method or stage, missing or corrupt parent (nothing written).
        CheckFailed: the loss became NaN.
    """
    if config is None:
        method_row(method.method)  # an unknown name is refused before anything is read
        arch = store.card(store.resolve(update.parent)).arch
        config = StepConfig(command="add-classes", loop=loop, data=data,
                            recipe=recipe_of(arch, "step"), floor=floor, method=method,
                            update=update, val_dir=val_dir)
    return run_job(store, AddJob(store, data_dir, config, warn), progress=progress,
                   after_epoch=after_epoch)


@dataclass
class _Trained:
    """What training produced, for rank 0 to score and write."""

    parent: StepCard
    student: torch.nn.Module
    teacher: torch.nn.Module
    classes: ClassList
    new: list[str]
    crop: int
    cache: TrunkCache | None
    warnings: list[ClassWarning] = field(default_factory=list)


class AddJob(StepJob):
    """``ciss add-classes``: a folder's new classes on top of a stored step."""

    prefix = "add"

    def __init__(self, store: Store, data_dir: Path, config: StepConfig, warn=None) -> None:
        self.warn = warn
        update, name = config.update, config.method.method
        row = method_row(name)  # an unknown name is refused before anything is read
        self.parent_step = store.resolve(update.parent)
        parent = store.card(self.parent_step)
        self.pretune = pretune_share(update, name, parent.arch)
        self.folder = open_folder(data_dir, exif=config.data.exif, shard=env_shard())
        self.data_dir = Path(data_dir)
        # the step's retention set is the val images showing its classes: without one the
        # step could not be written, so say it now rather than after the training
        if not retention_stems(self.folder, [self.folder.classes.index(n)
                                             for n in self.folder.classes.objects]):
            how = (" or list them in a val.txt" if self.folder.layout in ("ciss", "voc")
                   else "" if self.folder.has_val_list else hints.NO_VAL_SPLIT(data=data_dir))
            raise CissError(hints.NO_VAL_SHOWS(data=data_dir, n=len(self.folder.val), how=how))
        # names people mean as one class are one class: 'Checker-Disc' is the known
        # 'checker-disc', and a near miss of a known name is refused (a likely typo) before
        # it can become a class the store keeps for good
        match = match_names(self.folder.classes.objects, parent.classes,
                            new_ok=update.new_class_ok, where=str(self.data_dir))
        if match.renames:
            self.folder.classes = ClassList(tuple(match.renames.get(n, n)
                                                  for n in self.folder.classes.names))
            for line in match.notes() if warn is not None else []:
                warn(line)
        self.memory = memory_budget(update.memory, parent)  # the budget this step keeps
        # the configuration as it runs: the method row's init, the family's stage, the
        # parent's memory budget, the pre-tuning share; the card stores this
        self.config = replace(config, update=replace(
            update, init=update.init or row.init, memory=self.memory, pretune=self.pretune,
            freeze=update.freeze or arch_spec(parent.arch).default_freeze))
        self.replay = None  # the parent's memory, replayed (opened in agree)
        self.pretuned: PretuneResult | None = None  # what the pre-tuning did
        self.trained: _Trained | None = None

    def needs(self) -> list[int]:
        return [self.parent_step]

    def fingerprint(self) -> str:
        # the folder only: the parent (when not named) and its memory are "the latest", which
        # the step this request writes becomes; the checkpoint's key names them exactly
        return self.folder.fingerprint()

    def agree(self, ctx: JobContext) -> None:
        store, info = ctx.store, ctx.info
        agree(info, "the parent step", [self.parent_step, store.card(self.parent_step)
                                        .artifacts.get("weights.safetensors")])
        agree(info, "the training data", self.folder.fingerprint())
        self.replay = open_memory(store, self.parent_step) if self.memory else None

    def train(self, ctx: JobContext) -> FitResult:
        store, folder, parent_step = ctx.store, self.folder, self.parent_step
        cfg, info, device = self.config, ctx.info, ctx.device
        method, update, loop, data = cfg.method, cfg.update, cfg.loop, cfg.data
        row = method_row(method.method)
        teacher, parent = store.load_model(parent_step, device=str(device))
        unlearned = parent.extra.get("learning", {}).get("warnings", [])
        if unlearned and self.warn is not None and info.is_main:
            self.warn(f"warning: the parent step has classes it never learned "
                      f"({', '.join(w['name'] for w in unlearned)}); their retention cannot "
                      "be measured. Retrain it first if they matter.")
        new = _new_classes(folder, parent, self.data_dir)
        classes = ClassList(tuple(parent.classes)).extended(new)
        if row.sigmoid_form:  # exact: the parent's predictions do not change (models.surgery)
            sigmoid_form(teacher)
        student = copy.deepcopy(teacher)
        torch.manual_seed(loop.seed)  # the new rows' random init must not depend on what ran
        grow_classifier(student, len(new), init=update.init or row.init)
        if row.sigmoid_form:  # the mib init shifts the background bias: back to the constant 0
            sigmoid_form(student)
        stage = update.freeze or arch_spec(parent.arch).default_freeze
        freeze(student, stage)
        if update.bn_stats not in BN_STATS:
            raise CissError(f"--bn-stats {update.bn_stats}: choose from {', '.join(BN_STATS)}")
        freeze_bn_stats(student, update.bn_stats == "frozen")
        if loop.sync_bn and info.enabled:
            student = sync_batchnorm(student, device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        torch.manual_seed(loop.seed)

        lut = label_lut(folder.classes, classes)
        # every training image's size is known from validation: the cache is safe only when
        # no image is ever randomly cropped or rescaled (a key is an image and its flip)
        replay = self.replay
        shapes = [folder.shapes[s] for s in folder.train]
        crop = data.crop_size or auto_crop_size(shapes)
        if replay is not None:
            shapes += [replay.shapes[s] for s in replay.train]
        transform = TrainTransform(crop, scale=data.scale)
        cacheable = (update.cache_trunk_mb > 0
                     and (student.frozen_upto >= 0 or row.teacher)
                     and transform.fixed_geometry(max(max(s) for s in shapes)))
        dataset = SegmentationDataset(folder, folder.train, lut, transform, seed=loop.seed,
                                      keys=cacheable)
        if replay is not None:  # the memory's labels are the parent's ids: a prefix of ours
            dataset = JoinedDataset([dataset, SegmentationDataset(
                replay, replay.train, label_lut(replay.classes, classes), transform,
                seed=loop.seed, keys=cacheable)])
        cache = TrunkCache(update.cache_trunk_mb << 20) if cacheable else None
        thresholds = (entropy_thresholds(teacher, folder, lut, device, len(parent.classes))
                      if row.thresholds or method.pseudo else None)
        step_fn = IncrementalStep(student, teacher, len(parent.classes), method, cache,
                                  thresholds)
        workers = loader_workers(folder, data.workers, device)
        if self.pretune > 0:
            self.pretuned = pretune(student, teacher, len(parent.classes), dataset, folder,
                                    lut, [classes.index(n) for n in new], self.pretune, loop,
                                    info, workers=workers, progress=ctx.progress)
        # the checkpoint resumes only what these exact settings started from this parent
        key = loop.key("add", str(parent_step), parent.artifacts.get("weights.safetensors", ""),
                       folder.fingerprint(), repr(method), repr(update), repr(data),
                       str(info.world_size), replay.fingerprint() if replay else "")
        validate = (step_validator(store, parent_step, student, device, folder, classes, new)
                    if loop.evals else None)
        result = fit(student, step_fn, dataset, loop, checkpoint=ctx.work, key=key,
                     desc=method.method, after_epoch=ctx.after_epoch, progress=ctx.progress,
                     dist_info=info, validate=validate, workers=workers)
        if update.fuse:  # on every rank alike: they hold the same weights after DDP
            fuse_endpoints(student, teacher, len(parent.classes), len(new))
        self.trained = _Trained(parent, student, teacher, classes, new, crop, cache)
        return result

    def outcome(self, ctx: JobContext, fit: FitResult) -> Outcome:
        return _outcome(self, ctx, self.trained, fit)


def entropy_thresholds(teacher, folder: DatasetFolder, lut: np.ndarray, device, k_old: int,
                       limit: int = 500) -> torch.Tensor:
    """Per old class, the median normalised entropy of the parent on the background pixels of
    (up to ``limit``) training images: the pseudo-labelling thresholds (updater/pseudo)."""
    from ciss.analysis.scoring import batches
    from ciss.updater.pseudo import EntropyHistogram

    hist = EntropyHistogram(k_old)
    teacher.eval()
    for images, masks in batches(folder, validation_stems(folder.train, limit), 8):
        with torch.inference_mode():
            logits = teacher(torch.from_numpy(images).to(device))
        hist.add(logits, torch.from_numpy(lut[masks].astype(np.int64)).to(device))
    return torch.tensor(hist.thresholds(), dtype=torch.float32, device=device)


def step_validator(store: Store, parent_step: int, student, device, folder: DatasetFolder,
                   classes: ClassList, new: list[str]):
    """``() -> {"score": hIoU(old, new), "old", "new"}``: old classes on the parent's retention
    sets, new ones on the folder's val split, so the kept weights balance both."""
    from ciss.analysis.metrics import harmonic_iou

    predict = torch_predictor(student, device)
    new_ids = [classes.index(n) for n in new]
    keep = validation_stems(retention_stems(folder, [folder.classes.index(n) for n in new]))
    sets = retention_sets(store, parent_step)  # verified and opened once, scored each time

    def validate() -> dict[str, float]:
        old = [v for s in sets.values()
               for k, v in score_folder(predict, s, s.val, classes).per_class().items()
               if k != "background" and k not in new and v is not None]
        old_miou = sum(old) / len(old) if old else 0.0
        new_miou = (score_folder(predict, folder, keep, classes).miou(new_ids) or 0.0
                    if keep else 0.0)
        return {"score": harmonic_iou(old_miou, new_miou) or 0.0, "old": old_miou,
                "new": new_miou}

    return validate


def _outcome(job: AddJob, ctx: JobContext, trained: _Trained, result: FitResult) -> Outcome:
    """Rank 0's part after training: score, build the card and the artifacts' writers."""
    store, folder, data_dir, parent_step = ctx.store, job.folder, job.data_dir, job.parent_step
    cfg, info, device = job.config, ctx.info, ctx.device
    parent, student, classes, cache = (trained.parent, trained.student, trained.classes,
                                       trained.cache)
    t0 = time.perf_counter()
    student.eval()
    predict = torch_predictor(student, device)
    retention = score_retention(store, parent_step, predict, classes)
    # never empty: AddJob refuses such a folder before training
    keep = retention_stems(folder, [folder.classes.index(n) for n in folder.classes.objects])
    own: FolderScores = score_folder(predict, folder, keep, classes)
    new_ids = [classes.index(n) for n in trained.new]
    trained.warnings.extend(learning_warnings(
        list(classes.names), new_ids, own.iou, own.cm,
        model_pixels(folder, folder.train, classes),
        floor=cfg.floor, validation=result.validation, loss=None, command="add-classes"))
    extra = {"history": result.history, "resumed_from": result.resumed_from,
             "device": str(device), "torch": torch.__version__, "world_size": info.world_size,
             "learning": {"floor": cfg.floor,
                          "warnings": [w.to_json() for w in trained.warnings]},
             "validation": result.validation, "best": result.best,
             "pretune": job.pretuned.to_json() if job.pretuned else None,
             "trunk_cache": None if cache is None else
             {"hits": cache.hits, "misses": cache.misses, "mb": round(cache.used / 2**20, 1)}}
    if cfg.val_dir is not None:
        val_folder = open_folder(cfg.val_dir, require_train=False)
        stems = val_folder.val if val_folder.has_val_list and val_folder.val else sorted(
            val_folder.images)
        extra["val"] = {"folder": str(Path(cfg.val_dir).resolve()),
                        "per_class": score_folder(predict, val_folder, stems,
                                                  classes).per_class()}
    eval_s = time.perf_counter() - t0
    card = StepCard(
        step=-1, parent=parent_step, classes=list(classes.names), new_classes=trained.new,
        arch=parent.arch, frozen=list(frozen_stages(student)), method=cfg.method.method,
        data={"folder": str(Path(data_dir).resolve()), "fingerprint": folder.fingerprint(),
              "train_images": len(folder.train), "val_images": len(folder.val),
              "retention_images": len(keep),
              "retention_max_side": max(max(folder.shapes[k]) for k in keep),
              "folder_classes": list(folder.classes.names), "layout": folder.layout},
        # "new" becomes this step's number once the store allocates it (see write_step).
        retention={**{s: {"torch": v} for s, v in retention.items()},
                   "new": {"torch": own.per_class()}},
        timings={"train_s": round(result.seconds, 2), "eval_s": round(eval_s, 2),
                 "pretune_s": round(job.pretuned.seconds, 2) if job.pretuned else 0.0,
                 "data_wait_s": round(result.data_wait_s, 2),
                 "iterations": result.iterations},
        extra=extra,
        model_config=parent.model_config,
    )
    writers = {"retention": retention_writer(folder, keep)}
    if job.memory:
        chosen, card.memory = choose_memory(folder, job.replay, classes, job.memory,
                                            cfg.loop.seed)
        writers[MEMORY] = memory_writer(chosen, classes)
    if job.replay is not None:
        card.data["replayed_images"] = len(job.replay.train)
    return Outcome(card, student.cpu(), writers, own, trained.warnings,
                   run={"crop_size": trained.crop, "trunk_cache": cache is not None,
                        "world_size": info.world_size,
                        "global_batch_size": cfg.loop.batch_size * info.world_size})
