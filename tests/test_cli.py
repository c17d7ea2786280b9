"""The command line: every command through click's CliRunner, exit codes, JSON contracts."""

from __future__ import annotations

import json

from click.testing import CliRunner

from ciss.cli import main


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def test_help_lists_commands():
    res = run("--help")
    assert res.exit_code == 0
    for cmd in ("data", "train", "evaluate", "steps", "demo"):
        assert cmd in res.output


def test_data_synthetic_and_split(tmp_path):
    res = run("data", "synthetic", "--out", tmp_path / "d", "--size", 32, "--train", 40,
              "--val", 30)
    assert res.exit_code == 0, res.output
    assert "next: ciss data split" in res.output
    res = run("data", "split", "--data", tmp_path / "d", "--scenario", "15-5", "--out",
              tmp_path / "s")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s" / "step-1" / "classes.txt").exists()
    res = run("data", "split", "--data", tmp_path / "d", "--scenario", "15-5", "--out",
              tmp_path / "s")
    assert res.exit_code == 2 and "exists and is not empty" in res.output
    assert "Traceback" not in res.output


def test_train_bad_data_exits_2_and_writes_nothing(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for data in (tmp_path / "missing", tmp_path / "file.txt"):
        res = run("train", "--store", tmp_path / "store", "--data", data, "--epochs", 1)
        assert res.exit_code == 2
        assert str(data) in res.output and "Traceback" not in res.output
    assert not (tmp_path / "store").exists()


def test_train_steps_evaluate_json(split_dir, synthetic_dir, tmp_path):
    store = tmp_path / "store"
    res = run("train", "--store", store, "--data", split_dir / "step-0", "--epochs", 1,
              "--batch-size", 8, "--quiet")
    assert res.exit_code == 0, res.output
    assert "step 0: tiny, 15 classes" in res.output
    res = run("steps", "--json", env={"CISS_STORE": str(store)})
    assert res.exit_code == 0
    doc = json.loads(res.output)
    assert doc[0]["step"] == 0 and doc[0]["parent"] is None and doc[0]["method"] == "base"
    assert {"step", "parent", "method", "classes", "new_classes", "deployed",
            "artifacts"} <= set(doc[0])
    res = run("evaluate", "--store", store, "--data", synthetic_dir, "--json")
    assert res.exit_code == 0
    doc = json.loads(res.output)
    assert doc["engine"] == "torch" and 0 <= doc["miou"] <= 1
    res = run("evaluate", "--store", store, "--data", synthetic_dir)
    assert "counted as background" in res.output and "dots-disc" in res.output
    res = run("evaluate", "--store", store, "--data", synthetic_dir, "--step", 4)
    assert res.exit_code == 2 and "step 4 is not in" in res.output


def test_unknown_arch_is_usage_error(split_dir, tmp_path):
    res = run("train", "--store", tmp_path / "s", "--data", split_dir / "step-0", "--arch",
              "tinyy")
    assert res.exit_code == 2 and "did you mean 'tiny'" in res.output
