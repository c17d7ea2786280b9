"""The one job runner that writes a step: ``ciss train``, ``ciss add-classes`` and ``ciss import``.

Every step-writing command runs the same transaction, in this order::

    resolve (config.resolve_step) -> request key -> already written? -> refusals
    -> train (resuming from the work folder) -> evaluate, card -> store.write_step
    -> remove the work folder

What differs between the commands (how the model is made, trained and scored) is a
:class:`StepJob`; everything else is here, once.

Leftovers and their rules (the work folder is ``<store>/.work/<prefix>-<request>``, named by
the request, so the same command finds it again whatever happened to the store meanwhile):

- a work folder whose checkpoint matches the run's key: resumed (``loop.fit``);
- one whose checkpoint is of another key (the parent moved, the data changed): overwritten
  by the first new checkpoint;
- one whose request already produced a step (killed after the commit, before the clean-up):
  removed, and the command says ``step N was written at <time>; nothing to do`` (the card
  names the request, written in the same rename as the step: ``store.step_for_work``);
- one another live process works in: refused in one line (its lease, ``store.lease``; a dead
  job's lease is free, so a rerun after a kill takes it over);
- the checkpoint's own ``.old`` folder: ``updater.checkpoint``'s rule.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ciss.store import StepCard, Store
from ciss.updater.config import StepConfig
from ciss.updater.loop import FitResult


@dataclass
class StepReport:
    """The outcome of a step-writing command: its number, card, scores and training record.

    ``written_before`` is set (the card's creation time) when the same request had already
    written the step: nothing was trained, ``scores`` is None.
    """

    step: int
    card: StepCard
    scores: Any  # FolderScores; None on ranks other than 0 (they do not evaluate)
    fit: FitResult
    rank: int = 0
    warnings: list = field(default_factory=list)
    written_before: str | None = None

    def nothing_to_do(self) -> str:
        """The one line for a request whose step already exists."""
        return f"step {self.step} was written at {self.written_before}; nothing to do"


@dataclass
class Outcome:
    """What rank 0 of a job hands the store: the card, the model, the artifacts' writers."""

    card: StepCard
    model: Any
    writers: dict[str, Callable[[Path], None]]
    scores: Any
    warnings: list = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)  # facts of this run (crop, world size)


@dataclass
class JobContext:
    """One run of a job on this rank."""

    store: Store
    config: StepConfig
    work: Path  # the work folder: the resume checkpoint of this request
    info: Any  # distributed.DistInfo
    device: Any  # torch.device
    progress: bool = True
    after_epoch: Callable[[int], None] | None = None


class StepJob:
    """What one command does inside the runner; subclasses fill in the parts.

    Attributes:
        prefix: the work folder's prefix (train, add, import).
        trains: whether it runs the optimiser loop (distributed, resumable); import does not.
    """

    prefix = "step"
    trains = True
    config: StepConfig  # resolved: what the card stores and the request key is made of

    def fingerprint(self) -> str:
        """What the request learns from (the data, the parent's memory), for its key."""
        raise NotImplementedError

    def check(self, store: Store) -> None:
        """Refusals that need the store (e.g. a base step into a store that has steps)."""

    def needs(self) -> list[int]:
        """The stored steps the job reads while it runs (prune spares them meanwhile)."""
        return []

    def agree(self, ctx: JobContext) -> None:
        """Under torchrun: refuse unless every rank holds the same inputs."""

    def train(self, ctx: JobContext) -> FitResult:
        """Train (every rank), resuming from the checkpoint in ``ctx.work``."""
        return FitResult()

    def outcome(self, ctx: JobContext, fit: FitResult) -> Outcome:
        """Rank 0: score the trained model, build the card and the artifacts' writers."""
        raise NotImplementedError


def request_key(config: StepConfig, fingerprint: str) -> str:
    """The request's identity: the resolved configuration and what it learns from. The same
    command on the same data has the same key, before and after its step is written."""
    blob = json.dumps([config.to_json(), fingerprint], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def written_by(store: Store, work: Path) -> StepCard | None:
    """The step the request of work folder ``work`` already wrote, if any (its card,
    verified)."""
    step = store.step_for_work(work.name)
    return None if step is None else store.card(step)


def _already(store: Store, work: Path) -> StepReport | None:
    done = written_by(store, work)
    if done is None:
        return None
    # killed after the commit and before the clean-up, or simply run twice: the step the
    # user asked for exists; its checkpoint is spent
    shutil.rmtree(work, ignore_errors=True)
    return StepReport(step=done.step, card=done, scores=None, fit=FitResult(),
                      written_before=done.created or "an unrecorded time")


def _device_name(config: StepConfig) -> str:
    if config.loop is not None:
        return config.loop.device
    return config.source.device if config.source is not None else "auto"


def run_job(store: Store, job: StepJob, *, progress: bool = True,
            after_epoch: Callable[[int], None] | None = None) -> StepReport:
    """Run ``job`` as one transaction and return what it wrote (or had written before).

    Raises:
        CissError: bad data or settings (nothing written).
        CheckFailed: the loss became NaN.
    """
    from ciss.engines.load import torch_device
    from ciss.updater.distributed import (
        DistInfo,
        check_shared_store,
        distributed,
        require_ranks_for_sync_bn,
        run_on_main,
    )

    config = job.config
    request = request_key(config, job.fingerprint())
    work = store.work_dir / f"{job.prefix}-{request}"
    done = _already(store, work)
    if done is not None:
        return done
    job.check(store)
    device = torch_device(_device_name(config))
    if not job.trains:
        with store.lease(work, steps=job.needs()) as lease:
            done = _already(store, work)  # the same command may have finished meanwhile
            if done is not None:
                return done
            return _finish(JobContext(store, config, work, DistInfo(), device, progress,
                                      after_epoch), job, FitResult(), request, run_on_main,
                           lease)
    with distributed(device) as (info, device):
        require_ranks_for_sync_bn(info, config.loop.sync_bn)
        check_shared_store(info, store.root, store.work_dir)
        # rank 0 owns the work folder (it writes the checkpoints and the step): its lease
        # tells a live job from a dead one's leftover, and keeps prune off the parent
        held = (store.lease(work, steps=job.needs()) if info.is_main
                else contextlib.nullcontext(None))
        with held as lease:
            done = None if info.enabled else _already(store, work)  # finished meanwhile?
            if done is not None:
                return done
            ctx = JobContext(store, config, work, info, device, progress, after_epoch)
            job.agree(ctx)
            fit = job.train(ctx)
            return _finish(ctx, job, fit, request, run_on_main, lease)


def _finish(ctx: JobContext, job: StepJob, fit: FitResult, request: str,
            run_on_main, lease) -> StepReport:
    """Rank 0 scores and writes the step; the work folder goes once the step has landed."""
    kept: list[Outcome] = []

    def write() -> int:
        out = job.outcome(ctx, fit)
        out.card.config = {**ctx.config.to_json(), "request": request}
        if out.run:
            out.card.extra["run"] = out.run
        kept.append(out)
        # the card names the work folder in the same rename as the step (store.write_step),
        # so a rerun after a kill past this point finds the step instead of training again
        return ctx.store.write_step(out.card, out.model, out.writers, work=lease or ctx.work)

    step = run_on_main(ctx.info, write)
    if ctx.info.is_main:
        shutil.rmtree(ctx.work, ignore_errors=True)  # the step landed: the checkpoint is spent
    out = kept[0] if kept else None
    return StepReport(step=step, card=ctx.store.card(step),
                      scores=out.scores if out else None, fit=fit, rank=ctx.info.rank,
                      warnings=out.warnings if out else [])
