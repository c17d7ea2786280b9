"""A new user's first hour (#30): safe defaults, advice that runs, errors that name the fix.

Each test here failed on the behaviour #30 reported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from ciss.analysis.tolerances import GateThresholds, retention_first, shown_reasons
from ciss.cli import main
from ciss.store import Store

SRC = Path(__file__).resolve().parents[1] / "src"
FORGOT = "disc-3: IoU 33.8 -> 0.0 (-33.8 points > 15)"
NOT_LEARNED = [f"new class c{i} was not learned (IoU 1.0 < 5 points)" for i in range(5)]


# -- read-only commands never create a store; cheap checks come first ----------------------
READ_ONLY = [["steps"], ["check"], ["deploy"], ["rollback"], ["export"], ["report"],
             ["diagnose", "--out", "DIAG"], ["memory", "show"], ["prune", "--dry-run"],
             ["evaluate", "--data", "DATA"], ["predict", "IMG", "--out", "MASKS"]]


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: a[0])
def test_read_only_commands_in_the_wrong_folder_create_nothing(args, tmp_path):
    where = tmp_path / "not-a-store"
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    res = CliRunner().invoke(main, [*args, "--store", str(where)])
    assert res.exit_code == 2, res.output
    assert f"no store at {where.resolve()}; pass --store or CISS_STORE" in res.output
    assert not where.exists() and "Traceback" not in res.output
    assert not (tmp_path / "MASKS").exists()


def fake_store(root: Path) -> Path:
    """A store with one step whose card is never read (the cheap checks stop before)."""
    (root / "steps" / "0000").mkdir(parents=True)
    (root / "steps" / "0000" / "card.json").write_text("{}")
    return root


@pytest.mark.parametrize("args", [["check", "--step", "7"], ["deploy", "--step", "7"],
                                  ["export", "--step", "7"],
                                  ["diagnose", "--step", "7", "--out", "DIAG"]],
                         ids=lambda a: a[0])
def test_an_unknown_step_is_refused_before_torch_is_imported(args, tmp_path):
    store = fake_store(tmp_path / "store")
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    code = ("import sys\nfrom ciss.cli import main\n"
            f"try:\n    main({[*args, '--store', str(store)]!r})\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "print('torch' in sys.modules)\n")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert "step 7 is not in" in out.stderr, out.stderr
    assert out.stdout.split() == ["exit", "2", "False"], out.stdout


# -- retention failures first, everywhere ----------------------------------------------------
def test_retention_reasons_come_first_and_are_never_cut_off():
    reasons = [*NOT_LEARNED, FORGOT, "note: whatever"]
    assert retention_first(reasons)[0] == FORGOT
    line = shown_reasons(reasons, 4)
    assert line.startswith(FORGOT) and "and 3 more new class(es) not learned" in line
    assert "note:" not in line


def test_the_store_page_shows_the_forgetting_reason():
    from ciss.analysis.overview import _event_row

    row = _event_row({"kind": "refused", "step": 4, "reasons": [*NOT_LEARNED, FORGOT]}, None)
    assert "disc-3: IoU 33.8" in row


# -- diagnose agrees with the gate -------------------------------------------------------------
def diagnosis(**classes) -> SimpleNamespace:
    """A diagnosis whose mean old-class drop is small while one class collapsed."""
    per = {name: {"iou_before": b, "iou_after": a, "to_background": 0.9, "to_new": 0.05,
                  "to_old": 0.05} for name, (b, a) in classes.items()}
    return SimpleNamespace(
        classes=per, old_miou_before=0.700, old_miou_after=0.707, against=1, method="mib",
        lost={"to_background": 0.9, "to_new": 0.05, "to_old": 0.05},
        transplant_gain={"head": 0.1}, cka={"stem": 0.99, "head": 0.5},
        bias={"offset": {"new": {}}})


def test_the_diagnose_verdict_names_a_class_the_gate_refuses():
    from ciss.analysis.verdict import write_verdict

    d = diagnosis(**{"disc-3": (0.338, 0.0)}, **{f"c{i}": (0.7, 0.73) for i in range(14)})
    text = write_verdict(d)
    assert "Little or no forgetting" not in text
    assert "disc-3 33.8 -> 0.0" in text and "per-class limit of 15 points" in text
    assert "ciss add-classes" in text  # advice names the command whose options it uses
    quiet = diagnosis(**{f"c{i}": (0.7, 0.707) for i in range(14)})
    assert "Little or no forgetting" in write_verdict(quiet)
    assert "disc-3" in write_verdict(d, GateThresholds(max_class_drop=30))
    assert "Little or no" in write_verdict(d, GateThresholds(max_class_drop=40))


# -- the gate and deploy on a real store ---------------------------------------------------
@pytest.fixture
def story_copy(story, tmp_path) -> Path:
    root = tmp_path / "s"
    shutil.copytree(story, root)
    return root


def test_check_json_is_fractions_and_a_failed_check_says_what_to_run(story_copy):
    res = CliRunner().invoke(main, ["check", "--store", str(story_copy), "--step", "2",
                                    "--engine", "torch", "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert 0 < doc["mean_old_drop"] < 1
    for c in doc["classes"]:
        for k in ("before", "after", "drop", "since_introduced"):
            assert c.get(k) is None or -1 <= c[k] <= 1, c
        if c["drop"] is not None:
            assert c["drop"] == pytest.approx(c["before"] - c["after"])
    human = CliRunner().invoke(main, ["check", "--store", str(story_copy), "--step", "2",
                                      "--engine", "torch"])
    assert "points" in human.output
    assert "next: ciss diagnose --step 2 --out diagnose-step-2" in human.output


def test_deploy_force_says_the_server_needs_accept_forced(story_copy):
    res = CliRunner().invoke(main, ["deploy", "--store", str(story_copy), "--step", "2",
                                    "--engine", "torch"])
    assert res.exit_code == 1 and "next: ciss diagnose --step 2" in res.output
    res = CliRunner().invoke(main, ["deploy", "--store", str(story_copy), "--step", "2",
                                    "--engine", "torch", "--force"])
    assert res.exit_code == 0, res.output
    assert "next: ciss serve --accept-forced" in res.output


def test_a_first_step_with_a_weak_class_deploys_with_a_warning(story_copy):
    from ciss.runtime.deploy import deploy
    from ciss.runtime.gate import run_gate

    # a floor no class reaches makes every class of step 0 weak: still no refusal
    strict = GateThresholds(min_new_iou=100)
    gate = run_gate(Store(story_copy), 0, engine="torch", thresholds=strict)
    assert gate.passed and any(r.startswith("note: class ") for r in gate.reasons)
    assert deploy(Store(story_copy), 0, "torch", thresholds=strict).record["forced"] is False
    res = CliRunner().invoke(main, ["deploy", "--store", str(story_copy), "--step", "0",
                                    "--engine", "torch", "--min-new-iou", "100"])
    assert res.exit_code == 0 and "warning: class " in res.output


# -- bad data: one line per cause, with the fix ----------------------------------------------
def test_a_folder_of_rgb_masks_is_one_problem_that_names_the_fix(tmp_path):
    import numpy as np
    from PIL import Image

    from tests.conftest import make_folder

    root = make_folder(tmp_path / "rgb", ["background", "a", "b"], n=12)
    for p in (root / "masks").iterdir():
        Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(p)
    res = CliRunner().invoke(main, ["data", "check", "--data", str(root)])
    assert res.exit_code == 1
    problems = [ln for ln in res.output.splitlines() if ln.startswith("problem:")]
    assert len(problems) <= 3, res.output
    assert "12 files" in problems[0] and "labelmap.txt" in problems[0]
    assert "mode='L'" in problems[0]
    res = CliRunner().invoke(main, ["data", "check", str(root)])  # the bare folder still works
    assert res.exit_code == 1 and "12 files" in res.output


def test_16_bit_masks_whose_values_fit_8_bits_are_read(tmp_path):
    import numpy as np
    from PIL import Image

    from ciss.data.imageio import read_mask

    mask = np.array([[0, 1], [5, 255]], np.uint16)
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png").tolist() == [[0, 1], [5, 255]]


def test_serve_on_a_busy_port_is_one_line_and_exit_2(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(main, ["serve", "--store", str(fake_store(tmp_path / "s")),
                                        "--port", str(port)])
    assert res.exit_code == 2, res.output
    assert res.output.strip().count("\n") == 0 and f"127.0.0.1:{port}" in res.output
    assert "listening" not in res.output


def test_class_counts_agree_across_data_check_steps_and_the_store_page(story, split_dir):
    """#30: one store said 15 classes (train), 16 (steps) and 20 (report). Every count is now
    of object classes, background not counted; the page says its count spans all steps."""
    from ciss.analysis.overview import build_overview, render_overview

    res = CliRunner().invoke(main, ["data", "check", "--data", str(split_dir / "step-0"),
                                    "--store", str(story)])
    assert "15 classes + background" in res.output, res.output
    res = CliRunner().invoke(main, ["steps", "--store", str(story)])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split() for line in res.output.splitlines()[2:]}
    assert rows["0"][3] == "15" and rows["1"][3] == "20", res.output  # object classes
    page = render_overview(build_overview(Store(story)))
    assert "20 classes over all steps" in page


def test_a_val_split_without_the_new_classes_is_refused_before_training(store_copy,
                                                                         split_dir, tmp_path):
    """A small export whose val split shows none of its classes failed only after the whole
    training (no retention set to write); it is now refused at once, naming the fix."""
    import numpy as np
    from PIL import Image

    from ciss.data.imageio import write_mask

    folder = tmp_path / "new"
    shutil.copytree(split_dir / "step-1", folder)
    stem = sorted(p.stem for p in (folder / "masks").glob("*.png"))[0]
    mask = np.asarray(Image.open(folder / "masks" / f"{stem}.png"))
    write_mask(folder / "masks" / f"{stem}.png", np.zeros_like(mask))
    (folder / "val.txt").write_text(stem + "\n")
    (folder / "train.txt").unlink(missing_ok=True)
    res = CliRunner().invoke(main, ["add-classes", "--data", str(folder), "--store",
                                    str(store_copy), "--iterations", "1"])
    assert res.exit_code == 2, res.output
    assert "the val split (1 image(s)) shows none of the folder's classes" in res.output
    assert Store(store_copy).steps() == [0]
