"""``ciss prune``: old steps shrink to card + retention set; nothing still needed goes."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from ciss.cli import main
from ciss.engines.load import load_engine
from ciss.errors import CissError
from ciss.runtime.deploy import deploy, rollback
from ciss.runtime.gate import run_gate
from ciss.store import Store
from ciss.store.listing import list_steps
from ciss.store.prune import plan_prune, prune


@pytest.fixture
def story_copy(story, tmp_path) -> Store:
    """The story (0 base; 1 mib and 2 ft, both from 0; all in ONNX), step 1 deployed then
    step 2 forced over it: deployed 2, history [1]. Step 1 also keeps a memory."""
    root = tmp_path / "s"
    shutil.copytree(story, root)
    store = Store(root)

    def write_memory(dest):
        (dest / "images").mkdir(parents=True)
        (dest / "images" / "a.png").write_bytes(b"\x89PNG fake")

    store.add_artifact(1, "memory", write_memory,
                       lambda c: setattr(c, "memory", {"images": 1, "max_images": 5}))
    deploy(store, 1, "onnx")
    deploy(store, 2, "onnx", force=True)
    return store


def test_the_plan_keeps_the_latest_the_deployed_the_rollbacks_and_their_parents(story_copy):
    store = story_copy
    plan = plan_prune(store, keep_last=1, keep_rollbacks=1)
    assert plan.prune == []  # 1 is the rollback target, 0 the parent of both
    assert plan.keep[1] == "a rollback target" and plan.keep[0].startswith("the parent of")
    plan = plan_prune(store, keep_last=1, keep_rollbacks=0)
    assert plan.prune == [1] and set(plan.keep) == {0, 2}
    # the score calibration goes with the engine it was measured on
    assert set(plan.artifacts[1]) == {"weights.safetensors", "model.onnx", "memory",
                                      "scores-onnx.json"}
    assert plan.bytes[1] > 0 and plan.history_dropped == 1
    with pytest.raises(CissError, match="keep at least the latest step"):
        plan_prune(store, keep_last=0)


def test_prune_strips_to_card_and_retention_and_later_gates_still_run(story_copy):
    store = story_copy
    done = prune(store, plan_prune(store, keep_last=1, keep_rollbacks=0))
    assert done.prune == [1]
    assert sorted(p.name for p in store.step_dir(1).iterdir()) == ["card.json",
                                                                    "manifest.json",
                                                                    "retention"]
    card = store.verify(1)  # every artifact the card names is there and intact
    assert set(card.artifacts) == {"retention"}
    assert set(card.extra["pruned"]["artifacts"]) == {"weights.safetensors", "model.onnx",
                                                       "memory", "scores-onnx.json"}
    assert card.memory["cleared"] is True
    with pytest.raises(CissError, match="removed by 'ciss prune'"):
        store.load_model(1)
    with pytest.raises(CissError, match="removed by 'ciss prune'"):
        load_engine(store, 1, "onnx")
    # rollback never lands on a pruned step: its history entry went first
    assert store.deployed()["step"] == 2 and store.deployed()["history"] == []
    with pytest.raises(CissError, match="nothing to roll back"):
        rollback(store)
    # the kept steps are whole: the latest still gates against its parent
    assert run_gate(store, 2, engine="onnx").mean_old_drop is not None
    store.verify(0)
    store.verify(2)
    assert [r.pruned for r in list_steps(store)] == [False, True, False]
    assert store.events()[-1]["kind"] == "pruned" and store.events()[-1]["steps"] == [1]
    assert plan_prune(store, keep_last=1, keep_rollbacks=0).prune == []  # done once


def test_a_step_deployed_after_the_plan_is_left_whole(story_copy):
    store = story_copy
    plan = plan_prune(store, keep_last=1, keep_rollbacks=0)
    assert plan.prune == [1]
    rollback(store)  # step 1 is deployed again between the plan and the prune
    done = prune(store, plan)
    assert done.prune == []
    store.load_model(1)
    assert "weights.safetensors" in store.card(1).artifacts


def test_cli_dry_run_changes_nothing_then_prunes(story_copy):
    store = story_copy
    before = sorted(p.name for p in store.step_dir(1).iterdir())
    args = ["prune", "--store", str(store.root), "--keep-last", "1", "--keep-rollbacks", "0"]
    res = CliRunner().invoke(main, [*args, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "step 1: weights.safetensors" in res.output and "dry run" in res.output
    assert "step 0: kept whole (the parent of step 2" in res.output
    assert sorted(p.name for p in store.step_dir(1).iterdir()) == before
    res = CliRunner().invoke(main, [*args, "--yes", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["done"] is True and doc["prune"] == [1] and doc["total_bytes"] > 0
    res = CliRunner().invoke(main, ["steps", "--store", str(store.root)])
    assert "pruned" in res.output
    res = CliRunner().invoke(main, ["memory", "show", "--store", str(store.root)])
    assert "step 1: cleared" in res.output
    res = CliRunner().invoke(main, ["prune", "--store", str(store.root), "--keep-last", "0"])
    assert res.exit_code != 0 and "--keep-last" in res.output


def test_a_prune_interrupted_after_the_card_finishes_on_the_next_run(story_copy):
    store = story_copy
    plan = plan_prune(store, keep_last=1, keep_rollbacks=0)
    onnx = store.step_dir(1) / "model.onnx"
    kept = onnx.read_bytes()
    prune(store, plan)
    onnx.write_bytes(kept)  # as if the process died after the card, before this unlink
    again = plan_prune(store, keep_last=1, keep_rollbacks=0)
    assert again.prune == [1] and again.artifacts[1] == ["model.onnx"]
    prune(store, again)
    assert not onnx.exists()
    assert set(store.card(1).extra["pruned"]["artifacts"]) >= {"weights.safetensors",
                                                                "model.onnx"}


def test_a_step_a_running_job_leases_is_never_pruned(story_copy):
    store = story_copy
    plan = plan_prune(store, keep_last=1, keep_rollbacks=0)
    assert plan.prune == [1]
    with store.lease(store.work_dir / "add-x", steps=[1]):
        assert "running job" in plan_prune(store, keep_last=1, keep_rollbacks=0).keep[1]
        assert prune(store, plan).prune == []  # planned before the job started: still spared
    store.verify(1)
    assert prune(store, plan).prune == [1]  # the job is gone


def test_deploy_rechecks_the_step_under_the_lock_before_the_pointer_moves(story_copy,
                                                                          monkeypatch):
    """Defect 3: a prune (or any removal) between the gate and the pointer used to leave the
    pointer on a step whose files were gone."""
    import ciss.runtime.deploy as deploy_mod

    store = story_copy
    real = deploy_mod.failpoint

    def prune_meanwhile(name, path=None):
        if name == "deploy.gated":
            (store.step_dir(0) / "model.onnx").unlink()
        real(name, path)

    monkeypatch.setattr(deploy_mod, "failpoint", prune_meanwhile)
    before = store.deployed()
    with pytest.raises(CissError, match="model.onnx: missing"):
        deploy(store, 0, "onnx")
    assert store.deployed() == before
