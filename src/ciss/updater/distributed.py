"""torch.distributed for ``ciss train`` / ``ciss add-classes`` under ``torchrun``.

``torchrun --nproc_per_node=N -m ciss train ...`` starts N copies of the same command with
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set. Each copy trains on its
DistributedSampler shard inside DistributedDataParallel (gloo on CPU, NCCL on GPU), epoch
metrics are averaged over ranks, and only rank 0 evaluates and writes the step; the others wait
for it and return the same step. Without those variables (or with WORLD_SIZE=1) nothing here
does anything.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ciss.errors import CissError


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise CissError(f"environment variable {name}={raw!r} is not an integer") from None


def env_shard() -> tuple[int, int] | None:
    """(rank, world size) as torchrun's environment gives them, readable before the process
    group exists (a folder is opened first); None when not distributed."""
    world = _env_int("WORLD_SIZE", 1)
    return (_env_int("RANK", 0), world) if world > 1 else None


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[tuple[DistInfo, torch.device]]:
    """Join the process group torchrun describes; yield (info, this rank's device).

    The group is created here and destroyed on exit, unless the caller made one already.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        yield DistInfo(), device
        return
    info = DistInfo(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    else:
        # torchrun sets OMP_NUM_THREADS=1; say so in torch too, and share the cores out.
        per_rank = max(1, (os.cpu_count() or 1) // _env_int("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", per_rank)))
    created = not dist.is_initialized()
    if created:
        # DistributedDataParallel imports torch._dynamo on first use; imported after the group
        # exists, it keeps ~10 references to it (measured: torch 2.14), so
        # destroy_process_group cannot free it, gloo's worker threads outlive Python, and the
        # process sometimes aborts at exit ("terminate called without an active exception",
        # SIGABRT) after the step was written. Imported first, the group dies on destroy.
        importlib.import_module("torch._dynamo")

        timeout = dt.timedelta(seconds=_env_int("CISS_DIST_TIMEOUT_S", 1800))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    try:
        yield info, device
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def agree(info: DistInfo, what: str, value) -> None:
    """Raise on every rank unless all ranks hold the same ``value`` (a JSON-able summary).

    Raises:
        CissError: naming ``what`` and the first rank that differs from rank 0.
    """
    if not info.enabled:
        return
    values = [None] * info.world_size
    dist.all_gather_object(values, value)
    for rank, v in enumerate(values):
        if v != values[0]:
            raise CissError(f"ranks disagree about {what}: rank 0 has {values[0]!r}, rank "
                            f"{rank} has {v!r}; every rank must run the same command on the "
                            "same store and data")


def check_shared_store(info: DistInfo, store_root, work_dir) -> None:
    """Every rank must see the same store: rank 0 writes a marker that all must read back.

    Raises:
        CissError: on every rank, when some rank cannot see rank 0's marker (a local path that
            is not shared between the machines).
    """
    if not info.enabled:
        return
    name = [f"dist-{uuid.uuid4().hex}"] if info.is_main else [None]
    dist.broadcast_object_list(name, src=0)
    marker = work_dir / name[0]
    if info.is_main:
        work_dir.mkdir(parents=True, exist_ok=True)
        marker.write_text("ciss")
    dist.barrier()
    seen = [None] * info.world_size
    dist.all_gather_object(seen, marker.exists())
    dist.barrier()
    if info.is_main:
        marker.unlink(missing_ok=True)
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise CissError(f"{store_root}: rank(s) {', '.join(map(str, blind))} cannot see the "
                        "store rank 0 writes to; --store must be a folder shared by every node "
                        "(e.g. NFS), since rank 0 writes the step and every rank reads it")


def mean_over_ranks(info: DistInfo, values: dict[str, float],
                    device: torch.device | str = "cpu") -> dict[str, float]:
    """Average a dict of floats over ranks (same keys on every rank).

    The tensor lives on ``device``, the training device: NCCL only reduces CUDA tensors, so a
    CPU tensor would fail under torchrun on GPUs (gloo takes either).
    """
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t.tolist())}


def any_rank(info: DistInfo, flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any (so all ranks stop together)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def run_on_main(info: DistInfo, fn):
    """``fn()`` on rank 0 only (evaluate, write the step); its result on every rank.

    Raises:
        whatever ``fn`` raised, on rank 0; CissError naming it on the other ranks (so no rank is
        left waiting for a step that will never be written).
    """
    if not info.enabled:
        return fn()
    box, error = [None, None], None
    if info.is_main:
        try:
            box = [fn(), None]
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the others
            error = exc
            box = [None, f"{type(exc).__name__}: {exc}"]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise CissError(f"rank 0 failed, no step was written: {box[1]}")
    return box[0]


def require_ranks_for_sync_bn(info: DistInfo, sync_bn: bool) -> None:
    """``--sync-bn`` means something only across ranks: refuse it rather than ignore it.

    Raises:
        CissError: ``sync_bn`` outside a multi-process torchrun job.
    """
    if sync_bn and not info.enabled:
        raise CissError("--sync-bn syncs BatchNorm statistics across torchrun processes; this "
                        "run has one process (start it with torchrun --nproc_per_node=N, or "
                        "drop --sync-bn)")


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """BatchNorm statistics computed over every rank's batch (``--sync-bn``).

    Raises:
        CissError: on CPU, where torch's SyncBatchNorm does not run.
    """
    if device.type != "cuda":
        raise CissError("--sync-bn needs CUDA: torch's SyncBatchNorm runs only on GPUs "
                        "(on CPU each rank keeps its own BatchNorm statistics)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
