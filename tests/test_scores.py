"""Per-request scores (#31 item 1): computed from the served run's own logits, calibrated on
the retention sets at deploy (a step artifact through the card rewrite), shown per request in
/v1/segment JSON, X-Ciss-Scores and OIP response parameters, and in /metrics histograms."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from ciss.analysis.tolerances import GateThresholds
from ciss.engines.load import load_engine
from ciss.runtime import scoring
from ciss.runtime.server import ServeConfig, background
from ciss.runtime.slot import SwapPolicy
from ciss.store import Store
from ciss.store.verify import verify_store
from tests.test_server import _image, _png, _wait

LOOSE_GATE = GateThresholds(max_mean_drop=100, max_class_drop=100)
LOOSE = SwapPolicy(gate=LOOSE_GATE)
PNG = {"Content-Type": "image/png"}


def _logits(k: int, h: int, w: int, seed: int, hole=None) -> np.ndarray:
    """Confident logits (class by column band, max logit ~8); ``hole`` = (y0, y1, x0, x1)
    gets flat logits (low max logit, high entropy): what an unseen object looks like."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 0.3, (k, h, w)).astype(np.float32)
    cls = (np.arange(w) * k // w)[None].repeat(h, 0)
    np.put_along_axis(x, cls[None], 8 + rng.normal(0, 0.3, (1, h, w)).astype(np.float32), 0)
    if hole is not None:
        y0, y1, x0, x1 = hole
        x[:, y0:y1, x0:x1] = rng.normal(0, 0.3, (k, y1 - y0, x1 - x0))
    return x


@pytest.mark.parametrize("signal", scoring.SIGNALS)
def test_novel_region_scores_past_the_calibrated_thresholds(signal):
    k, h, w = 4, 48, 64
    retention = [_logits(k, h, w, s) for s in range(12)]
    it = iter(retention)
    cal = scoring.calibrate(lambda x: next(it)[None], [np.zeros((h, w, 3), np.uint8)] * 12,
                            ["background", "a", "b", "c"], signal=signal)
    assert cal.signal == signal and cal.images == 12
    plain = scoring.score_logits(_logits(k, h, w, 99), cal)
    odd = scoring.score_logits(_logits(k, h, w, 98, hole=(10, 30, 20, 44)), cal)
    # the flat 20x24 block is 15.6 % of the image: it is novel, uncertain and one region
    assert odd["novelty"] > cal.novelty_threshold >= plain["novelty"]
    assert odd["uncertainty"] > cal.uncertainty_threshold >= plain["uncertainty"]
    assert 0.15 <= odd["novel_share"] <= 0.25 and plain["novel_share"] < 0.1
    assert odd["largest_region"] >= 0.15 and odd["largest_region"] <= odd["novel_share"]
    assert scoring.unusual(odd, cal) == ["novelty", "uncertainty"]
    assert scoring.unusual(plain, cal) == []
    assert len(odd["pooled"]) == k and abs(sum(odd["pooled"]) - 1) < 1e-3
    # uncalibrated: uncertainty only; a calibration of other classes is not applied
    bare = scoring.score_logits(_logits(k, h, w, 98, hole=(10, 30, 20, 44)), None)
    assert bare["uncertainty"] == odd["uncertainty"] and bare["novelty"] is None
    assert scoring.score_logits(_logits(k + 1, h, w, 1), cal)["novelty"] is None


def test_uncertainty_is_normalised_entropy():
    flat = np.zeros((5, 8, 8), np.float32)
    sure = np.full((5, 8, 8), -50, np.float32)
    sure[2] = 50
    assert scoring.score_logits(flat, None)["uncertainty"] == pytest.approx(1.0, abs=1e-5)
    assert scoring.score_logits(sure, None)["uncertainty"] == pytest.approx(0.0, abs=1e-5)


def test_deploy_stores_the_calibration_through_the_card_and_the_server_scores(served):
    store = Store(served)
    name = scoring.artifact_name("onnx")
    card = store.card(0)
    assert name in card.artifacts  # recorded on the card, so verified like any artifact
    assert store.card_state(0).status == "ok"
    assert verify_store(store).to_json()["ok"]
    cal = scoring.stored_calibration(store, 0, "onnx")
    assert cal is not None and cal.classes == card.classes and cal.step == 0
    assert cal.images >= 1 and cal.engine == "onnx"

    img = _image(3, (37, 53))
    engine = load_engine(store, 0, "onnx")
    logits = engine.run(np.ascontiguousarray(img.transpose(2, 0, 1)[None]))["logits"][0]
    expected = scoring.public(scoring.score_logits(logits, cal))
    assert all(expected[k] is not None for k in scoring.SCORE_KEYS)
    batch = np.stack([img.transpose(2, 0, 1), _image(4, (37, 53)).transpose(2, 0, 1)])
    with background(ServeConfig(store=served, policy=LOOSE)) as (url, app):
        r = httpx.post(f"{url}/v1/segment?format=json", content=_png(img),
                       headers={"Content-Type": "image/png"})
        doc = r.json()
        got = {k: doc["scores"][k] for k in scoring.SCORE_KEYS}
        assert got == expected  # the same numbers as the engine's own logits give
        assert isinstance(doc["scores"]["unusual"], list)
        r = httpx.post(f"{url}/v1/segment", content=_png(img),
                       headers={"Content-Type": "image/png"})
        assert r.headers["content-type"] == "image/png"
        assert json.loads(r.headers["x-ciss-scores"])["novelty"] == expected["novelty"]
        # OIP: only labels asked for, yet scored from the same run's logits
        req = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(batch.shape),
                           "data": batch.ravel().tolist()}],
               "outputs": [{"name": "labels"}]}
        r = httpx.post(f"{url}/v2/models/ciss/infer", json=req)
        assert r.status_code == 200, r.text
        res = r.json()
        assert [o["name"] for o in res["outputs"]] == ["labels"]
        per_image = json.loads(res["parameters"]["ciss_scores"])
        assert len(per_image) == 2 and res["parameters"]["ciss_step"] == 0
        assert {k: per_image[0][k] for k in scoring.SCORE_KEYS} == expected
        status = httpx.get(f"{url}/v1/status").json()["scores"]
        assert status["calibrated"] is True
        # histograms are filled by the worker thread: 4 images scored
        _wait(lambda: "ciss_score_uncertainty_count 4.0" in httpx.get(f"{url}/metrics").text)
        text = httpx.get(f"{url}/metrics").text
        for key in scoring.SCORE_KEYS:
            assert f"ciss_score_{key}_count 4.0" in text


