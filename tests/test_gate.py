"""Retention gate, deploy and rollback on a real store: mib passes, ft is refused."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ciss.cli import main
from ciss.errors import CheckFailed, CissError
from ciss.runtime.deploy import deploy, rollback
from ciss.runtime.gate import run_gate
from ciss.store import Store


def test_gate_json_contract_and_ft_refused(story):
    store = Store(story)
    res = run_gate(store, 2, engine="torch")
    doc = res.to_json()
    assert set(doc) >= {"passed", "step", "against", "engine", "mean_old_drop", "reasons",
                        "classes"}
    assert doc["against"] == 0 and len(doc["classes"]) == 15
    assert set(doc["classes"][0]) >= {"name", "before", "after", "drop"}
    # ft forgets: if the base knew anything, the gate must refuse it
    if any(c.before and c.before > 0.2 for c in res.classes):
        assert not res.passed and "mean old-class IoU dropped" in res.reasons[0]


def test_gate_strict_thresholds_fail_and_loose_pass(story):
    store = Store(story)
    assert run_gate(store, 1, engine="torch", max_mean_drop=100, max_class_drop=100).passed
    strict = run_gate(store, 2, engine="torch", max_mean_drop=-1)
    assert not strict.passed


def test_gate_bad_against(story):
    with pytest.raises(CissError, match="not an ancestor of step 2"):
        run_gate(Store(story), 2, against=1, engine="torch")


def test_deploy_refuses_then_force_then_rollback(story, tmp_path):
    import shutil

    root = tmp_path / "s"
    shutil.copytree(story, root)
    store = Store(root)
    deploy(store, 0, "onnx")
    assert store.deployed()["step"] == 0 and "model.onnx" in store.card(0).artifacts
    with pytest.raises(CheckFailed, match="step 2 refused"):
        deploy(store, 2, "torch", max_mean_drop=-1)
    assert store.deployed()["step"] == 0  # unchanged
    rec = deploy(store, 2, "torch", force=True, max_mean_drop=-1).record
    assert rec["forced"] is True and rec["history"][-1]["step"] == 0
    back = rollback(store)
    assert back["step"] == 0 and back["rolled_back_from"] == 2
    with pytest.raises(CissError, match="nothing to roll back"):
        rollback(store)


def test_check_cli_exit_codes(story):
    res = CliRunner().invoke(main, ["check", "--store", str(story), "--step", "2",
                                    "--engine", "torch", "--max-mean-drop", "-1", "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert doc["passed"] is False and doc["step"] == 2
    res = CliRunner().invoke(main, ["check", "--store", str(story), "--step", "1",
                                    "--engine", "torch", "--max-mean-drop", "100",
                                    "--max-class-drop", "100"])
    assert res.exit_code == 0 and "PASS" in res.output
