"""The store overview: ``ciss report`` and ``GET /`` of ``ciss serve``."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ciss.cli import main
from ciss.errors import CheckFailed
from ciss.runtime.deploy import deploy, rollback
from ciss.runtime.server import ServeConfig, background
from ciss.store import Store

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def history(story, tmp_path_factory):
    """The story store with a history: mib deployed, ft refused, ft forced, rolled back."""
    root = tmp_path_factory.mktemp("overview") / "store"
    shutil.copytree(story, root)
    store = Store(root)
    deploy(store, 1, "torch")
    with pytest.raises(CheckFailed):
        deploy(store, 2, "torch")
    deploy(store, 2, "torch", force=True)
    rollback(store)
    res = CliRunner().invoke(main, ["diagnose", "--store", str(root), "--step", "2",
                                    "--out", str(root.parent / "diag")])
    assert res.exit_code == 0, res.output
    return root


def test_report_is_self_contained_and_names_every_step_and_class(history, tmp_path):
    res = CliRunner().invoke(main, ["report", "--store", str(history), "--out",
                                    str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r" / "index.html").read_text()
    parsed = Page()
    parsed.feed(page)
    text = " ".join(parsed.text)
    card = Store(history).card(2)
    for step in (0, 1, 2):
        assert f"step {step}" in text
    for name in Store(history).card(1).classes[1:] + card.classes[1:]:
        assert name in text, name
    assert "REFUSED" in text and "FORCED past the gate" in text and "rolled back" in text
    assert "LIVE" in text and "live:" in text
    assert len(parsed.srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in
                                         parsed.srcs)
    assert "http://" not in page and "https://" not in page
    assert '<a href="../../' in page or 'href="' in page  # the diagnosis report is linked
    doc = json.loads((tmp_path / "r" / "overview.json").read_text())
    assert [s["step"] for s in doc["steps"]] == [0, 1, 2]


def test_an_empty_store_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["report", "--store", str(tmp_path / "none"), "--out",
                                    str(tmp_path / "r")])
    assert res.exit_code == 2 and "no store at" in res.output  # and none is created
    assert not (tmp_path / "none").exists()
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["report", "--store", str(tmp_path / "empty"), "--out",
                                    str(tmp_path / "r")])
    assert res.exit_code == 2 and "no steps yet" in res.output


def test_serve_answers_the_overview_with_an_upload_form(history):
    with (background(ServeConfig(store=history)) as (url, _),
          urllib.request.urlopen(url + "/", timeout=60) as r):
        page = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
    assert 'id="file"' in page and "/v1/segment?format=json" in page
    assert "step 2" in page and "dots-disc" in page


@pytest.mark.skipif(BROWSER is None, reason="headless Chromium not installed (apt-get install "
                                            "chromium); the page's structure is checked above")
def test_report_renders_in_headless_chromium(history, tmp_path):
    CliRunner().invoke(main, ["report", "--store", str(history), "--out", str(tmp_path / "r")])
    uri = (tmp_path / "r" / "index.html").as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run([BROWSER, *flags, "--dump-dom", uri], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    for step in (0, 1, 2):
        assert f"step {step}" in dom
    assert "dots-disc" in dom and "solid-disc" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([BROWSER, *flags, f"--screenshot={shot}", "--window-size=1200,2400", uri],
                   capture_output=True, timeout=120, check=True)
    assert np.asarray(Image.open(shot).convert("L")).std() > 5
