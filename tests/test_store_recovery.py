"""The store's integrity record, leases and recovery rules (issue #29, defects 1-4, 7).

Each recovery test stops a write at a named failpoint with an injected error (in-process: the
writer's clean-up never runs past a failpoint, so this leaves what a kill would), then runs
what comes next. tests/test_failpoints.py kills real CLI processes at the same points.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ciss import failpoints
from ciss.errors import CissError, DiskFull
from ciss.store import StepCard, Store


@pytest.fixture
def fail_at():
    """``fail_at("name")``: the next pass through that failpoint raises EIO."""
    yield lambda spec: failpoints.configure(spec if ":" in spec else f"{spec}:error")
    failpoints.configure("")


def _card() -> StepCard:
    return StepCard(step=0, parent=None, classes=["background", "a"], new_classes=["a"],
                    arch="tiny", frozen=[], method="base", hparams={}, data={})


@pytest.fixture
def tiny(tmp_path) -> Store:
    from ciss.models import build_model

    store = Store(tmp_path / "s")
    store.write_step(_card(), build_model("tiny", num_classes=2),
                     {"memory": lambda p: (p.mkdir(), (p / "x.png").write_bytes(b"img"))})
    return store


def _edit(store: Store, step: int, old: str, new: str) -> None:
    path = store.step_dir(step) / "card.json"
    path.write_text(path.read_text().replace(old, new))


# -- defect 4: card.json is checked like the weights ----------------------------------------
def test_an_edited_card_is_refused_in_one_line_until_accepted(tiny):
    _edit(tiny, 0, '"method": "base"', '"method": "mib"')
    with pytest.raises(CissError) as err:
        tiny.card(0)
    assert "card.json: edited since ciss wrote it" in str(err.value)
    assert "ciss store accept 0" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CissError, match="edited"):
        tiny.load_model(0)
    assert tiny.accept(0).status == "edited"
    assert tiny.card(0).method == "mib"
    assert tiny.events()[-1]["kind"] == "accepted"


def test_a_legacy_step_without_manifest_is_read_with_a_note_and_adopted(tiny, capsys):
    (tiny.step_dir(0) / "manifest.json").unlink()
    assert tiny.card(0).step == 0
    assert "note:" in capsys.readouterr().err
    assert tiny.card_state(0).status == "legacy"
    tiny.accept(0)
    assert tiny.card_state(0).status == "ok"


def test_signed_cards_refuse_an_edit_made_with_its_manifest(tiny, monkeypatch):
    monkeypatch.setenv("CISS_STORE_KEY", "k1")
    with pytest.raises(CissError, match="not signed"):
        tiny.require_signed(0)
    tiny.accept(0)  # sign it
    tiny.require_signed(0)
    # an edit that also fixes the manifest's sha256 (but cannot forge the HMAC)
    _edit(tiny, 0, '"method": "base"', '"method": "mib"')
    import hashlib

    man = json.loads((tiny.step_dir(0) / "manifest.json").read_text())
    man["card_sha256"] = hashlib.sha256((tiny.step_dir(0) / "card.json").read_bytes()
                                        ).hexdigest()
    (tiny.step_dir(0) / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CissError, match="signature does not match"):
        tiny.card(0)
    monkeypatch.setenv("CISS_STORE_KEY", "other")
    with pytest.raises(CissError, match="signature"):
        tiny.require_signed(0)


@pytest.mark.parametrize("point", ["store.card.intent", "store.card.replaced"])
def test_a_card_rewrite_killed_midway_leaves_a_matching_pair(tiny, fail_at, point):
    fail_at(point)
    with pytest.raises(OSError):
        tiny.update_card(0, lambda c: c.extra.update(note="new"))
    failpoints.configure("")
    card = tiny.card(0)  # either card is one ciss wrote: accepted
    assert card.extra.get("note") == ("new" if point == "store.card.replaced" else None)
    with tiny.lock():  # the next writer folds the interrupted rewrite in
        pass
    assert "next" not in json.loads((tiny.step_dir(0) / "manifest.json").read_text())
    assert tiny.card_state(0).status == "ok"


# -- defect 2: memory clear is a pending record the next command finishes -------------------
def test_an_interrupted_memory_clear_is_finished_by_the_next_command(tiny):
    from ciss.store import pending
    from ciss.updater.memory import clear_memory

    # what a kill after the card forgot leaves (a real kill: tests/test_failpoints.py): the
    # pending record, a card without the memory, and the images still on disk
    with tiny.lock():
        pending.record(tiny, {"step": 0, "remove": ["memory"], "why": "ciss memory clear"})
        card = tiny.card(0)
        card.artifacts.pop("memory")
        tiny.write_card(0, card)
    assert (tiny.step_dir(0) / "memory").exists() and tiny.pending()
    assert clear_memory(tiny, 0) is False  # nothing left to clear, and the images are gone
    assert not (tiny.step_dir(0) / "memory").exists() and not tiny.pending()


def test_a_memory_clear_on_a_full_disk_leaves_the_step_as_it_was(tiny, fail_at):
    from ciss.updater.memory import clear_memory

    fail_at("store.card.intent:enospc")
    with pytest.raises(OSError, match="No space left"):  # the CLI's one line: test above
        clear_memory(tiny, 0)
    failpoints.configure("")
    assert tiny.verify(0).artifacts["memory"] and not tiny.pending()
    assert tiny.card_state(0).status == "ok"


def test_a_memory_clear_killed_before_the_card_loses_nothing(tiny, fail_at):
    from ciss.updater.memory import clear_memory

    fail_at("memory.clear.pending")
    with pytest.raises(OSError):
        clear_memory(tiny, 0)
    failpoints.configure("")
    tiny.verify(0)  # the card still names the memory, and it is all there
    assert clear_memory(tiny, 0) is True
    assert not (tiny.step_dir(0) / "memory").exists()


# -- defect 1: a checkpoint swap killed before .old is removed -------------------------------
def _ckpt_parts():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, 1)


@pytest.mark.parametrize("point", ["checkpoint.old_aside", "checkpoint.before_old_removed",
                                   "checkpoint.tmp_written"])
def test_a_killed_checkpoint_swap_never_blocks_the_rerun(tmp_path, fail_at, point):
    from ciss.updater.checkpoint import load_checkpoint, save_checkpoint

    model, opt, sched = _ckpt_parts()
    folder = tmp_path / ".work" / "add-k"
    save_checkpoint(folder, key="k", epoch=0, model=model, optimizer=opt, scheduler=sched)
    fail_at(point)
    with pytest.raises(OSError):
        save_checkpoint(folder, key="k", epoch=1, model=model, optimizer=opt, scheduler=sched)
    failpoints.configure("")
    meta = load_checkpoint(folder, key="k", model=model, optimizer=opt, scheduler=sched)
    assert meta["epoch"] == (1 if point == "checkpoint.before_old_removed" else 0)
    save_checkpoint(folder, key="k", epoch=2, model=model, optimizer=opt, scheduler=sched)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["add-k"]


def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, fail_at):
    from ciss.updater.checkpoint import load_checkpoint, save_checkpoint

    model, opt, sched = _ckpt_parts()
    folder = tmp_path / "add-k"
    save_checkpoint(folder, key="k", epoch=0, model=model, optimizer=opt, scheduler=sched)
    fail_at("checkpoint.tmp_written:enospc")
    with pytest.raises(DiskFull, match="no space left on device while writing .* MB free"):
        save_checkpoint(folder, key="k", epoch=1, model=model, optimizer=opt, scheduler=sched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["add-k"]
    failpoints.configure("")
    assert load_checkpoint(folder, key="k", model=model, optimizer=opt,
                           scheduler=sched)["epoch"] == 0


# -- defect 7: the pointer's event is recovered from the pointer -----------------------------
def test_a_pointer_written_without_its_event_is_recovered(tiny, fail_at):
    fail_at("store.pointer.written")  # the event's write fails (a kill is in test_failpoints)
    with tiny.lock():  # the pointer moved: the deploy happened, the error is a note
        tiny.move_pointer({"step": 0, "engine": "torch", "since": "2026-01-01T00:00:00"},
                          "deployed", step=0, engine="torch")
    failpoints.configure("")
    assert not (tiny.root / "events.json").exists()
    assert tiny.deployed()["step"] == 0
    seen = tiny.events()  # readers see it at once
    assert seen[-1]["kind"] == "deployed" and seen[-1]["recovered"]
    tiny.record_event("diagnosed", step=0)  # the next writer makes it permanent
    stored = json.loads((tiny.root / "events.json").read_text())
    assert [e["kind"] for e in stored] == ["deployed", "diagnosed"]
    assert [e["kind"] for e in tiny.events()] == ["deployed", "diagnosed"]


# -- leases, the commit's work folder ---------------------------------------------------------
def test_a_lease_tells_a_live_writer_from_a_dead_one(tiny):
    work = tiny.work_dir / "add-abc"
    with tiny.lease(work, steps=[0]):
        (info,) = tiny.leases()
        assert info.live and info.steps == [0] and info.path == work
        assert 0 in tiny.leased_steps()
        with pytest.raises(CissError, match="another ciss process"), tiny.lease(work):
            pass
    assert tiny.leases() == []
    # a dead writer: its lease file stays behind, its flock is free
    (tiny.root / ".leases" / "add-abc-dead.json").write_text(json.dumps(
        {"path": str(work), "steps": [0], "pid": 1, "host": "h", "started": "t"}))
    (info,) = tiny.leases()
    assert not info.live and tiny.leased_steps() == {}


def test_write_step_records_its_work_folder_and_removes_it(tiny):
    from ciss.models import build_model

    work = tiny.work_dir / "add-abc"
    work.mkdir(parents=True)
    (work / "state.safetensors").write_bytes(b"x" * 100)
    with tiny.lease(work, steps=[0]) as lease:
        step = tiny.write_step(_card(), build_model("tiny", num_classes=2), work=lease)
    assert tiny.step_for_work("add-abc") == step == 1 and not work.exists()
    assert tiny.step_for_work("add-other") is None


def test_a_staging_leftover_is_removed_unless_its_writer_lives(tiny):
    from ciss.models import build_model

    live = tiny.staging_folder("export")
    dead = tiny.root / ".staging" / "export-deadbeef"
    dead.mkdir()
    tiny.write_step(_card(), build_model("tiny", num_classes=2))
    assert live.exists() and not dead.exists()
    tiny.drop_staging(live)
    assert not live.exists() and tiny.leases() == []


def test_write_step_on_a_full_disk_says_so_and_leaves_the_store_as_it_was(tiny, fail_at):
    from ciss.models import build_model

    before = sorted(p.relative_to(tiny.root) for p in tiny.root.rglob("*"))
    fail_at("store.step.staged:enospc")
    with pytest.raises(DiskFull) as err:
        tiny.write_step(_card(), build_model("tiny", num_classes=2))
    assert "MB needed" in str(err.value) and "MB free" in str(err.value)
    assert tiny.steps() == [0]
    after = sorted(p.relative_to(tiny.root) for p in tiny.root.rglob("*"))
    assert [p for p in after if p not in before and p.name != ".staging"] == []
    shutil.rmtree(tiny.root / ".staging", ignore_errors=True)


# -- ciss store verify [--repair] -------------------------------------------------------------
def test_verify_names_each_leftover_with_its_bytes_and_repair_removes_them(tiny):
    from click.testing import CliRunner

    from ciss.cli import main

    root = tiny.root
    (root / ".staging" / "export-0badc0de").mkdir(parents=True)
    (root / ".staging" / "export-0badc0de" / "model.onnx").write_bytes(b"x" * 2048)
    (root / ".deployed.json.0123abcd.tmp").write_text("half")
    (tiny.step_dir(0) / "stray.onnx").write_bytes(b"y" * 10)  # an add_artifact killed
    ckpt = tiny.work_dir / "add-k"
    (ckpt / "meta.json").parent.mkdir(parents=True)
    (ckpt / "meta.json").write_text("{}")
    (tiny.work_dir / ".add-k.old").mkdir()
    res = CliRunner().invoke(main, ["store", "verify", "--store", str(root)])
    assert res.exit_code == 1, res.output
    for what in ("export-0badc0de: staging folder of a dead writer", ".tmp: temporary file",
                 "stray.onnx: not named by the step card", ".add-k.old: checkpoint swap",
                 "add-k: checkpoint of an interrupted job"):
        assert what in res.output, res.output
    assert "run 'ciss store verify --repair' to fix" in res.output
    res = CliRunner().invoke(main, ["store", "verify", "--store", str(root), "--repair"])
    assert "repaired" in res.output
    assert ckpt.exists() and not (tiny.work_dir / ".add-k.old").exists()  # resumable: kept
    assert not (root / ".staging" / "export-0badc0de").exists()
    assert not (tiny.step_dir(0) / "stray.onnx").exists()
    res = CliRunner().invoke(main, ["store", "verify", "--store", str(root), "--repair",
                                    "--discard-work", "--json"])
    assert json.loads(res.output)["problems"][0]["repaired"] and not ckpt.exists()
    res = CliRunner().invoke(main, ["store", "verify", "--store", str(root)])
    assert res.exit_code == 0 and "no problem" in res.output, res.output


def test_verify_names_an_edited_card_and_accept_clears_it(tiny):
    from click.testing import CliRunner

    from ciss.cli import main

    _edit(tiny, 0, '"method": "base"', '"method": "mib"')
    res = CliRunner().invoke(main, ["store", "verify", "--store", str(tiny.root), "--repair"])
    assert res.exit_code == 1 and "card.json: edited since ciss wrote it" in res.output
    res = CliRunner().invoke(main, ["store", "accept", "--store", str(tiny.root), "0"])
    assert res.exit_code == 0 and "was edited" in res.output
    res = CliRunner().invoke(main, ["store", "verify", "--store", str(tiny.root)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("replaces", [False, True])
def test_an_artifact_renamed_before_its_card_is_finished_by_the_next_command(tiny, fail_at,
                                                                              replaces):
    if replaces:
        tiny.add_artifact(0, "model.onnx", lambda p: p.write_bytes(b"old"))
    fail_at("store.artifact.renamed")
    with pytest.raises(OSError):
        tiny.add_artifact(0, "model.onnx", lambda p: p.write_bytes(b"new"))
    failpoints.configure("")
    with tiny.lock():
        pass
    tiny.verify(0)  # a matching step either way
    onnx = tiny.step_dir(0) / "model.onnx"
    assert onnx.exists() == replaces and (not replaces or onnx.read_bytes() == b"new")
    assert not tiny.pending()


def test_a_full_disk_is_one_line_and_exit_2(tiny, monkeypatch):
    from click.testing import CliRunner

    from ciss.cli import main

    failpoints.configure("store.card.intent:enospc")
    try:
        res = CliRunner().invoke(main, ["store", "accept", "--store", str(tiny.root), "0"])
        res2 = CliRunner().invoke(main, ["memory", "clear", "--store", str(tiny.root),
                                         "--step", "0", "--yes"])
    finally:
        failpoints.configure("")
    for r in (res2,):
        assert r.exit_code == 2, r.output
        assert "no space left on device while writing" in r.output
        assert "MB free" in r.output and "Traceback" not in r.output
    assert res.exit_code == 0  # accept writes the manifest alone
    tiny.verify(0)
    assert "memory" in tiny.card(0).artifacts


def _serving_step_0(story, tmp_path):
    """A copy of the story store with step 0 deployed and loaded in a server's model slot."""
    from ciss.runtime.deploy import deploy
    from ciss.runtime.metrics import ServerMetrics
    from ciss.runtime.slot import ModelSlot, SwapPolicy

    root = tmp_path / "s"
    shutil.copytree(story, root)
    store = Store(root)
    deploy(store, 0, "torch", force=True)
    slot = ModelSlot(store, SwapPolicy(), ServerMetrics.create())
    assert slot.start().step == 0
    return root, store, slot


