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
