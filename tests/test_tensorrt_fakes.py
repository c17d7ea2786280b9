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
    def __init__(self, log):
        self.log = log
        self.busy = False
        self.shape = None

    def set_input_shape(self, name, shape):
        self.shape = shape
        return shape[2] != 999  # a shape the (fake) plan refuses

    def set_tensor_address(self, name, ptr):
        pass

    def get_tensor_shape(self, name):
        n, _, h, w = self.shape
        return (n, 3, h, w) if name == "logits" else (n, h, w)

    def execute_async_v3(self, handle):
        if self.busy:
            self.log.append("shared")  # two runs on one context at once
        self.busy = True
        time.sleep(0.01)
        self.busy = False
        return True


@pytest.fixture
def fake_trt(monkeypatch, tmp_path):
    log, made = [], []

    def context():
        made.append(FakeContext(log))
        return made[-1]

    engine = SimpleNamespace(create_execution_context=context)
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
    assert set(_run_engine(served, ok)) == {"labels"}  # only what was asked for
