"""The TensorRT engine's logic without a GPU: a fake of the TensorRT runtime API it calls."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from ciss.engines import tensorrt as trt_mod
from ciss.engines.tensorrt import OutOfProfile, Profile, TensorRTEngine, choose_plan
from ciss.errors import CheckFailed


class FakeContext:
    """Writes logits whose argmax is known: class (h + w) % 3 at pixel (h, w)."""

    def __init__(self, log):
        self.log = log
        self.busy = False
        self.shape = None
        self.addresses = {}

    def set_input_shape(self, name, shape):
        self.shape = shape
        return shape[2] != 999  # a shape the (fake) plan refuses

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def _write(self):
        import ctypes

        n, _, h, w = self.shape
        buf = np.ctypeslib.as_array((ctypes.c_float * (n * 3 * h * w)).from_address(
            self.addresses["logits"])).reshape(n, 3, h, w)
        buf[:] = 0.0
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        for c in range(3):
            buf[:, c][:, (hh + ww) % 3 == c] = 1.0
        if "labels" in self.addresses:  # an old plan's own labels output: all 2s
            np.ctypeslib.as_array((ctypes.c_uint8 * (n * h * w)).from_address(
                self.addresses["labels"]))[:] = 2

    def get_tensor_shape(self, name):
        n, _, h, w = self.shape
        return (n, 3, h, w) if name == "logits" else (n, h, w)

    def execute_async_v3(self, handle):
        if self.busy:
            self.log.append("shared")  # two runs on one context at once
        self.busy = True
        self._write()
        time.sleep(0.01)
        self.busy = False
        return True


@pytest.fixture(params=[("image", "logits")])
def fake_trt(monkeypatch, tmp_path, request):
    log, made = [], []

    def context():
        made.append(FakeContext(log))
        return made[-1]

    tensors = request.param
    engine = SimpleNamespace(create_execution_context=context, num_io_tensors=len(tensors),
                             get_tensor_name=lambda i: tensors[i])
    def logger(level):
        return None

    logger.WARNING = 0
    fake = SimpleNamespace(Logger=logger, Runtime=lambda lg: SimpleNamespace(
        deserialize_cuda_engine=lambda blob: engine))
    monkeypatch.setattr(trt_mod, "require_trt", lambda: fake)
    plan = tmp_path / "x.plan"
    plan.write_bytes(b"plan")
    return plan, log, made


def test_shapes_outside_the_profile_get_a_clear_refusal(fake_trt):
    plan, _, made = fake_trt
    eng = TensorRTEngine(plan, Profile(), device="cpu")
    out = eng.run(np.zeros((2, 3, 16, 24), np.uint8))
    assert out["labels"].shape == (2, 16, 24)
    for shape in [(1, 3, 4, 64), (17, 3, 64, 64), (1, 3, 64, 2048)]:
        with pytest.raises(OutOfProfile, match="outside the TensorRT plan's profile"):
            eng.run(np.zeros(shape, np.uint8))
    with pytest.raises(CheckFailed, match="refused input shape"):  # set_input_shape -> False
        eng.run(np.zeros((1, 3, 999, 64), np.uint8))


def test_labels_are_the_argmax_taken_on_the_device_and_only_asked_outputs_are_copied(
        fake_trt):
    plan, _, _ = fake_trt
    eng = TensorRTEngine(plan, Profile(), device="cpu")
    assert eng.outputs == ["logits"]  # the plan is logits-only
    want = (np.add.outer(np.arange(16), np.arange(24)) % 3).astype(np.uint8)
    labels = eng.predict_labels(np.zeros((2, 3, 16, 24), np.uint8))
    assert labels.dtype == np.uint8 and (labels == want).all()
    assert set(eng.run(np.zeros((1, 3, 8, 8), np.uint8), outputs=("labels",))) == {"labels"}
    both = eng.run(np.zeros((1, 3, 8, 8), np.uint8))
    assert both["logits"].shape == (1, 3, 8, 8) and both["logits"].dtype == np.float32


@pytest.mark.parametrize("fake_trt", [("image", "logits", "labels")], indirect=True)
def test_an_older_plan_with_its_own_labels_output_still_serves(fake_trt):
    plan, _, _ = fake_trt
    eng = TensorRTEngine(plan, Profile(), device="cpu")
    assert eng.outputs == ["logits", "labels"]
    assert (eng.predict_labels(np.zeros((1, 3, 8, 8), np.uint8)) == 2).all()


@pytest.mark.parametrize("fake_trt", [("image", "labels")], indirect=True)
def test_a_plan_without_logits_is_refused(fake_trt):
    from ciss.errors import CissError

    plan, _, _ = fake_trt
    with pytest.raises(CissError, match="no 'logits' output"):
        TensorRTEngine(plan, Profile(), device="cpu")


def test_the_server_concurrency_reaches_the_context_pool(monkeypatch):
    from ciss.engines import load

    seen = {}

    def fake_load(store, step, contexts=1):
        seen["contexts"] = contexts
        return "engine"

    monkeypatch.setattr(trt_mod, "load_tensorrt_engine", fake_load)
    assert load.load_engine(None, 0, "tensorrt", contexts=4) == "engine"
    assert seen == {"contexts": 4}


def test_concurrent_runs_never_share_an_execution_context(fake_trt):
    plan, log, made = fake_trt
    eng = TensorRTEngine(plan, Profile(), contexts=3, device="cpu")

    def work():
        for _ in range(5):
            eng.run(np.zeros((1, 3, 8, 8), np.uint8))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert log == [] and 1 <= len(made) <= 3


def test_the_plan_is_chosen_by_profile_then_by_age_not_by_name():
    prefix = "engines/H100-cc90-trt10.9-"
    default = f"{prefix}fp16-{Profile().key()}.plan"
    old_style = f"{prefix}fp16-1x32x32-1x512x512-8x1024x1024.plan"
    newer = f"{prefix}fp32-1x32x32-1x512x512-8x1024x1024.plan"
    assert choose_plan([old_style, default, newer], prefix, {}) == default
    # without the default profile: the newest file wins even though its name sorts first
    assert choose_plan([old_style, newer], prefix, {old_style: 200.0, newer: 100.0}) == old_style
    assert choose_plan([], prefix, {}) is None
    assert Profile.from_key(Profile().key()) == Profile()


def test_out_of_profile_input_is_a_4xx_at_the_server(fake_trt):
    from ciss.runtime.bodies import HttpError
    from ciss.runtime.oip import InferRequest
    from ciss.runtime.segmenter import Segmenter
    from ciss.runtime.server import _run_engine

    plan, _, _ = fake_trt
    served = SimpleNamespace(segmenter=Segmenter(TensorRTEngine(plan, Profile(), device="cpu"),
                                                 ["background", "a"]))
    req = InferRequest("", {"image": np.zeros((1, 3, 4, 4), np.uint8)})
    with pytest.raises(HttpError) as err:
        _run_engine(served, req)
    assert err.value.status == 422 and "profile" in err.value.message
    ok = InferRequest("", {"image": np.zeros((1, 3, 8, 8), np.uint8)}, {"labels": True})
    outputs, scores = _run_engine(served, ok)  # unscored: the labels only
    assert set(outputs) == {"labels"} and scores is None  # only what was asked for


def test_the_engine_checked_and_deployed_is_the_one_that_serves_here(monkeypatch):
    import sys
    import types

    import torch

    from ciss.engines.load import serving_engine

    plan = "engines/NVIDIA_H200-cc90-trt10.9.0-fp16-1x8x8-1x512x512-16x1024x1024.plan"
    artifacts = {"model.onnx": "x", plan: "y"}
    if not torch.cuda.is_available():
        assert serving_engine(artifacts, "auto") == "onnx"  # no GPU here: ONNX serves
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0"))
    assert serving_engine(artifacts, "auto") == "tensorrt"  # a plan for this GPU and TensorRT
    assert serving_engine(artifacts, "cpu") == "onnx"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA L4")
    assert serving_engine(artifacts, "auto") == "onnx"  # a plan built for another GPU
