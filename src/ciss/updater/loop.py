"""One plain training loop for every method: the method is the ``step_fn`` it is given."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from ciss.errors import CheckFailed, CissError
from ciss.updater.checkpoint import load_best, load_checkpoint, save_checkpoint
from ciss.updater.distributed import DistInfo, any_rank, barrier, mean_over_ranks

# (images, masks[, keys]) -> {"loss": ..., other parts}
StepFn = Callable[..., dict[str, torch.Tensor]]


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings.

    Attributes:
        iterations: the training budget in optimiser steps. A budget in steps rather than
            passes means a small folder still gets enough updates and a large one does not
            take hours (BENCHMARKS.md §1); the last pass over the data may be partial.
        epochs: when set, passes over the training split instead of ``iterations``.
        max_epochs: when set (and ``epochs`` is not), the budget is at most this many passes
            and at least ``min_iterations`` steps: ``iterations`` is then a ceiling. The
            add-classes recipe uses it so that a small new-class folder is not passed over
            again and again, which erodes the old classes (BENCHMARKS.md §3).
        min_iterations: the floor that goes with ``max_epochs``.
        batch_size: images per optimiser step (>= 2: BatchNorm needs it).
        lr: peak learning rate (after warm-up), poly decay (power 0.9) per iteration.
        weight_decay: decoupled (AdamW) or L2 (SGD).
        optimizer: "adamw" or "sgd" (momentum 0.9, Nesterov).
        encoder_lr: the encoder stages' learning rate as a fraction of ``lr`` (head and
            classifier train at ``lr``); 1.0 trains every stage alike.
        warmup: fraction of iterations with linear warm-up.
        seed: data order and augmentation depend only on (seed, epoch).
        device: "auto" (CUDA when present), "cpu" or "cuda[:i]".
        amp: mixed precision on CUDA: bf16 on compute capability >= 8.0 (Ampere on), fp16
            with loss scaling below (cuDNN has no bf16 convolutions there, whatever
            ``torch.cuda.is_bf16_supported`` says), fp32 on the CPU.
        sync_bn: under torchrun on GPUs, BatchNorm statistics over all ranks' batches.
        evals: validation points spread over the budget; the weights that scored best are
            kept (0: keep the last weights). Needs a ``validate`` function in ``fit``.
        checkpoint_every_s: a resume checkpoint is written at the end of an epoch once this
            many seconds have passed since the last one (0: every epoch). A checkpoint of a
            large model is ~0.5 GB: on a small folder, one per epoch would cost as much as
            the training.
        sync_every: optimiser steps between host-device synchronisations (the non-finite
            loss check, the progress bar); the steps between run without waiting on the GPU.
    """

    iterations: int = 1000
    epochs: int | None = None
    max_epochs: int | None = None
    min_iterations: int = 0
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    encoder_lr: float = 1.0
    warmup: float = 0.03
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    sync_bn: bool = False
    evals: int = 4
    checkpoint_every_s: float = 300.0
    sync_every: int = 10

    def total_iterations(self, per_epoch: int, world_size: int = 1) -> int:
        """The budget in optimiser steps of one process, for ``per_epoch`` steps per pass.

        ``iterations`` counts steps of one process's batch: under torchrun the samples seen
        over all ranks stay the same (each rank takes ``1 / world_size`` of the steps), and a
        pass is over the whole folder (each rank's shard), so the caps are global too.
        """
        if self.epochs:
            return self.epochs * per_epoch
        steps, floor = (math.ceil(n / world_size) for n in (self.iterations,
                                                            self.min_iterations))
        if self.max_epochs:
            return max(min(steps, self.max_epochs * per_epoch), min(floor, steps))
        return steps

    def key(self, *parts: str) -> str:
        """A fingerprint of these settings plus ``parts``: checkpoints resume only on a match."""
        blob = json.dumps([asdict(self), parts], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class FitResult:
    """What a training run did: per-epoch mean losses, seconds, the epoch it resumed from."""

    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int | None = None
    iterations: int = 0
    validation: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] | None = None  # the validation point whose weights were kept
    data_wait_s: float = 0.0  # time the training loop waited for the next batch