def test_no_scores_answers_as_before_and_a_step_without_calibration_is_measured_at_load(
        served):
    store = Store(served)
    store.remove_artifacts(0, [scoring.artifact_name("onnx")])
    img = _image(5)
    with background(ServeConfig(store=served, policy=LOOSE, scores=False)) as (url, _):
        doc = httpx.post(f"{url}/v1/segment?format=json", content=_png(img),
                           headers=PNG).json()
        assert "scores" not in doc
        assert httpx.get(f"{url}/v1/status").json()["scores"] is None
    with background(ServeConfig(store=served, policy=LOOSE)) as (url, app):
        doc = httpx.post(f"{url}/v1/segment?format=json", content=_png(img),
                           headers=PNG).json()
        assert doc["scores"]["novelty"] is not None  # calibrated in memory at load
        assert app.state.slot.current.calibration is not None
    assert scoring.artifact_name("onnx") not in store.card(0).artifacts  # the server wrote none


def test_largest_region_matches_scipy_8_connectivity():
    """The run-time labelling (no scipy) against scipy's, on random masks and a snake."""
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    masks = [rng.random((int(rng.integers(1, 50)), int(rng.integers(1, 50)))) < rng.random()
             for _ in range(100)]
    snake = np.zeros((31, 31), bool)
    snake[::2] = True
    snake[1::4, -1] = True
    snake[3::4, 0] = True
    for m in [*masks, snake, np.zeros((3, 3), bool)]:
        lab, n = ndimage.label(m, structure=np.ones((3, 3), bool))
        want = int(np.bincount(lab.ravel())[1:].max()) if n else 0
        assert scoring.largest_region(m) == want
    assert scoring.largest_region(snake) == snake.sum()


def test_non_finite_logits_give_finite_scores_and_a_failure_gives_none(monkeypatch):
    """An fp16 engine can overflow: NaN would make the JSON response a 500."""
    x = _logits(4, 32, 32, 0, hole=(4, 12, 4, 12))
    cal = scoring.calibrate(lambda im: x[None], [np.zeros((32, 32, 3), np.uint8)],
                            ["background", "a", "b", "c"])
    x[1, 0, 0], x[2, 5, 5], x[0, 9, 9] = np.inf, -np.inf, np.nan
    out = scoring.score_logits(x, cal)
    assert all(np.isfinite(out[k]) for k in scoring.SCORE_KEYS)
    monkeypatch.setattr(scoring, "score_logits", lambda *a: 1 / 0)
    assert scoring.safe_scores(x, cal) is None
