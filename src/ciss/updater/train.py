"""The base step: train a model from scratch (or ImageNet backbone) on a dataset folder."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ciss.analysis.learning import DEFAULT_FLOOR, learning_warnings
from ciss.analysis.scoring import score_folder, torch_predictor
from ciss.data.dataset import SegmentationDataset, label_lut
from ciss.data.folder import DatasetFolder, open_folder
from ciss.data.transforms import TrainTransform, auto_crop_size
from ciss.errors import CissError
from ciss.models import build_model
from ciss.store import StepCard, Store
from ciss.store.retention import retention_writer
from ciss.updater import losses
from ciss.updater.config import BaseConfig, DataConfig, StepConfig
from ciss.updater.defaults import recipe_of
from ciss.updater.distributed import agree, env_shard, sync_batchnorm
from ciss.updater.job import JobContext, Outcome, StepJob, StepReport, run_job
from ciss.updater.loop import FitResult, LoopConfig, fit
from ciss.updater.memory import MEMORY, choose_memory, memory_writer

__all__ = ["DataConfig", "StepReport", "train_base", "BaseJob"]  # DataConfig, StepReport:
# their homes are updater.config and updater.job; imported from here by older callers


def training_dataset(folder: DatasetFolder, lut, data: DataConfig, seed: int
                     ) -> SegmentationDataset:
    crop = data.crop_size or auto_crop_size([folder.shapes[s] for s in folder.train])
    return SegmentationDataset(folder, folder.train, lut,
                               TrainTransform(crop, scale=data.scale), seed=seed)


VALIDATION_IMAGES = 500  # validation during training scores at most this many val images


def validation_stems(stems: list[str], limit: int = VALIDATION_IMAGES) -> list[str]:
    """An evenly spaced, deterministic subset of ``stems`` for validation during training."""
    if len(stems) <= limit:
        return list(stems)
    step = len(stems) / limit
    return [stems[int(i * step)] for i in range(limit)]


def loader_workers(folder: DatasetFolder, workers: int | None, device=None) -> int:
    """DataLoader workers: on a CPU, none when decoded pixels sit in memory (a worker would
    only add inter-process copies and take cores from training), else up to 4 to decode
    JPEGs in parallel; on a GPU always up to 4, so that cropping, flipping and collating
    overlap the GPU's work instead of leaving it waiting."""
    import os

    if workers is not None:
        return workers
    on_gpu = device is not None and getattr(device, "type", str(device)) == "cuda"
    return min(4, os.cpu_count() or 1) if on_gpu or not folder.cached else 0


def retention_stems(folder: DatasetFolder, class_ids: list[int]) -> list[str]:
    """Val stems showing at least one of ``class_ids``: the step's retention set."""
    wanted = set(class_ids)
    return [s for s in folder.val if folder.presence[s] & wanted]


def object_miou_validator(model, device, folder: DatasetFolder, stems: list[str],
                          classes, ids: list[int]):
    """``() -> {"score": mean IoU of ``ids``, ...}`` on ``stems``, for ``fit``'s validation."""
    predict = torch_predictor(model, device)

    def validate() -> dict[str, float]:
        scores = score_folder(predict, folder, stems, classes)
        return {"score": scores.miou(ids) or 0.0}

    return validate


def train_base(store: Store, data_dir: Path, *, arch: str = "tiny", weights: str | None = None,
               loop: LoopConfig = LoopConfig(), data: DataConfig = DataConfig(),
               loss: str | None = None, floor: float = DEFAULT_FLOOR, progress: bool = True,
               after_epoch=None, memory: int = 0, mean=None, std=None, say=None,
               config: StepConfig | None = None) -> StepReport:
    """Train step 0 on ``data_dir`` and write it to ``store``.

    ``config`` (``config.resolve_step("train", ...)``) says everything; without it, the
    keyword arguments do: ``memory`` > 0 keeps that many class-balanced training images beside
    the step for the next steps to replay (``updater.memory``); ``loss`` is one of
    ``losses.BASE_LOSSES`` (``wce`` weighs classes by their training pixel share), None the
    architecture's recipe (``updater.defaults``). With ``loop.evals`` > 0 the val split is
    scored during training and the weights that scored best are kept. Classes whose val IoU
    ends below ``floor`` points (or that are never predicted) are named in
    ``StepReport.warnings`` and in the card. ``mean``/``std`` override the encoder's own
    normalisation of x/255 (``build_model``); ``say`` receives one line naming the model, its
    weights and preprocessing once it is built (before training).

    The folder is validated before anything else; nothing is written to the store unless
    training finishes. An interrupted run resumes from its last epoch checkpoint when the
    same command is repeated; a repeat after the step was written writes nothing
    (``StepReport.written_before``).

    Raises:
        CissError: bad data or settings (nothing written).
        CheckFailed: the loss became NaN.
    """
    if config is None:
        if loss is None:
            from ciss.updater.defaults import base_defaults

            loss = base_defaults(arch).loss
        config = StepConfig(command="train", loop=loop, data=data,
                            recipe=recipe_of(arch, "base"), floor=floor,
                            base=BaseConfig(arch=arch, weights=weights, loss=loss,
                                            memory=memory, mean=mean, std=std))
    return run_job(store, BaseJob(data_dir, config, say), progress=progress,
                   after_epoch=after_epoch)


