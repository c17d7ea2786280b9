"""``ciss diagnose``: CKA properties, the diagnosis numbers, the report, bad input."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ciss.analysis.cka import linear_cka
from ciss.analysis.diagnose import diagnose
from ciss.cli import main
from ciss.errors import CissError
from ciss.store import Store
from tests.conftest import make_folder


def test_cka_known_properties():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    assert linear_cka(x, x) == pytest.approx(1.0)
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    assert linear_cka(x, x @ q) == pytest.approx(1.0)  # orthogonal transform
    assert linear_cka(x, 7.5 * x) == pytest.approx(1.0)  # isotropic scaling
    assert linear_cka(x, x + 3.0) == pytest.approx(1.0)  # centring removes offsets
    y = rng.normal(size=(500, 24))
    assert linear_cka(x, y) < 0.2  # independent random features
    assert linear_cka(x, np.c_[x, y]) == pytest.approx(linear_cka(np.c_[x, y], x))
    # a non-isotropic scaling does change it
    assert linear_cka(x, x * np.linspace(0.1, 10, 16)) < 0.99
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, y[:10])


@pytest.fixture(scope="module")
def diagnosis(story):
    return diagnose(Store(story), 2)


def test_diagnosis_numbers_are_consistent(diagnosis, story):
    d = diagnosis.to_json()
    assert (d["step"], d["against"], d["method"]) == (2, 0, "ft")
    assert len(d["classes"]) == 15 and len(d["new_classes"]) == 5
    for name, c in d["classes"].items():
        if c["pixels"]:
            total = c["kept"] + c["to_background"] + c["to_new"] + c["to_old"]
            assert total == pytest.approx(1.0), name
    lost = d["lost"]
    if lost["pixels"]:
        assert lost["to_background"] + lost["to_new"] + lost["to_old"] == pytest.approx(1.0)
    assert sum(c["flipped"] for c in d["classes"].values()) == lost["pixels"]
    # the story's steps froze up to stage4: those stages are the parent's, exactly
    assert list(d["cka"]) == ["stem", "stage1", "stage2", "stage3", "stage4", "head",
                              "classifier"]
    assert d["frozen"] == ["stem", "stage1", "stage2", "stage3", "stage4"]
    for s in d["frozen"]:
        assert d["cka"][s] == pytest.approx(1.0) and d["transplant"][s] is None
    assert d["cka"]["head"] < 0.999  # trained stages did move
    for s in ("head", "classifier"):
        assert d["transplant_gain"][s] == pytest.approx(
            100 * (d["transplant"][s] - d["old_miou_after"]))
    off = d["bias"]["offset"]["new"]
    assert off["offsets"][0] == 0 and off["old_miou"][0] == pytest.approx(d["old_miou_after"])
    assert set(d["bias"]["mean_logit"]) == {"child/background", "child/old", "child/new",
                                           "parent/background", "parent/old"}
    assert d["verdict"].startswith("Old-class mIoU")


def test_diagnosis_matches_the_gate_scores(diagnosis, story):
    """iou_after uses the same partial-label rule as the retention gate."""
    from ciss.runtime.gate import run_gate

    gate = run_gate(Store(story), 2, engine="torch")
    old = [c for c in gate.classes if c.before is not None]  # new classes: the learning check
    assert len(old) == 15
    for c in old:
        assert diagnosis.classes[c.name]["iou_after"] == pytest.approx(c.after)
        assert diagnosis.classes[c.name]["iou_before"] == pytest.approx(c.before)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_cli_writes_a_self_contained_report(story, tmp_path):
    out = tmp_path / "diag"
    res = CliRunner().invoke(main, ["diagnose", "--store", str(story), "--step", "2",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and "Old-class mIoU" in res.output
    doc = json.loads((out / "diagnosis.json").read_text())
    assert {"step", "against", "classes", "cka", "transplant"} <= set(doc)
    page = (out / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert len(parser.srcs) == 4
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")  # nothing fetched from elsewhere
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
                         .convert("L"))
        assert img.shape[0] > 100 and img.std() > 5  # a real plot, not a blank canvas
    assert "http://" not in page and "https://" not in page
    res = CliRunner().invoke(main, ["diagnose", "--store", str(story), "--step", "2",
                                    "--out", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="headless Chromium not installed (the HTML and images are checked "
                           "by test_cli_writes_a_self_contained_report)")
def test_report_renders_in_headless_chromium(story, tmp_path):
    out = tmp_path / "diag"
    CliRunner().invoke(main, ["diagnose", "--store", str(story), "--out", str(out)])
    shot = tmp_path / "shot.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--screenshot={shot}", "--window-size=1200,2000",
                    (out / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    assert np.asarray(Image.open(shot).convert("L")).std() > 5


def test_bad_input(story, tmp_path):
    store = Store(story)
    with pytest.raises(CissError, match="no parent"):
        diagnose(store, 0)
    with pytest.raises(CissError, match="not an ancestor of step 2"):
        diagnose(store, 2, against=1)
    new_only = make_folder(tmp_path / "new", ["background", "dots-disc", "dots-square"])
    with pytest.raises(CissError, match="labels no old class"):
        diagnose(store, 2, data=new_only)
    res = CliRunner().invoke(main, ["diagnose", "--store", str(story), "--step", "9",
                                    "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "9" in res.output


def test_diagnose_on_a_labelled_folder(story, split_dir):
    d = diagnose(Store(story), 2, data=split_dir / "step-0", max_images=8)
    assert d.images == 8 and d.data.endswith("step-0")
    assert all(v["iou_after"] is None for v in d.new_classes.values())  # not labelled there
