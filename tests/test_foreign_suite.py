"""The foreign-data suite (benchmarks/foreign_suite.py) in miniature: each dataset has the
character it claims, is a valid folder, and the whole chain runs on one of them."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage", reason="the suite is built from scikit-image's photographs "
                                      "(dev extra)")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import foreign_suite as fs  # noqa: E402
from ciss.data.folder import open_folder  # noqa: E402


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("foreign")
    for spec in fs.SUITE.values():
        fs.write_dataset(spec, out, scale=0.06)
    return out


def pixel_shares(folder):
    counts = folder.class_pixels(folder.train + folder.val).astype(float)
    return counts / counts.sum()


def test_every_dataset_is_a_valid_folder_with_its_classes(suite):
    for name, spec in fs.SUITE.items():
        folder = open_folder(suite / name)
        assert len(folder.classes) == spec.n_classes + 1, name
        assert folder.train and folder.val and not set(folder.train) & set(folder.val)


def test_the_suite_covers_what_the_issue_lists(suite):
    assert fs.SUITE["many"].n_classes >= 30
    assert fs.SUITE["few"].n_train <= 100
    small = open_folder(suite / "small")
    assert pixel_shares(small)[1:].max() <= 0.03  # small objects
    grey = open_folder(suite / "sizes-grey")
    modes = {Image.open(p).mode for p in grey.images.values()}
    assert modes == {"L"}
    sides = [max(s) for s in grey.shapes.values()] + [min(s) for s in grey.shapes.values()]
    assert min(sides) < 100 and max(sides) > 300  # mixed sizes...
    ratios = [w / h for h, w in grey.shapes.values()]
    assert min(ratios) < 0.8 and max(ratios) > 1.25  # ...and aspect ratios
    # 1:50 imbalance: the sampling weights span the ratio, the data follows
    w = fs.class_weights(fs.SUITE["imbalance"])
    assert w.max() / w.min() == pytest.approx(50.0)


def test_lookalikes_are_unlabelled_background():
    spec = replace(fs.SUITE["small"], objects=(0, 0), lookalikes=(2, 2))
    image, mask = fs.make_image(spec, 3)
    assert (mask == 0).all()  # the look-alikes show, but are background
    plain = replace(spec, lookalikes=(0, 0))
    assert not np.array_equal(image, fs.make_image(plain, 3)[0])


def test_images_are_deterministic_per_seed():
    a, b = fs.make_image(fs.SUITE["few"], 7), fs.make_image(fs.SUITE["few"], 7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_train_then_add_classes_on_an_overlap_split_warns_when_nothing_is_learned(tmp_path):
    from ciss.analysis.evaluate import evaluate_step
    from ciss.data.scenarios import parse_scenario, write_split
    from ciss.store import Store
    from ciss.updater.add_classes import add_classes
    from ciss.updater.loop import LoopConfig
    from ciss.updater.train import train_base

    spec = fs.SUITE["few"]
    root = fs.write_dataset(spec, tmp_path, scale=0.5)  # 40 train images: every class shows
    steps = write_split(open_folder(root), parse_scenario(fs.scenario_for(spec)),
                        tmp_path / "split")
    store = Store(tmp_path / "store")
    # two iterations learn nothing: every class must be named, none silently at IoU 0
    rep = train_base(store, steps[0], loop=LoopConfig(iterations=2, batch_size=2, evals=1),
                     progress=False)
    assert {w.name for w in rep.warnings} == set(rep.card.classes[1:])
    rep = add_classes(store, steps[1], loop=LoopConfig(iterations=2, batch_size=2),
                      progress=False)
    assert {w.name for w in rep.warnings} == set(rep.card.new_classes)
    doc = evaluate_step(store, root).to_json()
    assert doc["new_miou"] is not None and doc["old_miou"] is not None
