"""Triton repository (parsed with Triton's own protobuf schema) and TensorRT (GPU only)."""

from __future__ import annotations

import numpy as np
import pytest

from ciss.errors import CissError
from ciss.exporters.export import export_step
from ciss.store import Store


def test_triton_repository_config_parses(store_copy, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (dev extra) not installed")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    store = Store(store_copy)
    (res,) = [r for r in export_step(store, 0, ["onnx", "triton"], tmp_path / "repo")
              if r.format == "triton"]
    repo = tmp_path / "repo"
    assert (repo / "ciss_onnx" / "1" / "model.onnx").exists()
    cfg = text_format.Parse((repo / "ciss_onnx" / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert cfg.input[0].name == "image" and list(cfg.input[0].dims) == [3, -1, -1]
    assert cfg.input[0].data_type == model_config_pb2.TYPE_UINT8
    outs = {o.name: o for o in cfg.output}
    assert list(outs["logits"].dims) == [16, -1, -1]
    assert outs["labels"].data_type == model_config_pb2.TYPE_UINT8
    assert cfg.HasField("dynamic_batching")
    assert "version 1" in res.note


def test_tensorrt_without_gpu_is_a_clear_error(store_copy):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU test covers TensorRT")
    with pytest.raises(CissError, match="(TensorRT is not installed|needs an NVIDIA GPU)"):
        export_step(Store(store_copy), 0, ["tensorrt"])


@pytest.mark.gpu
def test_tensorrt_engine_parity_and_cache(store_copy):
    pytest.importorskip("tensorrt", reason="tensorrt not installed")
    from ciss.engines.load import load_engine

    store = Store(store_copy)
    (res,) = [r for r in export_step(store, 0, ["tensorrt"]) if r.format == "tensorrt"]
    assert res.parity.passed
    again = [r for r in export_step(store, 0, ["tensorrt"]) if r.format == "tensorrt"][0]
    assert again.note == "cached plan reused"
    eng = load_engine(store, 0, "tensorrt")
    out = eng.run(np.zeros((2, 3, 64, 48), np.uint8))
    assert out["labels"].shape == (2, 64, 48)


def _fake_plan(store, step, gpu: str, blob: bytes, recorded: bool = True) -> str:
    from ciss.engines.tensorrt import Profile

    name = f"engines/{gpu}-cc90-trt10.9.0-fp16-{Profile().key()}.plan"

    def record(card):
        if recorded:
            card.extra.setdefault("tensorrt_plans", {})[name] = {"gpu": gpu}

    store.add_artifact(step, name, lambda p: p.write_bytes(blob), record)
    return name


def test_triton_takes_the_plan_built_for_the_gpu_it_is_for(store_copy, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (dev extra) not installed")
    import torch
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the default would be its own plan")
    store = Store(store_copy)
    export_step(store, 0, ["onnx"])
    _fake_plan(store, 0, "NVIDIA_H100_80GB_HBM3", b"h100")
    _fake_plan(store, 0, "Tesla_T4", b"t4")  # sorts last by name: the old pick
    with pytest.raises(CissError, match="plans for NVIDIA_H100_80GB_HBM3, Tesla_T4.*--triton-gpu"):
        export_step(store, 0, ["triton"], tmp_path / "r0")
    with pytest.raises(CissError, match="no TensorRT plan for NVIDIA A10"):
        export_step(store, 0, ["triton"], tmp_path / "r1", triton_gpu="NVIDIA A10")
    assert not (tmp_path / "r0").exists() and not (tmp_path / "r1").exists()
    export_step(store, 0, ["triton"], tmp_path / "repo", triton_gpu="NVIDIA H100 80GB HBM3")
    repo = tmp_path / "repo"
    assert (repo / "ciss_trt" / "1" / "model.plan").read_bytes() == b"h100"
    cfgs = {m: text_format.Parse((repo / m / "config.pbtxt").read_text(),
                                 model_config_pb2.ModelConfig()) for m in ("ciss_onnx", "ciss_trt")}
    gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert [g.kind for g in cfgs["ciss_onnx"].instance_group] == [gpu]  # a GPU repository
    assert cfgs["ciss_trt"].platform == "tensorrt_plan"
    assert [o.name for o in cfgs["ciss_trt"].output] == ["logits"]  # the plan has no argmax
    export_step(store, 0, ["triton"], tmp_path / "cpu", triton_gpu="Tesla T4",
                triton_device="cpu")
    cpu = text_format.Parse((tmp_path / "cpu" / "ciss_onnx" / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]


def test_an_unrecorded_older_plan_keeps_its_labels_output_in_triton(store_copy, tmp_path):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (dev extra) not installed")
    store = Store(store_copy)
    export_step(store, 0, ["onnx"])
    _fake_plan(store, 0, "Tesla_T4", b"t4", recorded=False)
    export_step(store, 0, ["triton"], tmp_path / "repo")  # the only GPU any plan is for
    text = (tmp_path / "repo" / "ciss_trt" / "config.pbtxt").read_text()
    assert '"labels"' in text and '"logits"' in text


def test_the_logits_only_graph_keeps_the_contract_for_onnx_runtime(store_copy, tmp_path):
    import onnx

    from ciss.exporters.tensorrt import logits_only_onnx

    store = Store(store_copy)
    export_step(store, 0, ["onnx"])
    src = store.step_dir(0) / "model.onnx"
    cut = onnx.load(str(logits_only_onnx(src, tmp_path / "l.onnx")))
    assert [o.name for o in cut.graph.output] == ["logits"]
    assert not [n for n in cut.graph.node if n.op_type == "ArgMax"]
    full = onnx.load(str(src))  # the stored model still has both outputs
    assert [o.name for o in full.graph.output] == ["logits", "labels"]


def test_the_timing_cache_is_keyed_by_gpu_capability_and_version(monkeypatch, tmp_path):
    import torch

    from ciss.exporters.tensorrt import timing_cache_path

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    path = timing_cache_path(Store(tmp_path / "s"), "10.9.0")
    assert path.name == "NVIDIA_H200-cc90-trt10.9.0.timing"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 9))
    assert timing_cache_path(Store(tmp_path / "s"), "10.9.0") != path
