"""CiSS splits: step contents, relabelling, overlap vs disjoint, strict checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ciss.data.folder import open_folder
from ciss.data.imageio import read_mask
from ciss.data.scenarios import NAMED, Scenario, parse_scenario, write_split
from ciss.errors import CissError
from tests.conftest import make_folder


def test_named_scenarios_plan():
    assert Scenario(15, 5).steps(20) == [list(range(1, 16)), list(range(16, 21))]
    assert len(parse_scenario("15-1").steps(20)) == 6
    assert parse_scenario("5-3").steps(20)[1] == [6, 7, 8]
    assert parse_scenario("100-10").steps(150)[-1] == list(range(141, 151))
    assert set(NAMED) >= {"19-1", "15-5", "15-1", "10-1", "5-3", "100-50", "100-10", "50-50"}


@pytest.mark.parametrize("text,reason", [
    ("15_5", "expected X-Y"), ("100-50", "needs more than 100 object classes"),
    ("15-3", "do not divide into steps of 3"), ("0-5", "at least 1"),
])
def test_bad_scenarios(text, reason):
    with pytest.raises(CissError, match=reason):
        parse_scenario(text).steps(20)


def test_split_relabels_and_keeps_train_val_apart(split_dir, synthetic_dir):
    src = open_folder(synthetic_dir)
    meta = json.loads((split_dir / "scenario.json").read_text())
    assert [len(s["classes"]) for s in meta["steps"]] == [15, 5]
    step1 = open_folder(split_dir / "step-1")
    assert step1.classes.names == ("background",) + src.classes.names[16:21]
    assert not set(step1.train) & set(step1.val)
    assert set(step1.train) <= set(src.train) and set(step1.val) <= set(src.val)
    for stem in step1.train:
        full = read_mask(src.masks[stem])
        local = read_mask(step1.masks[stem])
        assert (full >= 16).any()  # overlap: every kept image shows a step class
        expected = np.where(full >= 16, full - 15, 0)
        assert np.array_equal(local, expected)  # old classes became background


def test_disjoint_drops_future_classes(synthetic_dir, tmp_path):
    src = open_folder(synthetic_dir)
    steps = write_split(src, parse_scenario("15-5"), tmp_path / "d", setting="disjoint")
    step0 = open_folder(steps[0])
    for stem in step0.train:
        assert max(src.presence[stem]) <= 15


def test_split_refuses_existing_output_and_empty_step(synthetic_dir, tmp_path):
    src = open_folder(synthetic_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(CissError, match="exists and is not empty"):
        write_split(src, parse_scenario("15-5"), tmp_path / "busy")
    # class 'c' never appears: its step must be refused, and nothing left behind
    sparse = open_folder(make_folder(tmp_path / "sparse", ["background", "a", "b", "c"], n=12,
                                     values=[1, 2]))
    with pytest.raises(CissError, match="step 2: no training image shows c"):
        write_split(sparse, parse_scenario("1-1"), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x")]
