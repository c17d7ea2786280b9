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


def test_ort_providers_follow_the_device():
    from ciss.engines.load import ort_providers

    gpu_ort = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert ort_providers("cpu", gpu_ort) == ["CPUExecutionProvider"]
    assert ort_providers("cuda", gpu_ort)[0] == "CUDAExecutionProvider"
    # auto on this machine (no GPU visible to torch): the CPU, whatever ORT offers
    assert ort_providers("auto", gpu_ort) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("argv", [
    ["evaluate", "--data", "{data}"], ["check", "--engine", "torch"],
    ["deploy", "--engine", "torch"], ["diagnose", "--step", "2", "--out", "{out}"],
])
def test_evaluation_commands_take_a_device(argv, story, synthetic_dir, tmp_path):
    """Evaluation, the gate, deploy and diagnose run where --device says (a GPU request on a
    machine without one is refused in one line, proving the option reaches the models)."""
    from click.testing import CliRunner

    from ciss.cli import main

    args = [a.format(data=synthetic_dir, out=tmp_path / "d") for a in argv]
    res = CliRunner().invoke(main, [*args, "--store", str(story), "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA GPU is visible" in res.output, res.output
    res = CliRunner().invoke(main, [*args[:1], "--help"])
    assert "--device" in res.output
