"""add-classes: steps written with their cards, shared trunk == separate teacher, bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from ciss.data.imageio import write_mask
from ciss.errors import CheckFailed, CissError
from ciss.models import build_model, freeze, grow_classifier
from ciss.store import Store
from ciss.updater import losses
from ciss.updater.add_classes import UpdateConfig, add_classes
from ciss.updater.loop import LoopConfig, fit
from ciss.updater.methods import IncrementalStep, MethodConfig, TrunkCache

FAST = LoopConfig(epochs=1, batch_size=4)


def test_add_classes_writes_step_with_card(store_copy, split_dir):
    store = Store(store_copy)
    rep = add_classes(store, split_dir / "step-1", loop=FAST, progress=False)
    card = rep.card
    assert rep.step == 1 and card.parent == 0 and card.method == "mib"
    assert card.classes[:16] == store.card(0).classes
    assert card.new_classes == card.classes[16:] and len(card.new_classes) == 5
    assert card.frozen == ["stem"]  # tiny's default (BENCHMARKS.md §2: plasticity needs stage1+)
    assert set(card.retention) == {"0", "1"}
    # partial-label rule: the step-1 set scores only its own classes (and background)
    scored = {k for k, v in card.retention["1"]["torch"].items() if v is not None}
    assert scored == {"background", *card.new_classes}
    assert card.extra["trunk_cache"]["hits"] == 0  # one epoch: every batch was a first sight
    assert {"weights.safetensors", "retention"} <= set(card.artifacts)
    store.verify(1)
    # the merged configuration, whole, one object per part, with the recipe it started from
    cfg = card.config
    assert cfg["loop"]["epochs"] == 1 and cfg["method"]["method"] == "mib"
    assert cfg["update"]["freeze"] == "stem" and cfg["update"]["init"] == "random"
    assert cfg["recipe"]["family"] == "tiny" and cfg["recipe"]["kind"] == "step"
    assert "BENCHMARKS" in cfg["recipe"]["source"]


@pytest.mark.parametrize("method", ["mib", "lwf", "ilt", "ft"])
def test_shared_trunk_equals_separate_teacher(method):
    torch.manual_seed(0)
    teacher = build_model("tiny", num_classes=4).eval()
    student = copy.deepcopy(teacher)
    grow_classifier(student, 2, init="background")
    freeze(student, "stage2")
    student.train()
    cfg = MethodConfig(method=method, kd_weight=10.0)
    step = IncrementalStep(student, teacher, 4, cfg)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 6, (2, 32, 32))
    got = step(x, y)["loss"]
    s, t = student(x), teacher(x).detach()
    if method == "mib":
        want = losses.unbiased_cross_entropy(s, y, 4) + 10 * losses.unbiased_distillation(s, t)
    elif method == "ft":
        want = losses.cross_entropy(s, y)
    else:
        want = losses.cross_entropy(s, y) + 10 * losses.distillation(s, t)
        if method == "ilt":
            sf = student.run(student.begin(x), student.stage_names[:5])["features"]
            tf = teacher.run(teacher.begin(x), teacher.stage_names[:5])["features"]
            want = want + 100 * losses.feature_distillation(sf, tf)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("stage", ["stage4", "none"])
def test_cache_gives_identical_losses(stage):
    """The trunk's states (frozen stages) and the parent's logits (any freeze) are cached per
    exact input; a cached batch gives the same losses as one computed afresh."""
    torch.manual_seed(0)
    teacher = build_model("tiny", num_classes=3).eval()
    student = copy.deepcopy(teacher)
    grow_classifier(student, 1)
    freeze(student, stage)
    student.eval()  # no BN updates in the tail, so two calls are comparable
    cache = TrunkCache(1 << 30)
    cached = IncrementalStep(student, teacher, 3, MethodConfig(), cache)
    plain = IncrementalStep(student, teacher, 3, MethodConfig())
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 4, (3, 32, 32))
    keys = torch.tensor([4, 7, 10])
    first = cached(x, y, keys)["loss"]
    kinds = 2 if stage != "none" else 1  # trunk + teacher, or the teacher alone
    assert cache.hits == 0 and cache.misses == 3 * kinds
    assert {k for k, _ in cache.items} == ({"trunk", "teacher"} if kinds == 2 else {"teacher"})
    second = cached(x[[1, 0, 2]], y[[1, 0, 2]], keys[[1, 0, 2]])["loss"]
    assert cache.hits == 3 * kinds
    assert torch.allclose(first, second, atol=1e-6)
    assert torch.allclose(first, plain(x, y)["loss"], atol=1e-6)
    # a new input next to cached ones: only it is computed, the batch still matches
    x2 = torch.cat([x[:1], torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)])
    y2 = torch.cat([y[:1], y[1:2]])
    mixed = cached(x2, y2, torch.tensor([4, 99]))["loss"]
    assert torch.allclose(mixed, plain(x2, y2)["loss"], atol=1e-6)


def test_no_new_class_and_bad_stage(store_copy, split_dir, tmp_path):
    store = Store(store_copy)
    with pytest.raises(CissError, match="classes.txt: no new class"):
        add_classes(store, split_dir / "step-0", loop=FAST, progress=False)
    with pytest.raises(CissError, match="--freeze stage7: unknown stage"):
        add_classes(store, split_dir / "step-1", update=UpdateConfig(freeze="stage7"),
                    loop=FAST, progress=False)
    with pytest.raises(CissError, match="step 3 is not in"):
        add_classes(store, split_dir / "step-1", update=UpdateConfig(parent=3), loop=FAST,
                    progress=False)
    assert store.steps() == [0]


def test_corrupt_parent_refused(store_copy, split_dir):
    store = Store(store_copy)
    w = store.step_dir(0) / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(CissError, match="checksum mismatch"):
        add_classes(store, split_dir / "step-1", loop=FAST, progress=False)
    assert store.steps() == [0]


def test_nan_loss_is_a_failed_check():
    model = build_model("tiny", num_classes=2)
    data = [(torch.zeros(3, 32, 32, dtype=torch.uint8), torch.zeros(32, 32, dtype=torch.long))
            ] * 4

    def nan_step(x, y):
        return {"loss": model(x).sum() * float("nan")}

    with pytest.raises(CheckFailed, match="loss became nan"):
        fit(model, nan_step, data, LoopConfig(epochs=1, batch_size=2), progress=False)


def test_full_label_val_folder_is_scored(store_copy, split_dir, synthetic_dir):
    rep = add_classes(Store(store_copy), split_dir / "step-1", loop=FAST, progress=False,
                      val_dir=synthetic_dir)
    from ciss.data.folder import open_folder

    scores = rep.card.extra["val"]["per_class"]
    src = open_folder(synthetic_dir)
    present = {src.classes.names[c] for s in src.val for c in src.presence[s]}
    assert len(scores) == 21
    assert {k for k, v in scores.items() if v is not None} == present  # None = no ground truth


def test_users_own_folder_just_works(store_copy, tmp_path):
    """JPEGs of varying sizes, palette masks with 255 borders, another class order."""
    root = tmp_path / "mine"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    # a known class (solid-disc) listed after the new one: it keeps its id in the model
    (root / "classes.txt").write_text("background\nzebra\nsolid-disc\n")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(40, 30), (33, 47), (50, 50), (29, 31)] * 3):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            root / "images" / f"im{i}.jpg", quality=90)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 4: w // 2] = 1
        mask[h // 2:, w // 2:] = 2
        mask[0, :] = 255
        write_mask(root / "masks" / f"im{i}.png", mask)
    (root / "train.txt").write_text("".join(f"im{i}\n" for i in range(9)))
    (root / "val.txt").write_text("im9\nim10\nim11\n")
    store = Store(store_copy)
    rep = add_classes(store, root, method=MethodConfig(method="mib"),
                      loop=LoopConfig(epochs=1, batch_size=2), progress=False)
    card = rep.card
    assert card.new_classes == ["zebra"] and card.classes[-1] == "zebra"
    assert card.classes.index("solid-disc") == 1
    assert card.retention[str(rep.step)]["torch"]["solid-disc"] is not None
    assert card.extra["trunk_cache"] is None  # varying sizes: random crops, no caching
