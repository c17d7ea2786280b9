"""The training loop's budget, validation-based weight keeping and log-friendly progress."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from ciss.progress import LineProgress, progress_bar
from ciss.updater.loop import LoopConfig, eval_points, fit


class Toy(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.full((1,), float(i)), torch.tensor(0)


def toy_fit(cfg: LoopConfig, validate=None):
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    seen = []

    def step(x, y):
        seen.append(len(x))
        return {"loss": (model(x) ** 2).mean()}

    result = fit(model, step, Toy(), cfg, progress=False, validate=validate)
    return model, result, seen


def test_budget_is_iterations_whatever_the_folder_size():
    # 10 samples, batch 4 -> 2 steps per pass; 7 iterations = 3 full passes + 1 step
    _, result, seen = toy_fit(LoopConfig(iterations=7, batch_size=4, evals=0))
    assert result.iterations == 7 and len(seen) == 7
    assert len(result.history) == 4
    # --epochs still means passes
    _, result, _ = toy_fit(LoopConfig(epochs=3, iterations=999, batch_size=4, evals=0))
    assert result.iterations == 6


def test_step_budget_is_capped_in_passes_with_a_floor():
    from ciss.updater.defaults import step_defaults

    cfg = LoopConfig(iterations=630, max_epochs=20, min_iterations=315)
    # a large folder keeps the ceiling, a small one stops at 20 passes, a tiny one at the floor
    assert [cfg.total_iterations(n) for n in (63, 20, 15, 3)] == [630, 400, 315, 315]
    d = step_defaults("mib")
    assert (d.loop().max_epochs, d.loop().min_iterations) == (d.recipe.max_epochs,
                                                              d.recipe.min_iterations)
    # a budget the user gives is taken as it is
    assert d.loop(iterations=50).total_iterations(3) == 50
    assert d.loop(epochs=2).total_iterations(3) == 6
    # the loop runs the capped budget: 10 samples, batch 4 -> 2 steps per pass
    _, result, _ = toy_fit(LoopConfig(iterations=100, max_epochs=3, min_iterations=4,
                                      batch_size=4, evals=0))
    assert result.iterations == 6


def test_the_budget_is_global_under_torchrun():
    cfg = LoopConfig(iterations=630, max_epochs=20, min_iterations=315)
    # 4 ranks share the 630 steps of one process's batch; passes are over the whole folder
    # (each rank's shard), so a small folder stops at 20 passes on each rank alike
    assert cfg.total_iterations(100, world_size=4) == 158
    assert cfg.total_iterations(5, world_size=4) == 100
    assert cfg.total_iterations(2, world_size=4) == 79  # the floor, shared too
    assert LoopConfig(epochs=3).total_iterations(7, world_size=8) == 21


def test_the_encoder_trains_at_its_fraction_of_the_rate():
    from ciss.models import build_model, freeze
    from ciss.updater.loop import make_optimizer

    model = build_model("tiny", num_classes=3)
    freeze(model, "stage1")
    opt = make_optimizer(model, LoopConfig(lr=1e-2, encoder_lr=0.1, optimizer="sgd"))
    by_lr = {round(g["lr"], 9): {id(p) for p in g["params"]} for g in opt.param_groups}
    head = {id(p) for n in ("head", "classifier") for p in model.stages[n].parameters()}
    enc = {id(p) for n in ("stage2", "stage3", "stage4") for p in model.stages[n].parameters()}
    assert by_lr == {1e-2: head, 1e-3: enc}
    assert not {id(p) for p in model.stages["stem"].parameters()} & set().union(*by_lr.values())
    assert len(make_optimizer(model, LoopConfig(lr=1e-2)).param_groups) == 1


@pytest.mark.parametrize("capability,dtype", [((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                                              ((9, 0), torch.bfloat16), ((6, 1), torch.float16)])
def test_mixed_precision_follows_the_compute_capability(monkeypatch, capability, dtype):
    from ciss.updater.loop import autocast_dtype

    # T4 (7.5) and V100 (7.0) report bf16 as "supported" (emulated); cuDNN has no bf16 convs
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert autocast_dtype(torch.device("cuda")) == dtype
    assert autocast_dtype(torch.device("cpu")) is None


def test_eval_points_cover_the_second_half_and_the_end():
    assert eval_points(total=100, per_epoch=10, evals=4) == {6, 7, 8, 9}  # 62.5, 75, 87.5, 100 %
    assert eval_points(total=100, per_epoch=10, evals=1) == {9}
    assert eval_points(total=100, per_epoch=10, evals=0) == set()


def test_the_best_validated_weights_are_kept():
    scores = iter([0.9, 0.5, 0.1, 0.0])
    snapshots = []

    def validate():
        snapshots.append(model_ref[0].weight.detach().clone())
        return {"score": next(scores)}

    model_ref = []
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    model_ref.append(model)

    def step(x, y):
        return {"loss": ((model(x) - 5) ** 2).mean()}

    result = fit(model, step, Toy(), LoopConfig(iterations=40, batch_size=2, lr=0.05, evals=4),
                 progress=False, validate=validate)
    assert [v["score"] for v in result.validation] == [0.9, 0.5, 0.1, 0.0]
    assert result.best["score"] == 0.9
    assert torch.equal(model.weight.detach(), snapshots[0])  # not the last weights
    assert not torch.equal(snapshots[0], snapshots[-1])


def test_progress_is_one_line_per_stage_off_a_terminal(capsys):
    out = io.StringIO()
    bar = LineProgress(total=5, desc="base 1/3", stream=out)
    for _ in range(5):
        bar.update(1)
    bar.set_postfix(loss="0.123")
    bar.close()
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.count("\n") == 1
    assert text.startswith("base 1/3: 5/5 iterations") and "loss 0.123" in text
    from tqdm import tqdm

    # pytest's captured stderr is not a terminal: the loop gets a LineProgress
    assert isinstance(progress_bar(tqdm, total=3, desc="x"), LineProgress)


def test_augmentation_follows_the_epoch_in_persistent_workers(split_dir):
    """Workers keep their own dataset copy: the epoch must reach them with each index."""
    from torch.utils.data import DataLoader

    from ciss.data.dataset import SegmentationDataset, label_lut
    from ciss.data.folder import open_folder
    from ciss.data.transforms import TrainTransform
    from ciss.updater.distributed import DistInfo
    from ciss.updater.loop import EpochSampler

    folder = open_folder(split_dir / "step-0")
    ds = SegmentationDataset(folder, folder.train[:4], label_lut(folder.classes, folder.classes),
                             TrainTransform(24, scale=(0.5, 2.0)), seed=0)
    sampler = EpochSampler(ds, LoopConfig(batch_size=4), DistInfo())
    loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=1,
                        persistent_workers=True)
    seen = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen.append(next(iter(loader))[0])
    expected = [torch.stack([ds[(e, i)][0] for e, i in (sampler.set_epoch(n) or sampler)])
                for n in range(2)]
    assert torch.equal(seen[0], expected[0]) and torch.equal(seen[1], expected[1])
    assert not torch.equal(seen[0], seen[1])


def test_a_gpu_gets_loader_workers_even_for_a_folder_held_in_memory():
    from types import SimpleNamespace

    from ciss.updater.train import loader_workers

    held = SimpleNamespace(cached=True)
    assert loader_workers(held, None, torch.device("cpu")) == 0  # copies only, on 2 cores
    assert loader_workers(held, None, torch.device("cuda")) >= 1
    assert loader_workers(held, 3, torch.device("cuda")) == 3  # the user's number stands
