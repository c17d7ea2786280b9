"""Retention gate, learning check, deploy and rollback on a store whose base really learned:
at default thresholds mib passes, ft is refused, and a step with an unlearnable class too."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from ciss.analysis.tolerances import GateThresholds
from ciss.cli import main
from ciss.errors import CheckFailed, CissError
from ciss.runtime.deploy import deploy, rollback
from ciss.runtime.gate import run_gate
from ciss.store import Store
from tests.conftest import STEP_ITERATIONS, write_colour_world


def test_the_base_learned_what_the_gate_protects(story):
    per = Store(story).card(0).retention["0"]["torch"]
    objects = [v for k, v in per.items() if k != "background"]
    assert min(objects) > 0.3, per  # otherwise every test below compares ~0 with ~0


def test_defaults_pass_mib_and_refuse_ft(story):
    store = Store(story)
    mib = run_gate(store, 1, engine="torch")
    assert mib.passed, mib.reasons
    assert mib.mean_old_drop < 5
    ft = run_gate(store, 2, engine="torch")
    assert not ft.passed
    assert "mean old-class IoU dropped" in ft.reasons[0] and ft.mean_old_drop > 30
    doc = ft.to_json()
    assert set(doc) >= {"passed", "step", "against", "engine", "mean_old_drop", "reasons",
                        "classes"}
    assert doc["against"] == 0
    old = [c for c in doc["classes"] if c["before"] is not None]
    new = [c for c in doc["classes"] if c["before"] is None]
    assert len(old) == 15 and len(new) == 5  # new classes: the learning check's entries
    assert set(old[0]) >= {"name", "before", "after", "drop"}


def test_thresholds_are_compared_with_the_measured_drops(story):
    store = Store(story)
    mib = run_gate(store, 1, engine="torch")
    worst = max(c.drop for c in mib.classes if c.drop is not None)
    assert not run_gate(store, 1, engine="torch",
                        thresholds=GateThresholds(max_class_drop=worst - 0.01)).passed
    assert run_gate(store, 1, engine="torch",
                    thresholds=GateThresholds(max_class_drop=worst + 0.01)).passed
    assert not run_gate(store, 1, engine="torch",
                        thresholds=GateThresholds(max_mean_drop=mib.mean_old_drop - 0.01)).passed


def test_gate_bad_against(story):
    with pytest.raises(CissError, match="not an ancestor of step 2"):
        run_gate(Store(story), 2, against=1, engine="torch")


def test_deploy_refuses_ft_then_force_then_rollback(story, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(story, root)
    store = Store(root)
    deploy(store, 0, "onnx")
    assert store.deployed()["step"] == 0 and "model.onnx" in store.card(0).artifacts
    with pytest.raises(CheckFailed, match="step 2 refused: mean old-class IoU dropped"):
        deploy(store, 2, "torch")
    assert store.deployed()["step"] == 0  # unchanged
    rec = deploy(store, 2, "torch", force=True).record
    assert rec["forced"] is True and rec["history"][-1]["step"] == 0
    back = rollback(store)
    assert back["step"] == 0 and back["rolled_back_from"] == 2
    with pytest.raises(CissError, match="nothing to roll back"):
        rollback(store)


def test_check_cli_exit_codes_at_defaults(story):
    res = CliRunner().invoke(main, ["check", "--store", str(story), "--step", "2",
                                    "--engine", "torch", "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert doc["passed"] is False and doc["step"] == 2
    res = CliRunner().invoke(main, ["check", "--store", str(story), "--step", "1",
                                    "--engine", "torch"])
    assert res.exit_code == 0 and "PASS" in res.output


def test_an_unlearnable_new_class_is_warned_about_and_refused(story, tmp_path):
    from ciss.updater.add_classes import UpdateConfig, add_classes
    from ciss.updater.loop import LoopConfig

    root = tmp_path / "s"
    shutil.copytree(story, root)
    new = write_colour_world(tmp_path / "new", ["dots-disc"], n_train=48, n_val=16,
                             ghost="ghost", first_colour=15, seed=5)
    rep = add_classes(Store(root), new, update=UpdateConfig(parent=0), progress=False,
                      loop=LoopConfig(iterations=STEP_ITERATIONS, batch_size=8, lr=1e-2))
    assert [w.name for w in rep.warnings] == ["ghost"]  # dots-disc was learned
    assert "warning: class 'ghost' was not learned" in rep.warnings[0].line()
    assert rep.card.extra["learning"]["warnings"][0]["name"] == "ghost"
    res = CliRunner().invoke(main, ["check", "--store", str(root), "--step", str(rep.step),
                                    "--engine", "torch", "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert any("new class ghost was not learned" in r for r in doc["reasons"])
    assert not any("dots-disc" in r for r in doc["reasons"])
    ghost = next(c for c in doc["classes"] if c["name"] == "ghost")
    assert ghost["before"] is None and ghost["after"] < 0.05
    with pytest.raises(CheckFailed, match="ghost was not learned"):
        deploy(Store(root), rep.step, "torch")


def test_rollback_keeps_the_forced_flag_of_the_deployment_it_restores(story, tmp_path):
    root = tmp_path / "s"
    shutil.copytree(story, root)
    store = Store(root)
    deploy(store, 2, "torch", force=True)  # ft, forced past the gate
    deploy(store, 1, "torch")  # mib passes
    back = rollback(store)
    assert back["step"] == 2 and back["forced"] is True
    assert back["gate"]["passed"] is False


def test_the_gate_measures_the_serving_resize_and_reuses_the_parents_scores(story,
                                                                              monkeypatch):
    from ciss.runtime import gate as gate_mod

    store = Store(story)
    native = run_gate(store, 1, engine="torch")
    calls = []
    real = gate_mod.score_retention
    monkeypatch.setattr(gate_mod, "score_retention",
                        lambda s, step, *a: calls.append(step) or real(s, step, *a))
    shrunk = run_gate(store, 1, engine="torch", max_side=8)  # 32 px images served at 8 px
    after = {c.name: c.after for c in shrunk.classes}
    assert any(after[c.name] < c.after - 0.05 for c in native.classes if c.after)
    # the parent's stored scores hold only for images the serving resize leaves alone
    assert calls == [1, 0]
    calls.clear()
    run_gate(store, 1, engine="torch")
    assert calls == [1]  # parent scores reused from its card (images <= 1024 px)


def test_scoring_batches_by_pixels(synthetic_dir):
    from ciss.analysis.scoring import batches
    from ciss.data.folder import open_folder

    folder = open_folder(synthetic_dir)
    stems = folder.val[:6]
    sizes = [len(b[0]) for b in batches(folder, stems, 16, max_pixels=2 * 32 * 32)]
    assert sizes == [2, 2, 2]
    assert [len(b[0]) for b in batches(folder, stems, 16)] == [6]


def test_big_images_are_compared_at_the_serving_size():
    import numpy as np

    from ciss.analysis.scoring import at_most

    images = np.zeros((2, 3, 3000, 4000), np.uint8)
    masks = np.zeros((2, 3000, 4000), np.uint8)
    masks[:, :1500] = 1
    small, smask = at_most(images, masks, 1024)
    assert small.shape == (2, 3, 768, 1024) and smask.shape == (2, 768, 1024)
    assert set(np.unique(smask)) == {0, 1}  # nearest: no invented class ids
    same, _ = at_most(images[:, :, :100, :100], masks[:, :100, :100], 1024)
    assert same.shape == (2, 3, 100, 100)
