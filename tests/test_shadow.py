"""Retention watched on live traffic: over real HTTP, a forgetting step forced live is rolled
back by the server itself; a retaining step serves a long stream without an alarm."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request

import numpy as np
import pytest

from ciss.data.folder import open_folder
from ciss.runtime.deploy import deploy
from ciss.runtime.server import ServeConfig, background
from ciss.runtime.shadow import ShadowPolicy, compare
from ciss.runtime.slot import SwapPolicy
from ciss.store import Store

WATCH = ShadowPolicy(rate=1.0, window=10, min_agreement=0.5, min_pixels=50,
                     auto_rollback=True)


def test_compare_by_hand():
    ref = np.array([[1, 1, 2, 2], [0, 0, 1, 2]])
    served = np.array([[1, 0, 2, 3], [0, 0, 3, 1]])  # 3 = a new class (k_ref = 3)
    s = compare(ref, served, k_ref=3)
    assert s.pixels.tolist() == [2, 3, 3]
    assert s.kept.tolist() == [2, 1, 1]
    assert s.to_background.tolist() == [0, 1, 0]
    assert s.to_new.tolist() == [0, 1, 1]  # class 2's third pixel went to old class 1


def post(url: str, body: bytes) -> int:
    req = urllib.request.Request(url + "/v1/segment", data=body,
                                 headers={"Content-Type": "image/png"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/status", timeout=60) as r:
        return json.loads(r.read())


@pytest.fixture
def live(story, synthetic_dir, tmp_path):
    """A store serving step 0 (the base), and the val images users would send."""
    root = tmp_path / "store"
    shutil.copytree(story, root)
    deploy(Store(root), 0, "onnx")
    folder = open_folder(synthetic_dir)
    images = [folder.images[s].read_bytes() for s in folder.val]
    return root, images


def stream(url, images, until, limit_s=120.0):
    codes = []
    deadline = time.monotonic() + limit_s
    i = 0
    while time.monotonic() < deadline and not until():
        codes.append(post(url, images[i % len(images)]))
        i += 1
    return codes


def test_a_forgetting_step_forced_live_is_rolled_back_by_the_server(live):
    root, images = live
    config = ServeConfig(store=root, poll_s=0.1, shadow=WATCH,
                         policy=SwapPolicy(accept_forced=True))
    with background(config) as (url, _):
        deploy(Store(root), 2, "onnx", force=True)  # ft: forgets every old class
        codes = stream(url, images, lambda: status(url)["step"] == 2)
        assert status(url)["step"] == 2  # the forced step went live...
        codes += stream(url, images, lambda: status(url)["step"] == 0)
        doc = status(url)
    assert doc["step"] == 0, doc  # ...and the server rolled it back by itself
    assert set(codes) == {200}, codes  # no request failed across the rollback
    record = json.loads((root / "deployed.json").read_text())
    assert record["rolled_back_from"] == 2 and "agreement" in record["reason"]
    kinds = [e["kind"] for e in Store(root).events()]
    assert "alarm" in kinds and kinds[-1] == "rolled_back"
    # the alarm came within one window of shadowed requests
    assert "ALARM" in doc["shadow"]["status"] and doc["shadow"]["samples"] <= WATCH.window


def test_a_retaining_step_serves_a_long_stream_without_alarm(live):
    root, images = live
    with background(ServeConfig(store=root, poll_s=0.1, shadow=WATCH)) as (url, app):
        deploy(Store(root), 1, "onnx")  # mib keeps its old classes
        stream(url, images, lambda: status(url)["step"] == 1)
        codes = stream(url, images, lambda: False, limit_s=8.0)
        doc = status(url)
        metrics = urllib.request.urlopen(url + "/metrics", timeout=60).read().decode()
    assert set(codes) == {200} and doc["step"] == 1
    shadow = doc["shadow"]
    assert shadow["parent"] == 0 and shadow["samples"] >= WATCH.window
    assert "ALARM" not in shadow["status"]
    agreements = [c["agreement"] for c in shadow["classes"].values() if c["agreement"]]
    assert agreements and min(agreements) >= WATCH.min_agreement
    assert "ciss_shadow_samples_total" in metrics and "ciss_shadow_agreement{" in metrics
