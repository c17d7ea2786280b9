"""add-classes, benchmark and demo through the command line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ciss.analysis.metrics import harmonic_iou
from ciss.cli import main
from ciss.store import Store
from ciss.updater.defaults import step_defaults


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_add_classes_cli_table_and_errors(store_copy, split_dir):
    res = run("add-classes", "--store", store_copy, "--data", split_dir / "step-1", "--epochs", 1,
              "--batch-size", 4, "--quiet")
    assert res.exit_code == 0, res.output
    assert "before %" in res.output and "dots-disc" in res.output
    assert "step 1 (mib, parent 0): +5 classes" in res.output
    assert "next: ciss check --step 1" in res.output
    res = run("add-classes", "--store", store_copy, "--data", split_dir / "step-1", "--epochs", 1,
              "--freeze", "stage9", "--from", 0)
    assert res.exit_code == 2 and "unknown stage" in res.output
    res = run("add-classes", "--store", store_copy, "--data", split_dir / "step-1", "--from", 0,
              "--method", "ft", "--epochs", 1, "--batch-size", 4, "--quiet",
              "--bn-stats", "update")
    assert res.exit_code == 0, res.output
    doc = json.loads(run("steps", "--store", store_copy, "--json").output)
    assert [(d["step"], d["parent"], d["method"]) for d in doc] == [
        (0, None, "base"), (1, 0, "mib"), (2, 0, "ft")]
    store = Store(store_copy)
    # the recipe's BatchNorm choice when not given, the flag's when given; both on the card
    assert store.card(1).config["update"]["bn_stats"] == step_defaults("mib").bn_stats
    assert store.card(2).config["update"]["bn_stats"] == "update"


def test_benchmark_json_and_files(synthetic_dir, tmp_path):
    out = tmp_path / "bench"
    res = run("benchmark", "--data", synthetic_dir, "--scenario", "15-5", "--methods",
              "ft,mib,mib+memory,joint", "--memory", 8, "--base-epochs", 1, "--step-epochs", 1,
              "--control", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    finals = {r["method"]: r for r in doc["final"]}
    assert set(finals) == {"ft", "mib", "mib+memory", "ft-control", "joint"}
    # each row's hIoU is the harmonic mean of its old and new mIoU
    for r in finals.values():
        assert r["hiou"] == pytest.approx(harmonic_iou(r["old"], r["new"]))
    # every incremental method starts from the one shared base step: the same step-0 row
    base_rows = {r["method"]: (r["old"], r["all"], r["new"]) for r in doc["steps"]
                 if r["step"] == 0 and r["method"] != "joint"}
    assert len(set(base_rows.values())) == 1 and len(base_rows) == 4, base_rows
    # and the table's numbers are the stored steps' own: scored again here, independently
    from ciss.benchmark import score_step
    from ciss.data.folder import open_folder
    from ciss.data.scenarios import parse_scenario

    source = open_folder(synthetic_dir)
    base_ids = parse_scenario("15-5").steps(len(source.classes) - 1)[0]
    for method in ("ft", "mib"):
        old, new, all_, _ = score_step(Store(out / "stores" / method), 1, source, base_ids)
        assert (old, new, all_) == pytest.approx(
            (finals[method]["old"], finals[method]["new"], finals[method]["all"]))
    assert [r["step"] for r in doc["steps"] if r["method"] == "mib"] == [0, 1]
    for name in ("results.csv", "results.md", "results.json", "curves.png", "results.html"):
        assert (out / name).stat().st_size > 0
    assert "data:image/png;base64," in (out / "results.html").read_text()
    # only the +memory run replays: the base keeps 8 images, the plain mib step none
    assert Store(out / "stores" / "base").card(0).memory["images"] == 8
    assert Store(out / "stores" / "mib+memory").card(1).data["replayed_images"] == 8
    assert "replayed_images" not in Store(out / "stores" / "mib").card(1).data
    assert not Store(out / "stores" / "mib").card(1).memory
    res = run("benchmark", "--data", synthetic_dir, "--scenario", "15-5", "--methods", "xyz",
              "--out", tmp_path / "b2")
    assert res.exit_code == 2 and "unknown xyz" in res.output
    res = run("benchmark", "--data", synthetic_dir, "--scenario", "15-5", "--methods",
              "joint+memory", "--out", tmp_path / "b3")
    assert res.exit_code == 2 and "unknown joint+memory" in res.output


def test_demo_fast(tmp_path):
    res = run("demo", "--out", tmp_path / "demo", "--fast")
    assert res.exit_code == 0, res.output
    assert "old-class mIoU after the new step: mib" in res.output
    assert "retention gate" in res.output and "serving step" in res.output
    assert "ONNX label agreement" in res.output
    assert "POST /v1/segment" in res.output and "served-masks" in res.output
    masks = sorted((tmp_path / "demo" / "served-masks").glob("*.png"))
    assert len(masks) == 3 and all(m.stat().st_size > 0 for m in masks)
    for method in ("ft", "mib"):
        assert (tmp_path / "demo" / f"diagnosis-{method}" / "report.html").stat().st_size > 0
    doc = json.loads(run("steps", "--store", tmp_path / "demo" / "store", "--json").output)
    assert [d["method"] for d in doc] == ["base", "mib", "ft"]
    assert all("model.onnx" in d["artifacts"] for d in doc)


def test_demo_replaces_its_own_output_and_refuses_other_folders(tmp_path):
    from ciss.demo import MARKER, prepare_output

    lines = []
    out = tmp_path / "demo"
    prepare_output(out, lines.append)
    (out / "store").mkdir()
    (out / "store" / "x").write_text("earlier run")
    prepare_output(out, lines.append)  # a second run replaces the first one's files
    assert sorted(p.name for p in out.iterdir()) == [MARKER] and "earlier demo" in lines[0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    res = run("demo", "--out", mine, "--fast")
    assert res.exit_code == 2 and "was not written by 'ciss demo'" in res.output
    assert (mine / "thesis.tex").read_text() == "precious"


def test_add_classes_logs_to_a_file_in_a_few_lines(store_copy, split_dir, tmp_path):
    """Progress sent to a file is one line per stage: no carriage returns, no redraws."""
    import subprocess
    import sys

    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "ciss", "add-classes", "--store",
                               str(store_copy), "--data", str(split_dir / "step-1"),
                               "--epochs", "3", "--batch-size", "8"],
                              stdout=f, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text
    assert len(text.splitlines()) <= 60
    assert text.count("mib 1/3:") == 1 and "mib 3/3:" in text
