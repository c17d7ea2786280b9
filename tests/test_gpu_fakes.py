"""GPU-only code paths checked without a GPU: fakes of the collective calls they make."""

from __future__ import annotations

import pytest
import torch

from ciss.errors import CissError
from ciss.updater import distributed as d


class Recorded(Exception):
    pass


def test_epoch_means_are_reduced_on_the_training_device(monkeypatch):
    """NCCL reduces only CUDA tensors: the epoch averages must live on the training device
    (a CPU float64 tensor made the torchrun recipe fail after its first epoch on GPUs)."""
    seen = {}

    def fake_all_reduce(t, *a, **k):
        seen["device"] = t.device
        raise Recorded

    monkeypatch.setattr(d.dist, "all_reduce", fake_all_reduce)
    info = d.DistInfo(rank=0, world_size=2)
    with pytest.raises(Recorded):
        d.mean_over_ranks(info, {"loss": 1.0}, torch.device("meta"))
    assert seen["device"] == torch.device("meta")
    with pytest.raises(Recorded):
        d.any_rank(info, True, torch.device("meta"))
    assert seen["device"] == torch.device("meta")


def test_sync_bn_without_ranks_is_refused_not_ignored(split_dir, tmp_path):
    from ciss.store import Store
    from ciss.updater.loop import LoopConfig
    from ciss.updater.train import train_base

    with pytest.raises(CissError, match="--sync-bn syncs BatchNorm statistics across torchrun"):
        train_base(Store(tmp_path / "s"), split_dir / "step-0",
                   loop=LoopConfig(iterations=1, batch_size=2, sync_bn=True), progress=False)
    assert not (tmp_path / "s" / "steps").exists() or not any((tmp_path / "s" / "steps").iterdir())