class BaseJob(StepJob):
    """``ciss train``: a new model learns a labelled folder (step 0)."""

    prefix = "train"

    def __init__(self, data_dir: Path, config: StepConfig, say=None) -> None:
        if config.base.memory < 0:
            raise CissError(f"--memory {config.base.memory}: must be 0 (none) or a number of "
                            "images")
        self.config, self.say = config, say
        self.data_dir = Path(data_dir)
        self.folder = open_folder(data_dir, exif=config.data.exif, shard=env_shard())

    def fingerprint(self) -> str:
        return self.folder.fingerprint()

    def check(self, store: Store) -> None:
        if store.steps():
            raise CissError(f"{store.root}: already has steps; use 'ciss add-classes' to "
                            "extend the latest one, or choose a new --store")
        present = set().union(*(self.folder.presence[s] for s in self.folder.train)) - {0}
        if not present:
            raise CissError(f"{self.data_dir}: no object class appears in the training split")

    def agree(self, ctx: JobContext) -> None:
        agree(ctx.info, "the store", ctx.store.steps())
        agree(ctx.info, "the training data", self.folder.fingerprint())

    def train(self, ctx: JobContext) -> FitResult:
        cfg, folder, info, device = self.config, self.folder, ctx.info, ctx.device
        loop, data, base = cfg.loop, cfg.data, cfg.base
        classes = folder.classes
        torch.manual_seed(loop.seed)
        model = build_model(base.arch, num_classes=len(classes), weights=base.weights,
                            mean=base.mean, std=base.std).to(device)
        if self.say is not None and info.is_main:
            from ciss.models.build import describe_model

            self.say(describe_model(model))
        if loop.sync_bn and info.enabled:
            model = sync_batchnorm(model, device)
        dataset = training_dataset(folder, label_lut(classes, classes), data, loop.seed)
        loss = base.loss
        if loss not in losses.BASE_LOSSES:
            raise CissError(f"--loss {loss}: choose from {', '.join(losses.BASE_LOSSES)}")
        weights_t = (losses.class_weights(torch.from_numpy(folder.class_pixels(folder.train)))
                     .to(device) if loss == "wce" else None)

        def step_fn(images, masks):
            return losses.base_loss(loss, model(images), masks, weights_t)

        objects = list(range(1, len(classes)))
        val = validation_stems(retention_stems(folder, objects))
        validate = (object_miou_validator(model, device, folder, val, classes, objects)
                    if val and loop.evals else None)
        # the checkpoint resumes only what these exact settings started
        key = loop.key("base", base.arch, str(base.weights), folder.fingerprint(), repr(data),
                       loss, str(info.world_size))
        self.model, self.crop = model, dataset.transform.crop_size
        return fit(model, step_fn, dataset, loop, checkpoint=ctx.work, key=key, desc="base",
                   after_epoch=ctx.after_epoch, progress=ctx.progress, dist_info=info,
                   validate=validate, workers=loader_workers(folder, data.workers, device))

    def outcome(self, ctx: JobContext, fit: FitResult) -> Outcome:
        cfg, folder, model, device, info = (self.config, self.folder, self.model, ctx.device,
                                            ctx.info)
        classes = folder.classes
        objects = list(range(1, len(classes)))
        t0 = time.perf_counter()
        keep = retention_stems(folder, objects)
        scores = score_folder(torch_predictor(model, device), folder, keep, classes)
        eval_s = time.perf_counter() - t0
        warned = learning_warnings(
            list(classes.names), objects, scores.iou, scores.cm,
            folder.class_pixels(folder.train), floor=cfg.floor, validation=fit.validation,
            loss=cfg.base.loss)
        card = StepCard(
            step=0, parent=None, classes=list(classes.names), new_classes=list(classes.objects),
            arch=cfg.base.arch, frozen=[], method="base",
            data={"folder": str(self.data_dir.resolve()), "fingerprint": folder.fingerprint(),
                  "train_images": len(folder.train), "val_images": len(folder.val),
                  "retention_images": len(keep),
                  "retention_max_side": max(max(folder.shapes[k]) for k in keep),
                  "layout": folder.layout},
            retention={"0": {"torch": scores.per_class()}},
            timings={"train_s": round(fit.seconds, 2), "eval_s": round(eval_s, 2),
                     "data_wait_s": round(fit.data_wait_s, 2),
                     "iterations": fit.iterations},
            extra={"history": fit.history, "resumed_from": fit.resumed_from,
                   "validation": fit.validation, "best": fit.best,
                   "learning": {"floor": cfg.floor, "warnings": [w.to_json() for w in warned]},
                   "device": str(device), "torch": torch.__version__,
                   "world_size": info.world_size, "preprocessing": model.preprocessing},
            model_config=model.config)
        writers = {"retention": retention_writer(folder, keep)}
        if cfg.base.memory:
            chosen, card.memory = choose_memory(folder, None, classes, cfg.base.memory,
                                                cfg.loop.seed)
            writers[MEMORY] = memory_writer(chosen, classes)
        return Outcome(card, model.cpu(), writers, scores, warned,
                       run={"crop_size": self.crop, "world_size": info.world_size,
                            "global_batch_size": cfg.loop.batch_size * info.world_size})
