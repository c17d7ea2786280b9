"""The one step-writing path (updater/config + updater/job): one resolved configuration, stored
once on the card; a rerun after any kill resumes or says the step exists (#29)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from click.testing import CliRunner

from ciss.cli import main
from ciss.errors import CissError
from ciss.models.build import arch_spec
from ciss.store import StepCard, Store
from ciss.updater.add_classes import add_classes
from ciss.updater.config import StepOptions, resolve_step, step_settings
from ciss.updater.defaults import base_defaults, step_defaults
from ciss.updater.loop import LoopConfig
from ciss.updater.methods import MethodConfig


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


class Interrupt(Exception):
    pass


def test_resolve_step_is_the_family_recipe_under_the_options(store_copy):
    train = resolve_step("train", StepOptions())
    assert train.loop == base_defaults("tiny").loop() and train.base.loss == "ce+dice"
    assert train.base.arch == "tiny" and train.base.memory == 0
    assert resolve_step("train", StepOptions(lr=0.5, loss="wce")).loop.lr == 0.5
    store = Store(store_copy)
    step = resolve_step("add-classes", StepOptions(), store)
    d = step_defaults("mib")
    assert step.loop == d.loop() and step.method.kd_weight == d.kd_weight
    assert step.update.bn_stats == d.bn_stats and step.update.init == "random"
    assert step.update.pretune == arch_spec("tiny").family.step.pretune  # mib: 1/3 on tiny
    assert step.update.freeze == arch_spec("tiny").default_freeze
    assert step.update.memory == 0  # the parent keeps none
    dkd = resolve_step("add-classes", StepOptions(method="dkd", kd_weight=2.0,
                                                  iterations=7), store)
    assert dkd.update.pretune == 0.0 and dkd.method.kd_weight == 2.0
    assert (dkd.loop.iterations, dkd.loop.max_epochs) == (7, None)  # a given budget is kept
    with pytest.raises(CissError, match="mib2"):
        resolve_step("add-classes", StepOptions(method="mib2"), store)


def test_add_classes_cmd_passes_one_options_object():
    from ciss.cli.update import add_classes_cmd

    params = list(inspect.signature(add_classes_cmd.callback).parameters)
    assert params == ["store_path", "data_dir", "quiet", "options"]
    # every option of the command is a field of StepOptions (nothing dropped on the way)
    names = {p.name for p in add_classes_cmd.params} - {"store_path", "data_dir", "quiet"}
    assert names <= set(StepOptions.__dataclass_fields__), names - set(
        StepOptions.__dataclass_fields__)


def test_card_stores_the_configuration_once_and_old_cards_still_load(store_copy, split_dir,
                                                                     tmp_path):
    res = run("add-classes", "--store", store_copy, "--data", split_dir / "step-1",
              "--iterations", 4, "--batch-size", 4, "--lr", 0.002, "--quiet")
    assert res.exit_code == 0, res.output
    store = Store(store_copy)
    raw = json.loads((store.step_dir(1) / "card.json").read_text())
    assert "hparams" not in raw
    config = raw["config"]
    assert config["command"] == "add-classes" and config["loop"]["lr"] == 0.002
    assert config["loop"]["iterations"] == 4 and config["method"]["method"] == "mib"
    assert len(config["request"]) == 16
    settings = step_settings(store.card(1))
    assert settings["lr"] == 0.002 and settings["world_size"] == 1
    assert settings["crop_size"] == raw["extra"]["run"]["crop_size"]
    # a card written before #29: settings flat in hparams, no config
    old = {k: v for k, v in raw.items() if k != "config"}
    old["hparams"] = {"lr": 0.01, "bn_stats": "frozen", "world_size": 1}
    path = tmp_path / "card.json"
    path.write_text(json.dumps(old))
    card = StepCard.from_file(path)
    assert card.hparams["lr"] == 0.01 and step_settings(card)["bn_stats"] == "frozen"
    assert json.loads(card.to_json())["hparams"] == old["hparams"]  # kept as it was


def test_rerun_after_the_step_was_written_says_so_and_cleans_up(store_copy, split_dir):
    """Defect 5: killed after the commit and before the clean-up, the rerun of the same command
    said "no new class" and left the checkpoint behind."""
    cmd = ("add-classes", "--store", store_copy, "--data", split_dir / "step-1",
           "--iterations", 4, "--batch-size", 4, "--quiet")
    assert run(*cmd).exit_code == 0
    store = Store(store_copy)
    card = store.card(1)
    # what a kill between the commit and the clean-up leaves: the request's work folder
    work = store.work_dir / f"add-{card.config['request']}"
    work.mkdir(parents=True)
    (work / "state.safetensors").write_bytes(b"\0" * 1024)
    res = run(*cmd)
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"step 1 was written at {card.created}; nothing to do"
    assert not work.exists() and store.steps() == [0, 1]


def test_train_rerun_after_its_step_was_written(split_dir, tmp_path):
    cmd = ("train", "--store", tmp_path / "s", "--data", split_dir / "step-0",
           "--iterations", 3, "--batch-size", 4, "--quiet")
    assert run(*cmd).exit_code == 0
    res = run(*cmd)
    created = Store(tmp_path / "s").card(0).created
    assert res.exit_code == 0 and res.output.strip() == (f"step 0 was written at {created}; "
                                                         "nothing to do")
    # another command on the same store is still refused
    res = run(*cmd[:-1], "--lr", 0.5, "--quiet")
    assert res.exit_code == 2 and "already has steps" in res.output


def test_interrupted_add_classes_resumes_to_the_same_weights(base_store, split_dir, tmp_path):
    import shutil

    loop = LoopConfig(epochs=2, batch_size=8, seed=3, checkpoint_every_s=0, evals=0)
    kw = dict(method=MethodConfig(method="ft"), loop=loop, progress=False)
    stores = []
    for name in ("a", "b"):
        shutil.copytree(base_store, tmp_path / name)
        stores.append(Store(tmp_path / name))
    add_classes(stores[0], split_dir / "step-1", **kw)

    def stop(epoch):
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        add_classes(stores[1], split_dir / "step-1", after_epoch=stop, **kw)
    assert stores[1].steps() == [0] and len(list(stores[1].work_dir.glob("add-*"))) == 1
    report = add_classes(stores[1], split_dir / "step-1", **kw)
    assert report.fit.resumed_from == 1
    wa, _ = stores[0].load_model(1)
    wb, _ = stores[1].load_model(1)
    for (name, x), y in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(x, y), name
    assert not list(stores[1].work_dir.glob("add-*"))  # spent once the step landed


def test_add_classes_killed_just_after_the_commit(store_copy, split_dir):
    """The real kill (SIGKILL at the store's failpoint past the rename): the rerun of the same
    command says the step exists in one line, and the checkpoint it left is gone."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    cmd = [sys.executable, "-m", "ciss", "add-classes", "--store", str(store_copy), "--data",
           str(split_dir / "step-1"), "--epochs", "2", "--batch-size", "8",
           "--checkpoint-every", "0", "--quiet"]
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    killed = subprocess.run(cmd, env={**env, "CISS_FAILPOINT": "store.step.committed:kill"},
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    store = Store(store_copy)
    assert store.steps() == [0, 1] and list(store.work_dir.glob("add-*"))  # the leftover
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == (f"step 1 was written at {store.card(1).created}; "
                                    "nothing to do")
    assert not list(store.work_dir.glob("add-*")) and store.steps() == [0, 1]


def test_import_rerun_after_its_step_was_written(split_dir, tmp_path):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=16)
    torch.save(tv.state_dict(), tmp_path / "model.pth")
    cmd = ("import", "--store", tmp_path / "s", "--arch", "lraspp_mobilenet_v3_large",
           "--weights", tmp_path / "model.pth", "--classes", split_dir / "step-0" / "classes.txt",
           "--data", split_dir / "step-0")
    assert run(*cmd).exit_code == 0
    res = run(*cmd)
    card = Store(tmp_path / "s").card(0)
    assert res.exit_code == 0 and res.output.strip() == (
        f"step 0 was written at {card.created}; nothing to do")
    assert card.config["command"] == "import" and card.config["source"]["weights"].endswith(
        "model.pth")
