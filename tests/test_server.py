"""``ciss serve`` over real HTTP on loopback: OIP v2 (tritonclient), PNG masks, hot swap, gate."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from ciss.analysis.tolerances import GateThresholds
from ciss.engines.load import load_engine
from ciss.runtime.deploy import deploy
from ciss.runtime.server import ServeConfig, background
from ciss.runtime.slot import SwapPolicy
from ciss.store import Store
from tests.conftest import free_port

LOOSE_GATE = GateThresholds(max_mean_drop=100, max_class_drop=100)
LOOSE = SwapPolicy(gate=LOOSE_GATE)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image(seed: int = 0, size=(40, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_tritonclient_speaks_to_ciss_serve(served):
    """A stock Triton HTTP client: health, metadata, binary and JSON inference."""
    import tritonclient.http as httpclient

    store = Store(served)
    batch = np.stack([_image(i, (32, 40)).transpose(2, 0, 1) for i in range(2)])
    expected = load_engine(store, 0, "onnx").run(batch)
    with background(ServeConfig(store=served, policy=LOOSE)) as (url, _):
        client = httpclient.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("ciss") and client.is_model_ready("ciss", "1")
        assert not client.is_model_ready("ciss", "2")
        meta = client.get_model_metadata("ciss")
        assert meta["versions"][0] == "1" and meta["parameters"]["step"] == 0
        assert meta["inputs"][0] == {"name": "image", "datatype": "UINT8",
                                     "shape": [-1, 3, -1, -1]}
        for binary in (True, False):
            inp = httpclient.InferInput("image", list(batch.shape), "UINT8")
            inp.set_data_from_numpy(batch, binary_data=binary)
            outs = [httpclient.InferRequestedOutput("labels", binary_data=binary),
                    httpclient.InferRequestedOutput("logits", binary_data=binary)]
            res = client.infer("ciss", [inp], outputs=outs, request_id="r1")
            assert res.get_response()["id"] == "r1"
            np.testing.assert_array_equal(res.as_numpy("labels"), expected["labels"])
            np.testing.assert_allclose(res.as_numpy("logits"), expected["logits"], atol=1e-5)
        # no outputs named: the client asks for every output in binary
        inp = httpclient.InferInput("image", list(batch.shape), "UINT8")
        inp.set_data_from_numpy(batch)
        res = client.infer("ciss", [inp], model_version="1", request_compression_algorithm="gzip")
        np.testing.assert_array_equal(res.as_numpy("labels"), expected["labels"])
        with pytest.raises(Exception, match="version 7 is not served"):
            client.infer("ciss", [inp], model_version="7")
        client.close()


def test_segment_png_and_json_at_input_size(served):
    store = Store(served)
    img = _image(3, (37, 53))
    engine = load_engine(store, 0, "onnx")
    expected = engine.run(img.transpose(2, 0, 1)[None])["labels"][0]
    with background(ServeConfig(store=served, policy=LOOSE)) as (url, _):
        r = httpx.post(f"{url}/v1/segment", content=_png(img),
                       headers={"Content-Type": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-ciss-step"] == "0"
        mask = Image.open(io.BytesIO(r.content))
        assert mask.mode == "P" and mask.size == (53, 37)
        np.testing.assert_array_equal(np.asarray(mask), expected)
        r = httpx.post(f"{url}/v1/segment?format=json", content=_png(img),
                       headers={"Content-Type": "application/octet-stream"})
        doc = r.json()
        assert (doc["width"], doc["height"], doc["step"]) == (53, 37, 0)
        np.testing.assert_array_equal(np.array(doc["labels"], dtype=np.uint8), expected)
        assert sum(doc["pixels"].values()) == 37 * 53


def _bad_requests(url: str) -> list[tuple[str, str, dict, bytes, int]]:
    png = {"Content-Type": "image/png"}
    good = _png(_image(1, (16, 16)))
    big = _png(np.zeros((1100, 1000, 3), np.uint8))  # 1.1 Mpx > the 1 Mpx test limit
    oip = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 3, 8, 8],
                       "data": [0] * 192}]}

    def infer(doc) -> bytes:
        return json.dumps(doc).encode()

    wrong_type = json.loads(json.dumps(oip))
    wrong_type["inputs"][0]["datatype"] = "FP32"
    short = json.loads(json.dumps(oip))
    short["inputs"][0]["data"] = [0] * 10
    out_of_range = json.loads(json.dumps(oip))
    out_of_range["inputs"][0]["data"] = [300] * 192
    bad_shape = json.loads(json.dumps(oip))
    bad_shape["inputs"][0]["shape"] = [1, 8, 8]
    bad_shape["inputs"][0]["data"] = [0] * 64
    unknown_out = dict(oip, outputs=[{"name": "probabilities"}])
    bomb = gzip.compress(b"{" + b" " * (3 << 20) + b"}")
    i = f"{url}/v2/models/ciss/infer"
    return [
        ("POST", f"{url}/v1/segment", png, b"this is not an image", 400),
        ("POST", f"{url}/v1/segment", png, good[: len(good) // 2], 400),
        ("POST", f"{url}/v1/segment", png, b"", 400),
        ("POST", f"{url}/v1/segment", png, _png(np.zeros((1, 1, 3), np.uint8)), 422),
        ("POST", f"{url}/v1/segment", png, big, 413),
        ("POST", f"{url}/v1/segment", {"Content-Type": "text/plain"}, good, 415),
        ("POST", f"{url}/v1/segment", {}, good, 415),
        ("POST", f"{url}/v1/segment?format=xml", png, good, 400),
        ("POST", f"{url}/v1/segment", png, b"\0" * (2 << 20), 413),
        ("POST", i, {}, b"{not json", 400),
        ("POST", i, {}, b"[]", 400),
        ("POST", i, {}, b"", 400),
        ("POST", i, {}, infer(wrong_type), 400),
        ("POST", i, {}, infer(short), 400),
        ("POST", i, {}, infer(out_of_range), 400),
        ("POST", i, {}, infer(bad_shape), 400),
        ("POST", i, {}, infer(unknown_out), 400),
        ("POST", i, {"Inference-Header-Content-Length": "999999"}, infer(oip), 400),
        ("POST", i, {"Content-Type": "image/png"}, good, 415),
        ("POST", i, {"Content-Encoding": "gzip"}, bomb, 413),
        ("POST", f"{url}/v2/models/other/infer", {}, infer(oip), 404),
        ("GET", f"{url}/v2/models/ciss/versions/9", {}, b"", 404),
        ("GET", f"{url}/nowhere", {}, b"", 404),
        ("POST", f"{url}/admin/reload", {}, b"", 403),
    ]


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(served):
    config = ServeConfig(store=served, policy=LOOSE, max_body_bytes=1 << 20,
                         max_pixels=1_000_000)
    with background(config) as (url, _):
        for method, where, headers, body, status in _bad_requests(url):
            r = httpx.request(method, where, headers=headers, content=body)
            assert r.status_code == status, (where, headers, body[:40], r.text)
            assert isinstance(r.json()["error"], str) and r.json()["error"], r.text
        r = httpx.post(f"{url}/v1/segment", content=_png(_image()),
                       headers={"Content-Type": "image/png"})
        assert r.status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'ciss_request_failures_total{endpoint="v1_segment",reason="too_large"}' in metrics


def test_hot_swap_under_load_refusals_and_metrics(served):
    """Clients never see an error while the server swaps 0 -> 1; bad deployments are refused."""
    from prometheus_client.parser import text_string_to_metric_families

    store = Store(served)
    policy = SwapPolicy(gate=LOOSE_GATE)
    config = ServeConfig(store=served, policy=policy, poll_s=0.1)
    with background(config) as (url, app):
        failures, steps, stop = [], set(), threading.Event()

        def client() -> None:
            body = _png(_image(5, (32, 32)))
            with httpx.Client() as c:
                while not stop.is_set():
                    r = c.post(f"{url}/v1/segment", content=body,
                               headers={"Content-Type": "image/png"})
                    if r.status_code != 200:
                        failures.append(r.text)
                    steps.add(r.headers.get("x-ciss-step"))

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        deploy(store, 1, "onnx", thresholds=LOOSE_GATE)
        _wait(lambda: app.state.slot.current.step == 1)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        assert not failures and steps == {"0", "1"}
        assert httpx.get(f"{url}/v2/models/ciss").json()["versions"][:2] == ["2", "1"]

        # A tampered engine named in deployed.json: refused, the old engine keeps serving.
        onnx = store.step_dir(2) / "model.onnx"
        original = onnx.read_bytes()
        onnx.write_bytes(original[:-10] + b"0123456789")
        deploy_record = dict(store.deployed(), step=2)
        store.write_deployed(deploy_record)
        _wait(lambda: app.state.slot.last_error is not None)
        status = httpx.get(f"{url}/v1/status").json()
        assert status["step"] == 1 and "model.onnx" in status["last_error"]

        # A step that fails the gate (forced past it): refused unless --accept-forced.
        onnx.write_bytes(original)
        # every old class "regressed": the gate must refuse
        policy.gate = GateThresholds(max_mean_drop=-100)
        store.write_deployed(dict(store.deployed(), step=2, forced=True))
        _wait(lambda: "retention gate" in (app.state.slot.last_error or ""))
        assert httpx.get(f"{url}/v1/status").json()["step"] == 1
        text = httpx.get(f"{url}/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("ciss_model_swaps_total", (("outcome", "refused"),))] >= 2
    assert samples[("ciss_model_swaps_total", (("outcome", "swapped"),))] == 2
    assert samples[("ciss_served_step", ())] == 1
    assert samples[("ciss_gate_runs_total", (("result", "failed"),))] >= 1
    assert samples[("ciss_requests_total", (("code", "200"), ("endpoint", "v1_segment")))] > 3


def test_admin_endpoints_need_the_token(served):
    store = Store(served)
    deploy(store, 1, "onnx", thresholds=LOOSE_GATE)
    config = ServeConfig(store=served, policy=SwapPolicy(gate=LOOSE_GATE),
                         admin_token="s3cret", poll_s=60)
    with background(config) as (url, app):
        assert app.state.slot.current.step == 1
        assert httpx.post(f"{url}/admin/rollback").status_code == 401
        r = httpx.post(f"{url}/admin/rollback", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 403 and r.json()["error"] == "wrong admin token"
        auth = {"Authorization": "Bearer s3cret"}
        r = httpx.post(f"{url}/admin/rollback", headers=auth)
        assert r.status_code == 200 and r.json()["serving_step"] == 0  # no wait for the poll
        assert store.deployed()["rolled_back_from"] == 1
        r = httpx.post(f"{url}/admin/deploy", headers=auth, content=b"[1]")
        assert r.status_code == 400
        app.state.slot.policy.gate = GateThresholds(max_mean_drop=-100)
        r = httpx.post(f"{url}/admin/deploy", headers=auth, json={"step": 2})
        assert r.status_code == 409 and "step 2 refused" in r.json()["error"]
        assert store.deployed()["step"] == 0 and app.state.slot.current.step == 0


def test_cli_serve_starts_answers_and_stops_gracefully(served, tmp_path):
    import signal
    import subprocess
    import sys

    from click.testing import CliRunner

    from ciss.cli import main

    empty = tmp_path / "empty"
    res = CliRunner().invoke(main, ["serve", "--store", str(empty)])
    assert res.exit_code == 2 and "no store at" in res.output and not empty.exists()
    empty.mkdir()
    res = CliRunner().invoke(main, ["serve", "--store", str(empty)])
    assert res.exit_code == 2 and "nothing deployed" in res.output
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ciss", "serve", "--store", str(served),
                             "--port", str(port), "--max-mean-drop", "100",
                             "--max-class-drop", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        _wait(up, timeout=60)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/segment", content=_png(_image()),
                       headers={"Content-Type": "image/png"})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # uvicorn drains requests, runs the shutdown hooks, then re-raises SIGTERM (exit -15).
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "serving step 0" in out and "shut down cleanly" in out


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_a_provider_that_does_not_load_is_refused_at_start(served):
    """onnxruntime falls back to CPU silently; the server checks what actually loaded."""
    import onnxruntime as ort

    from ciss.errors import CissError
    from ciss.runtime.server import create_app

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the fallback cannot be provoked here")
    config = ServeConfig(store=served, policy=SwapPolicy(
        providers=["CUDAExecutionProvider", "CPUExecutionProvider"], gate=LOOSE_GATE))
    with pytest.raises(CissError, match="requested CUDAExecutionProvider but ONNX Runtime "
                                        "loaded only CPUExecutionProvider"):
        create_app(config)


def test_a_missing_or_broken_deployed_json_is_refused_once_and_serving_goes_on(served):
    from ciss.runtime.metrics import ServerMetrics
    from ciss.runtime.slot import ModelSlot

    metrics = ServerMetrics.create()
    slot = ModelSlot(Store(served), LOOSE, metrics)
    assert slot.start().step == 0
    (served / "deployed.json").unlink()
    first = slot.refresh()
    assert first.outcome == "refused" and "nothing deployed" in first.reason
    assert slot.refresh().outcome == "unchanged"  # not refused (and logged) on every poll
    (served / "deployed.json").write_text("{broken")
    assert "not valid JSON" in slot.refresh().reason
    assert slot.current.step == 0
    assert metrics.registry.get_sample_value("ciss_model_swaps_total",
                                             {"outcome": "refused"}) == 2


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_segment_decodes_every_image_kind_at_its_displayed_size(served):
    """Grey, RGBA, palette, 16-bit and EXIF-rotated inputs: a mask of the displayed size each."""
    rgb = Image.fromarray(_image(7, (24, 40)))  # 40 wide, 24 high
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees: 24 wide, 40 high
    kinds = {
        "grey": (_encoded(rgb.convert("L"), "PNG"), (40, 24)),
        "rgba": (_encoded(rgb.convert("RGBA"), "PNG"), (40, 24)),
        "palette": (_encoded(rgb.convert("P"), "PNG"), (40, 24)),
        "16-bit": (_encoded(Image.fromarray(np.full((24, 40), 40000, np.uint16)), "PNG"),
                   (40, 24)),
        "exif-rotated": (_encoded(rgb, "JPEG", exif=exif), (24, 40)),
    }
    with background(ServeConfig(store=served, policy=LOOSE)) as (url, _):
        for kind, (body, size) in kinds.items():
            r = httpx.post(f"{url}/v1/segment", content=body,
                           headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 200, (kind, r.text)
            assert Image.open(io.BytesIO(r.content)).size == size, kind


def test_the_start_up_gate_reuses_deploys_result_only_for_the_same_everything(story, tmp_path,
                                                                             monkeypatch):
    """Same files, engine, device, tolerances and resize: deploy's recorded result serves, no
    retention image is scored again; change any of them and the gate runs."""
    from ciss.runtime.metrics import ServerMetrics
    from ciss.runtime.slot import ModelSlot

    root = tmp_path / "store"
    shutil.copytree(story, root)
    store = Store(root)
    deploy(store, 1, "onnx")  # the gate passes mib at the defaults (tests/test_gate.py)
    runs = []
    import ciss.runtime.gate as gate_mod

    original = gate_mod.run_gate

    def counted(*a, **k):
        runs.append(1)
        return original(*a, **k)

    monkeypatch.setattr(gate_mod, "run_gate", counted)  # the slot imports it when it loads
    metrics = ServerMetrics.create()
    served = ModelSlot(store, SwapPolicy(), metrics).start()
    assert runs == [] and served.gate["passed"] and served.step == 1
    assert metrics.registry.get_sample_value("ciss_gate_runs_total",
                                             {"result": "reused-passed"}) == 1
    ModelSlot(store, SwapPolicy(gate=GateThresholds(max_mean_drop=6.0)),
              ServerMetrics.create()).start()
    assert runs == [1]  # other tolerances: scored again
    ModelSlot(store, SwapPolicy(), ServerMetrics.create(), max_side=512).start()
    assert runs == [1, 1]  # another serving resize
    from ciss.exporters.export import export_step

    export_step(store, 1, ["int8"])  # the step's files changed
    ModelSlot(store, SwapPolicy(), ServerMetrics.create()).start()
    assert runs == [1, 1, 1]
