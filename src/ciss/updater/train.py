"""The base step: train a model from scratch (or ImageNet backbone) on a dataset folder."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ciss.analysis.learning import DEFAULT_FLOOR, ClassWarning, learning_warnings
from ciss.analysis.scoring import FolderScores, score_folder, torch_predictor
from ciss.data.dataset import SegmentationDataset, label_lut
from ciss.data.folder import DatasetFolder, open_folder
from ciss.data.transforms import TrainTransform, auto_crop_size
from ciss.engines.load import torch_device
from ciss.errors import CissError
from ciss.models import build_model
from ciss.store import StepCard, Store
from ciss.store.retention import retention_writer
from ciss.updater import losses
from ciss.updater.defaults import recipe_of
from ciss.updater.distributed import (
    DistInfo,
    agree,
    check_shared_store,
    distributed,
    env_shard,
    require_ranks_for_sync_bn,
    run_on_main,
    sync_batchnorm,
)
from ciss.updater.loop import FitResult, LoopConfig, fit
from ciss.updater.memory import MEMORY, choose_memory, memory_writer


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


@dataclass
class StepReport:
    """The outcome of writing a step: its number, card, scores and training record."""

    step: int
    card: StepCard
    scores: FolderScores | None  # None on ranks other than 0 (they do not evaluate)
    fit: FitResult
    rank: int = 0
    warnings: list[ClassWarning] = field(default_factory=list)


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


def train_base(store: Store, data_dir: Path, *, arch: str = "tiny", weights: str | None = None,
               loop: LoopConfig = LoopConfig(), data: DataConfig = DataConfig(),
               loss: str | None = None, floor: float = DEFAULT_FLOOR, progress: bool = True,
               after_epoch=None, memory: int = 0, mean=None, std=None,
               say=None) -> StepReport:
    """Train step 0 on ``data_dir`` and write it to ``store``.

    ``mean``/``std`` override the encoder's own normalisation of x/255 (``build_model``);
    ``say`` receives one line naming the model, its weights and preprocessing once it is
    built (before training).

    ``memory`` > 0 keeps that many class-balanced training images beside the step for the
    next steps to replay (``updater.memory``; off by default).

    ``loss`` is one of ``losses.BASE_LOSSES`` (``wce`` weighs classes by their training pixel
    share); None takes the architecture's default recipe (``updater.defaults``).
    With ``loop.evals`` > 0 the val split is scored during training and the weights
    that scored best are kept. Classes whose val IoU ends below ``floor`` points (or that are
    never predicted) are named in ``StepReport.warnings`` and in the card.

    The folder is validated before anything else; nothing is written to the store unless
    training finishes. An interrupted run resumes from its last epoch checkpoint when the
    same command is repeated.

    Raises:
        CissError: bad data or settings (nothing written).
        CheckFailed: the loss became NaN.
    """
    if memory < 0:
        raise CissError(f"--memory {memory}: must be 0 (none) or a number of images")
    if loss is None:
        from ciss.updater.defaults import base_defaults

        loss = base_defaults(arch).loss
    folder = open_folder(data_dir, exif=data.exif, shard=env_shard())
    if store.steps():
        raise CissError(f"{store.root}: already has steps; use 'ciss add-classes' to extend the "
                        "latest one, or choose a new --store")
    present = set().union(*(folder.presence[s] for s in folder.train)) - {0}
    if not present:
        raise CissError(f"{data_dir}: no object class appears in the training split")
    with distributed(torch_device(loop.device)) as (info, device):
        require_ranks_for_sync_bn(info, loop.sync_bn)
        check_shared_store(info, store.root, store.work_dir)
        agree(info, "the store", store.steps())
        agree(info, "the training data", folder.fingerprint())
        return _train_base(store, folder, data_dir, arch, weights, loop, data, loss, floor,
                           progress, after_epoch, info, device, memory,
                           {"mean": mean, "std": std}, say)


def object_miou_validator(model, device, folder: DatasetFolder, stems: list[str],
                          classes, ids: list[int]):
    """``() -> {"score": mean IoU of ``ids``, ...}`` on ``stems``, for ``fit``'s validation."""
    predict = torch_predictor(model, device)

    def validate() -> dict[str, float]:
        scores = score_folder(predict, folder, stems, classes)
        return {"score": scores.miou(ids) or 0.0}

    return validate


