"""``ciss serve --collect DIR`` (#31 item 2): what is kept and why, the folder format readers
rely on, caps, de-duplication, atomic writes, and a collector failure never failing a
request (real server over loopback); ``ciss collect show``; ``store verify`` knows the folder."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from ciss import failpoints
from ciss.analysis.tolerances import GateThresholds
from ciss.cli import main
from ciss.data.collection import FORMAT, is_collection, items, read_meta, summarise
from ciss.runtime.collect import Collector, CollectPolicy, Scored, phash
from ciss.runtime.server import ServeConfig, background
from ciss.runtime.slot import SwapPolicy
from ciss.store import Store
from ciss.store.verify import verify_store
from tests.test_server import _png, _wait

LOOSE_GATE = GateThresholds(max_mean_drop=100, max_class_drop=100)
LOOSE = SwapPolicy(gate=LOOSE_GATE)
PNG = {"Content-Type": "image/png"}
KEYS = {"id", "received_at", "step", "engine", "classes", "scores", "reason", "phash", "size",
        "pooled"}


class _Cal:
    novelty_threshold = 2.0
    uncertainty_threshold = 0.5


def _picture(seed: int, size=(24, 32)) -> np.ndarray:
    """Smooth distinct images (random noise would hash alike after the 32x32 shrink)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (3, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size[::-1], Image.BILINEAR))


def _scored(seed: int, novelty=0.0, uncertainty=0.1, image=None) -> Scored:
    image = _picture(seed) if image is None else image
    labels = (np.arange(image.shape[1])[None] % 3).repeat(image.shape[0], 0).astype(np.uint8)
    return Scored(image, labels, {"uncertainty": uncertainty, "novelty": novelty,
                                  "novel_share": 0.1, "largest_region": 0.05,
                                  "pooled": [0.5, 0.3, 0.2]},
                  step=1, engine="onnx", classes=["background", "a", "b"], calibration=_Cal(),
                  received_at=dt.datetime.now(dt.timezone.utc))


def test_items_are_kept_by_reason_in_the_documented_format(tmp_path):
    folder = tmp_path / "col"
    c = Collector(CollectPolicy(folder, random_share=0.0, seed=0))
    assert json.loads((folder / "collection.json").read_text()) == {"format": FORMAT}
    novel = _scored(1, novelty=3.0, uncertainty=0.9)  # both: novelty is the reason given
    assert c.consider(novel) == "kept_novelty"
    assert c.consider(_scored(2, uncertainty=0.9)) == "kept_uncertainty"
    assert c.consider(_scored(3)) == "not_selected"
    assert c.consider(_scored(4, novelty=3.0, image=novel.image.copy())) == "duplicate"
    kept = items(folder)
    assert len(kept) == 2 and not list(folder.glob(".tmp-*"))
    meta = read_meta(kept[0])
    assert set(meta) == KEYS and meta["reason"] == "novelty" and meta["size"] == [24, 32]
    assert meta["id"] == kept[0].name and meta["step"] == 1 and meta["engine"] == "onnx"
    assert meta["scores"] == {"uncertainty": 0.9, "novelty": 3.0, "novel_share": 0.1,
                              "largest_region": 0.05}
    assert int(meta["phash"], 16) == phash(novel.image)
    assert dt.datetime.fromisoformat(meta["received_at"]).utcoffset() == dt.timedelta(0)
    img = Image.open(kept[0] / "image.png")
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), novel.image)
    pred = Image.open(kept[0] / "prediction.png")
    assert pred.mode in ("L", "P")
    np.testing.assert_array_equal(np.asarray(pred), novel.labels)
    # a random share of 1 keeps ordinary images, as 'random'
    r = Collector(CollectPolicy(tmp_path / "r", random_share=1.0))
    assert r.consider(_scored(5)) == "kept_random"
    # a restarted server takes the hashes up again: the same image is still a duplicate
    again = Collector(CollectPolicy(folder, random_share=0.0))
    assert again.consider(_scored(6, novelty=3.0, image=novel.image)) == "duplicate"


def test_caps_per_minute_and_disk(tmp_path):
    c = Collector(CollectPolicy(tmp_path / "m", per_minute=2, random_share=1.0))
    out = [c.consider(_scored(i)) for i in range(4)]
    assert out == ["kept_random", "kept_random", "cap_minute", "cap_minute"]
    d = Collector(CollectPolicy(tmp_path / "d", max_mb=0.0005, random_share=1.0))
    assert [d.consider(_scored(i)) for i in range(3)] == ["kept_random", "cap_disk",
                                                         "cap_disk"]
    assert len(items(tmp_path / "d")) == 1


@pytest.mark.parametrize("point", ["collect.item.staging", "collect.item.staged"])
def test_a_failed_write_leaves_no_half_item(tmp_path, point):
    c = Collector(CollectPolicy(tmp_path / "f", random_share=1.0))
    failpoints.configure(f"{point}:enospc")
    try:
        with pytest.raises(OSError):
            c.consider(_scored(1))
    finally:
        failpoints.configure("")
    assert items(tmp_path / "f") == [] and not list((tmp_path / "f").glob(".tmp-*"))
    assert c.consider(_scored(1)) == "kept_random"  # the same image, not taken as held