def test_an_edited_card_is_refused_by_check_deploy_and_serve_in_one_line(story, tmp_path,
                                                                         monkeypatch):
    from click.testing import CliRunner

    from ciss.cli import main

    root, store, slot = _serving_step_0(story, tmp_path)
    # the defect: raising the ft step's stored scores by hand turned a FAIL into a PASS
    _edit(store, 2, '"method": "ft"', '"method": "mib"')
    for args in (["check", "--step", "2"], ["deploy", "--step", "2", "--engine", "torch"]):
        res = CliRunner().invoke(main, [*args, "--store", str(root)])
        assert res.exit_code == 2, res.output
        errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "0002/card.json: edited since ciss wrote it" in errors[0]
    (root / "deployed.json").write_text(json.dumps({"step": 2, "engine": "torch"}))
    outcome = slot.refresh()
    assert outcome.outcome == "refused" and "edited" in outcome.reason
    assert slot.current.step == 0  # still serving
    # signed stores: the server refuses an unsigned step before it loads it
    monkeypatch.setenv("CISS_STORE_KEY", "secret")
    (root / "deployed.json").write_text(json.dumps({"step": 1, "engine": "torch"}))
    outcome = slot.refresh()
    assert outcome.outcome == "refused" and "not signed" in outcome.reason
    store.accept(1)
    assert slot.refresh(force=True).step == 1  # same deployed.json, looked at again