DECODER_STAGES = ("head", "classifier")


def param_groups(model: nn.Module, cfg: LoopConfig) -> list[dict]:
    """The trainable parameters, the encoder's at ``lr * encoder_lr`` and the rest at ``lr``
    (a model without stages is one group)."""
    stages = getattr(model, "stages", None)
    if stages is None or cfg.encoder_lr == 1.0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    groups = {True: [], False: []}
    for name, stage in stages.items():
        groups[name not in DECODER_STAGES].extend(p for p in stage.parameters()
                                                   if p.requires_grad)
    return [g for g in ({"params": groups[False], "lr": cfg.lr},
                        {"params": groups[True], "lr": cfg.lr * cfg.encoder_lr}) if g["params"]]


def make_optimizer(model: nn.Module, cfg: LoopConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if not groups or not any(g["params"] for g in groups):
        raise CissError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True,
                               weight_decay=cfg.weight_decay)
    raise CissError(f"--optimizer {cfg.optimizer}: choose adamw or sgd")


def poly_schedule(optimizer, total: int, warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    n_warm = max(1, int(total * warmup))

    def factor(it: int) -> float:
        if it < n_warm:
            return (it + 1) / n_warm
        return max(0.0, 1 - (it - n_warm) / max(1, total - n_warm)) ** 0.9

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _StepModule(nn.Module):
    """The model with its step function as ``forward``, so DistributedDataParallel can wrap the
    whole step (frozen trunk, teacher and losses included) and sync the trainable gradients."""

    def __init__(self, model: nn.Module, step_fn: StepFn) -> None:
        super().__init__()
        self.model = model
        self.step_fn = step_fn  # a plain callable: the teacher it may hold is not registered

    def forward(self, *batch):
        return self.step_fn(*batch)


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` pairs to datasets that declare ``epoch_in_index`` (plain
    indices to others), so that augmentation can depend on the epoch even in persistent
    DataLoader workers (their copy of the dataset never sees ``set_epoch``).

    Under torchrun each rank keeps one shard for the whole run, indices ``rank::world``
    (cut to an equal count on every rank), in a new order each epoch: a rank then only ever
    reads the images it decoded and keeps in memory (``open_folder(shard=...)``). Every
    global batch still mixes the ranks' shards, and every epoch covers the folder once.
    """

    def __init__(self, dataset, cfg: LoopConfig, info: DistInfo) -> None:
        self.dataset, self.cfg, self.info = dataset, cfg, info
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _inner(self):
        cfg, info, epoch = self.cfg, self.info, self.epoch
        if info.enabled:
            n = len(self.dataset) // info.world_size
            own = torch.arange(info.rank, len(self.dataset), info.world_size)[:n]
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                cfg.seed * 100_003 + epoch * 1_009 + info.rank))
            return own[order].tolist()
        return RandomSampler(self.dataset, generator=torch.Generator().manual_seed(
            cfg.seed * 100_003 + epoch))

    def __iter__(self):
        if getattr(self.dataset, "epoch_in_index", False):
            return ((self.epoch, i) for i in self._inner())
        return iter(self._inner())

    def __len__(self) -> int:
        return len(self._inner())


def eval_points(total: int, per_epoch: int, evals: int) -> set[int]:
    """The epochs (0-based) after which to validate: ``evals`` points spread over the
    budget's second half (early weights are never the best worth keeping), the last always."""
    n_epochs = math.ceil(total / per_epoch)
    if evals <= 0:
        return set()
    marks = [total * (0.5 + 0.5 * (k + 1) / evals) for k in range(evals)]
    return {min(n_epochs - 1, max(0, math.ceil(m / per_epoch) - 1)) for m in marks}


@dataclass
class _Best:
    score: float = -math.inf
    epoch: int = -1
    state: dict[str, torch.Tensor] | None = None


def fit(model: torch.nn.Module, step_fn: StepFn, dataset, cfg: LoopConfig, *,
        checkpoint: Path | None = None, key: str = "", desc: str = "train",
        after_epoch: Callable[[int], None] | None = None, progress: bool = True,
        dist_info: DistInfo = DistInfo(),
        validate: Callable[[], dict[str, float]] | None = None,
        workers: int = 0) -> FitResult:
    """Train ``model``'s trainable parameters with ``step_fn`` over ``dataset``.

    Args:
        model: moved to the device already; only ``requires_grad`` parameters are optimised.
        step_fn: ``(images, masks) -> {"loss": ..., other parts}`` on device tensors.
        dataset: yields (uint8 image, int64 mask[, key]); one with ``epoch_in_index`` is
            indexed by ``(epoch, index)`` pairs (see :class:`EpochSampler`).
        checkpoint: folder for the per-epoch checkpoint; an existing one with the same
            ``key`` is resumed from.
        after_epoch: called with the finished epoch (tests use it to interrupt).
        dist_info: under torchrun, this rank: the step runs inside DistributedDataParallel on
            this rank's shard, ``cfg.batch_size`` is per rank, epoch losses are averaged over
            ranks and only rank 0 writes the checkpoint.
        validate: ``() -> {"score": ..., other figures}`` on the current weights (in eval
            mode); called at ``cfg.evals`` points, the best-scoring weights are kept. Every
            rank validates the same data, so all ranks keep the same weights.
        workers: DataLoader worker processes (0: load in this process).

    Raises:
        CheckFailed: when the loss becomes NaN or infinite.
    """
    from tqdm import tqdm

    from ciss.progress import progress_bar

    info = dist_info
    device = next(model.parameters()).device
    shard = len(dataset) // info.world_size
    if shard < cfg.batch_size:
        raise CissError(f"only {shard} training images per process for --batch-size "
                        f"{cfg.batch_size}; lower the batch size or add images")
    optimizer = make_optimizer(model, cfg)
    run_step = step_fn
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        run_step = DistributedDataParallel(
            _StepModule(model, step_fn), device_ids=[device] if device.type == "cuda" else None)
    per_epoch = shard // cfg.batch_size
    total = cfg.total_iterations(per_epoch, info.world_size)
    n_epochs = math.ceil(total / per_epoch)
    checkpoints = eval_points(total, per_epoch, cfg.evals if validate else 0)
    scheduler = poly_schedule(optimizer, total, cfg.warmup)
    amp_dtype = autocast_dtype(device) if cfg.amp else None
    use_amp = amp_dtype is not None
    amp_dtype = amp_dtype or torch.float16  # unused when disabled
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    result = FitResult()
    best = _Best()
    start_epoch = 0
    if checkpoint is not None:
        meta = load_checkpoint(checkpoint, key=key, model=model, optimizer=optimizer,
                               scheduler=scheduler)
        if meta is not None:
            start_epoch = meta["epoch"] + 1
            result.resumed_from = start_epoch
            extra = meta["extra"]
            result.history = extra.get("history", [])
            result.seconds = extra.get("seconds", 0.0)
            result.iterations = extra.get("iterations", 0)
            result.data_wait_s = extra.get("data_wait_s", 0.0)
            result.validation = extra.get("validation", [])
            if extra.get("best") is not None:
                best = _Best(extra["best"]["score"], extra["best"]["epoch"],
                             load_best(checkpoint))
    sampler = EpochSampler(dataset, cfg, info)
    # one loader for the whole run: persistent workers keep their start-up cost out of epochs
    loader = DataLoader(dataset, batch_size=cfg.batch_size, drop_last=True, sampler=sampler,
                        **_loader_options(workers, device))
    last_save = time.monotonic()
    for epoch in range(start_epoch, n_epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        steps = min(per_epoch, total - epoch * per_epoch)
        model.train()
        sums: dict[str, torch.Tensor] = {}
        # the last non-finite loss value seen (0 while all are finite): kept on the device so
        # that the check costs one synchronisation per ``sync_every`` steps, not one per step
        bad = torch.zeros((), device=device)
        bar = progress_bar(tqdm, total=steps, desc=f"{desc} {epoch + 1}/{n_epochs}",
                           enabled=progress and info.is_main)
        shown = 0
        ready = time.perf_counter()
        for it, batch in enumerate(loader):
            if it >= steps:
                break
            result.data_wait_s += time.perf_counter() - ready
            batch = [t.to(device, non_blocking=True) for t in batch]
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                parts = run_step(*batch)
            loss = parts["loss"]
            finite = torch.isfinite(loss.detach())
            bad = torch.where(finite, bad, loss.detach().float())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            result.iterations += 1
            if (it + 1) % cfg.sync_every == 0 or it + 1 == steps:
                _stop_if_not_finite(info, bad, device, epoch, it, cfg)
                bar.update(it + 1 - shown)
                shown = it + 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
            ready = time.perf_counter()
        bar.close()
        seconds = time.perf_counter() - t0
        result.seconds += seconds
        means = mean_over_ranks(info, {k: float(v) / max(1, steps) for k, v in sums.items()},
                                device)
        result.history.append({**means, "seconds": round(seconds, 3)})
        if epoch in checkpoints:
            _validate(model, validate, epoch, result, best)
        due = time.monotonic() - last_save >= cfg.checkpoint_every_s
        if checkpoint is not None and info.is_main and due and epoch < n_epochs - 1:
            save_checkpoint(checkpoint, key=key, epoch=epoch, model=model, optimizer=optimizer,
                            scheduler=scheduler, best=best.state,
                            extra={"history": result.history, "seconds": result.seconds,
                                   "iterations": result.iterations,
                                   "validation": result.validation,
                                   "data_wait_s": result.data_wait_s,
                                   "best": None if best.state is None else
                                   {"score": best.score, "epoch": best.epoch}})
            last_save = time.monotonic()
        barrier(info)
        if after_epoch is not None:
            after_epoch(epoch)
    if result.history and not all(math.isfinite(v) for v in result.history[-1].values()):
        raise CheckFailed("training ended with a non-finite loss")
    if best.state is not None:
        if best.epoch != n_epochs - 1:
            model.load_state_dict(best.state)
        result.best = next(v for v in result.validation if v["epoch"] == best.epoch + 1)
    return result


def _stop_if_not_finite(info: DistInfo, bad: torch.Tensor, device, epoch: int, it: int,
                        cfg: LoopConfig) -> None:
    """Raise on every rank together when any rank saw a non-finite loss (one sync)."""
    value = float(bad)
    # every rank must stop together, or the others would wait forever in all-reduce
    if any_rank(info, value != 0.0, device):
        where = (f"became {'nan' if math.isnan(value) else 'inf'}" if value != 0.0
                 else "became non-finite on another rank")
        raise CheckFailed(f"the training loss {where} at epoch {epoch + 1}, by iteration "
                          f"{it + 1}; lower --lr (now {cfg.lr}) and retry")


def _validate(model, validate, epoch: int, result: FitResult, best: _Best) -> None:
    """Score the current weights; remember them when they beat the best so far."""
    was_training = model.training
    model.eval()
    figures = validate()
    model.train(was_training)
    result.validation.append({"epoch": epoch + 1, "iterations": result.iterations,
                              **{k: round(float(v), 5) for k, v in figures.items()}})
    # ties go to the later weights: they saw more data at a lower learning rate
    if figures["score"] >= best.score:
        best.score, best.epoch = float(figures["score"]), epoch
        best.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision type for ``device``: bf16 from compute capability 8.0, fp16 below
    (with a GradScaler), None (fp32) off CUDA."""
    if device.type != "cuda":
        return None
    major, _minor = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def _loader_options(workers: int, device: torch.device) -> dict:
    """DataLoader settings: pinned memory feeds a GPU asynchronously; persistent workers
    keep their decoded state (and their start-up cost) across epochs."""
    opts: dict = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        opts.update(persistent_workers=True, prefetch_factor=4)
    return opts
