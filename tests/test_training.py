"""Base training, evaluation and resume after interruption."""

from __future__ import annotations

import pytest
import torch

from ciss.analysis.evaluate import evaluate_step
from ciss.errors import CissError
from ciss.store import Store
from ciss.updater.loop import LoopConfig
from ciss.updater.train import train_base


class Interrupt(Exception):
    pass


def test_resume_matches_uninterrupted_run(split_dir, tmp_path):
    loop = LoopConfig(epochs=2, batch_size=8, seed=3, checkpoint_every_s=0)
    a = Store(tmp_path / "a")
    train_base(a, split_dir / "step-0", loop=loop, progress=False)

    b = Store(tmp_path / "b")

    def stop(epoch):
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_base(b, split_dir / "step-0", loop=loop, progress=False, after_epoch=stop)
    assert b.steps() == []  # nothing written by the interrupted run
    report = train_base(b, split_dir / "step-0", loop=loop, progress=False)
    assert report.fit.resumed_from == 1
    wa, _ = a.load_model(0)
    wb, _ = b.load_model(0)
    for (name, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(x, y), name
    assert not any((b.work_dir).iterdir())  # checkpoint removed after the step landed


def test_checkpoints_go_by_elapsed_time_not_by_epoch(split_dir, tmp_path):
    """A quick epoch writes no checkpoint when the interval has not passed."""
    store = Store(tmp_path / "s")
    loop = LoopConfig(epochs=2, batch_size=8, seed=3, checkpoint_every_s=3600)
    seen = []

    def look(epoch):
        seen.append(sorted(p.name for p in store.work_dir.glob("train-*/*")))

    report = train_base(store, split_dir / "step-0", loop=loop, progress=False, after_epoch=look)
    assert seen == [[], []] and report.fit.iterations > 0
    assert report.fit.data_wait_s > 0  # the time spent waiting for batches is measured


def test_evaluate_maps_classes_by_name(base_store, synthetic_dir):
    ev = evaluate_step(Store(base_store), synthetic_dir)
    doc = ev.to_json()
    assert set(doc) >= {"step", "engine", "miou", "old_miou", "new_miou", "per_class_iou"}
    assert doc["old_miou"] is None  # step 0 has no parent
    assert len(doc["per_class_iou"]) == 16
    assert doc["unknown_classes"] == ["dots-disc", "dots-square", "dots-triangle", "dots-ring",
                                      "dots-cross"]
    assert 0.0 <= doc["miou"] <= 1.0
    assert ev.images == 48  # the folder's val split


def test_train_refuses_second_base_and_bad_data(store_copy, split_dir, tmp_path):
    with pytest.raises(CissError, match="already has steps"):
        train_base(Store(store_copy), split_dir / "step-0", loop=LoopConfig(epochs=1))
    with pytest.raises(CissError, match="no such dataset folder"):
        train_base(Store(tmp_path / "s"), tmp_path / "missing")
    assert not (tmp_path / "s").exists()