def _outcomes(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("ciss_collect_total{"):
            out[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return out


def test_server_collects_and_a_broken_folder_never_fails_a_request(served):
    store = Store(served)
    folder = served / "collected"  # inside the store: a known folder, never a problem
    policy = CollectPolicy(folder, random_share=1.0, per_minute=1000, max_distance=0)
    images = [_picture(i, (40, 48)) for i in range(12)]
    with background(ServeConfig(store=served, policy=LOOSE, collect=policy)) as (url, _):
        def send(i: int) -> None:
            r = httpx.post(f"{url}/v1/segment?format=json", content=_png(images[i]), headers=PNG)
            assert r.status_code == 200, r.text

        for i in range(3):
            send(i)
        _wait(lambda: len(items(folder)) == 3)
        metas = [read_meta(p) for p in items(folder)]
        assert {m["reason"] for m in metas} <= {"novelty", "uncertainty", "random"}
        assert all(m["classes"] == store.card(0).classes and m["step"] == 0 for m in metas)
        assert all(m["scores"]["novelty"] is not None for m in metas)  # calibrated step

        report = verify_store(store)
        assert report.to_json()["ok"], [p.line() for p in report.problems]
        assert report.known == [{"path": str(folder), "kind": "collection", "items": 3,
                                 "bytes": report.known[0]["bytes"]}]
        res = CliRunner().invoke(main, ["store", "verify", "--store", str(served)])
        assert res.exit_code == 0 and "a 'ciss serve --collect' collection, 3 item" in \
            res.output, res.output

        shutil.rmtree(folder)  # removed mid-run: answered as before, then collected again
        send(3)
        _wait(lambda: len(items(folder)) == 1)
        assert is_collection(folder)

        failpoints.configure("collect.item.staged:enospc")  # the disk fills up once
        try:
            send(4)
            _wait(lambda: _outcomes(url).get("failed") == 1)
        finally:
            failpoints.configure("")
        shutil.rmtree(folder)
        folder.write_text("not a folder")  # every write fails now
        for i in range(5, 8):
            send(i)
        _wait(lambda: _outcomes(url).get("failed") == 4)
        status = httpx.get(f"{url}/v1/status").json()["scores"]
        assert status["outcomes"]["failed"] == 4 and status["last_error"]
        assert httpx.get(f"{url}/v2/health/ready").status_code == 200
        folder.unlink()
        send(8)
        _wait(lambda: len(items(folder)) == 1)
    events = [e for e in store.events() if e["kind"] == "collecting"]
    assert events and events[-1]["folder"] == str(folder.resolve()) and events[-1]["step"] == 0
    from ciss.analysis.overview import build_overview, render_overview

    page = render_overview(build_overview(store))  # the store page's contact sheet
    assert "Collected from live traffic" in page and "1 image(s)" in page
    assert page.count("<figure") == 1 and "data:image/png;base64," in page


def test_collect_show_summarises(tmp_path):
    folder = tmp_path / "col"
    c = Collector(CollectPolicy(folder, random_share=0.0))
    for i, (nov, unc) in enumerate([(3.0, 0.1), (4.0, 0.1), (0.0, 0.9)]):
        c.consider(_scored(i, novelty=nov, uncertainty=unc))
    doc = summarise(folder)
    assert doc["items"] == 3 and doc["reasons"] == {"novelty": 2, "uncertainty": 1}
    assert doc["steps"] == {"1 (onnx)": 3}
    assert doc["predicted_classes"] == {"a": 3, "b": 3}
    assert sum(doc["histograms"]["novelty"]["counts"]) == 3
    res = CliRunner().invoke(main, ["collect", "show", str(folder)])
    assert res.exit_code == 0, res.output
    assert "3 image(s)" in res.output and "novelty 2, uncertainty 1" in res.output
    res = CliRunner().invoke(main, ["collect", "show", str(folder), "--json"])
    assert json.loads(res.output)["items"] == 3
    res = CliRunner().invoke(main, ["collect", "show", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a collection" in res.output


def test_phash_is_the_dct_hash_and_survives_a_resave():
    fft = pytest.importorskip("scipy.fft")
    from ciss.runtime.collect import _DCT

    x = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    assert np.allclose(_DCT @ x @ _DCT.T, fft.dctn(x, norm="ortho"), atol=1e-4)
    data = pytest.importorskip("skimage.data")
    img = data.chelsea()
    jpeg = io.BytesIO()
    Image.fromarray(img).save(jpeg, format="JPEG", quality=85)
    again = np.asarray(Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB"))
    from ciss.runtime.collect import hamming

    assert hamming(phash(img), phash(again)) <= 4  # a re-encoded copy is a duplicate
    assert hamming(phash(img), phash(data.astronaut())) > 4