def test_the_server_keeps_serving_when_its_event_log_cannot_be_written(story, tmp_path,
                                                                      monkeypatch):
    """A full disk under the store: the server's own writes (the refusal event) fail, the
    refusal is still answered and the current step is still served (#29 item 5)."""
    import errno

    root, store, slot = _serving_step_0(story, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slot.store, "record_event", full)
    (root / "deployed.json").write_text(json.dumps({"step": 99, "engine": "torch"}))
    outcome = slot.refresh()
    assert outcome.outcome == "refused"
    assert slot.current.step == 0  # still serving


def test_a_raw_full_disk_error_anywhere_is_one_line_and_exit_2(tiny):
    """CissGroup maps an ENOSPC no writer converted (here: injected before rollback's
    pointer write) to the same one line; the pointer stays where it was."""
    from click.testing import CliRunner

    from ciss.cli import main

    with tiny.lock():
        tiny.move_pointer({"step": 0, "engine": "torch", "since": "t0"}, "deployed", step=0)
        tiny.move_pointer({"step": 0, "engine": "onnx", "since": "t1",
                           "history": [{"step": 0, "engine": "torch"}]}, "deployed", step=0)
    failpoints.configure("rollback.verified:enospc")
    try:
        res = CliRunner().invoke(main, ["rollback", "--store", str(tiny.root)])
    finally:
        failpoints.configure("")
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: no space left on device while writing ")
    assert len(res.output.strip().splitlines()) == 1 and "MB free" in res.output
    assert tiny.deployed()["engine"] == "onnx"


def test_steps_and_prune_mention_leftovers_over_50_mb(tiny):
    from click.testing import CliRunner

    from ciss.cli import main

    dead = tiny.root / ".staging" / "export-0badc0de"
    dead.mkdir(parents=True)
    with open(dead / "model.onnx", "wb") as f:  # sparse: 51 MB by size, none on disk
        f.truncate(51 * 2**20)
    for args in (["steps"], ["prune", "--dry-run"]):
        res = CliRunner().invoke(main, [*args, "--store", str(tiny.root)])
        assert res.exit_code == 0, res.output
        assert "51 MB in leftovers" in res.output and "ciss store verify" in res.output
    (dead / "model.onnx").unlink()
    res = CliRunner().invoke(main, ["steps", "--store", str(tiny.root)])
    assert "leftovers" not in res.output