def _train_base(store, folder, data_dir, arch, weights, loop, data, loss, floor, progress,
                after_epoch, info: DistInfo, device, memory: int, norm: dict,
                say) -> StepReport:
    classes = folder.classes
    torch.manual_seed(loop.seed)
    model = build_model(arch, num_classes=len(classes), weights=weights, **norm).to(device)
    if say is not None and info.is_main:
        from ciss.models.build import describe_model

        say(describe_model(model))
    if loop.sync_bn and info.enabled:
        model = sync_batchnorm(model, device)
    dataset = training_dataset(folder, label_lut(classes, classes), data, loop.seed)

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
    key = loop.key("base", arch, str(weights), folder.fingerprint(), repr(data), loss,
                   str(info.world_size))
    ckpt = store.work_dir / f"train-{key}"
    result = fit(model, step_fn, dataset, loop, checkpoint=ckpt, key=key, desc="base",
                 after_epoch=after_epoch, progress=progress, dist_info=info,
                 validate=validate, workers=loader_workers(folder, data.workers, device))

    def write() -> int:
        t0 = time.perf_counter()
        keep = retention_stems(folder, list(range(1, len(classes))))
        scores = score_folder(torch_predictor(model, device), folder, keep, classes)
        eval_s = time.perf_counter() - t0
        warned.extend(learning_warnings(
            list(classes.names), objects, scores.iou, scores.cm,
            folder.class_pixels(folder.train), floor=floor, validation=result.validation,
            loss=loss))
        card = StepCard(
            step=0, parent=None, classes=list(classes.names), new_classes=list(classes.objects),
            arch=arch, frozen=[], method="base",
            hparams={**asdict(loop), **asdict(data), "weights": weights, "loss": loss,
                     "crop_size": dataset.transform.crop_size, "world_size": info.world_size,
                     "global_batch_size": loop.batch_size * info.world_size},
            data={"folder": str(Path(data_dir).resolve()), "fingerprint": folder.fingerprint(),
                  "train_images": len(folder.train), "val_images": len(folder.val),
                  "retention_images": len(keep),
                  "retention_max_side": max(max(folder.shapes[k]) for k in keep),
                  "layout": folder.layout},
            retention={"0": {"torch": scores.per_class()}},
            timings={"train_s": round(result.seconds, 2), "eval_s": round(eval_s, 2),
                     "data_wait_s": round(result.data_wait_s, 2),
                     "iterations": result.iterations},
            extra={"history": result.history, "resumed_from": result.resumed_from,
                   "validation": result.validation, "best": result.best,
                   "learning": {"floor": floor, "warnings": [w.to_json() for w in warned]},
                   "device": str(device), "torch": torch.__version__,
                   "world_size": info.world_size, "preprocessing": model.preprocessing},
            model_config=model.config,
            config={"loop": asdict(loop), "data": asdict(data),
                    "base": {"arch": arch, "weights": weights, "loss": loss, "memory": memory},
                    "recipe": recipe_of(arch, "base")},
        )
        written.append(scores)
        writers = {"retention": retention_writer(folder, keep)}
        if memory:
            chosen, card.memory = choose_memory(folder, None, classes, memory, loop.seed)
            writers[MEMORY] = memory_writer(chosen, classes)
        return store.write_step(card, model.cpu(), writers)

    written: list = []
    warned: list[ClassWarning] = []
    step = run_on_main(info, write)
    if info.is_main:
        shutil.rmtree(ckpt, ignore_errors=True)  # the step landed: the checkpoint is spent
    return StepReport(step=step, card=store.card(step), scores=written[0] if written else None,
                      fit=result, rank=info.rank, warnings=warned)

