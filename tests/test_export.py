"""ONNX export behind the parity gate, INT8, predict, formats table, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from ciss.cli import main
from ciss.engines.formats import FORMATS, check_format
from ciss.engines.onnx import OnnxEngine
from ciss.errors import CheckFailed, CissError
from ciss.exporters.export import export_step
from ciss.exporters.onnx import read_metadata
from ciss.store import Store


def test_export_onnx_records_artifact_and_parity(store_copy):
    store = Store(store_copy)
    (res,) = export_step(store, 0, ["onnx"])
    assert res.parity.passed and res.parity.label_agreement >= 0.999
    card = store.verify(0)
    assert "model.onnx" in card.artifacts
    assert card.extra["parity"]["onnx"]["passed"] is True
    assert card.retention["0"]["onnx"]  # the engine's own retention scores
    meta = read_metadata(store.step_dir(0) / "model.onnx")
    assert json.loads(meta["classes"]) == card.classes and meta["step"] == "0"
    assert meta["weights_sha256"] == card.artifacts["weights.safetensors"]
    eng = OnnxEngine(store.step_dir(0) / "model.onnx")
    out = eng.run(np.zeros((3, 3, 41, 29), np.uint8))  # dynamic N, H, W
    assert out["logits"].shape == (3, 16, 41, 29) and out["logits"].dtype == np.float32
    assert out["labels"].shape == (3, 41, 29) and out["labels"].dtype == np.uint8
    assert eng.loaded == ["CPUExecutionProvider"]
    assert card.extra["parity"]["onnx"]["device"] == "cpu"


def test_parity_on_a_gpu_runs_in_exact_fp32():
    """TF32 (cuDNN, matmul; ONNX Runtime's CUDA provider) is off while the gate compares, and
    torch's flags come back as they were; serving keeps the provider's default."""
    import torch

    from ciss.engines.onnx import provider_options
    from ciss.exporters.parity import exact_fp32

    torch.backends.cudnn.allow_tf32 = True
    with exact_fp32():
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32
    gate = provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"], tf32=False)
    assert gate[0] == ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC",
                                                  "use_tf32": "0"})
    served = provider_options(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert "use_tf32" not in served[0][1] and served[1] == "CPUExecutionProvider"


def test_export_leaves_model_in_eval_mode(tmp_path):
    from ciss.exporters.onnx import export_onnx
    from ciss.models import build_model
    from ciss.store.card import StepCard

    model = build_model("tiny", num_classes=3).eval()
    card = StepCard(step=0, parent=None, classes=["background", "a", "b"], new_classes=[],
                    arch="tiny", frozen=[], method="base", hparams={}, data={})
    export_onnx(model, tmp_path / "m.onnx", card, "0" * 64)
    assert not any(m.training for m in model.modules())


def test_failing_gate_keeps_nothing(store_copy, monkeypatch):
    store = Store(store_copy)
    before = (store.step_dir(0) / "card.json").read_text()

    class Broken:
        def __init__(self, path, providers=None, tf32=True):
            self.real = OnnxEngine(path)

        def run(self, images):
            out = self.real.run(images)
            out["labels"] = np.zeros_like(out["labels"])
            return out

    monkeypatch.setattr("ciss.engines.onnx.OnnxEngine", Broken)
    with pytest.raises(CheckFailed, match="parity gate failed: label agreement"):
        export_step(store, 0, ["onnx"])
    assert not (store.step_dir(0) / "model.onnx").exists()
    assert (store.step_dir(0) / "card.json").read_text() == before
    assert not any((store.root / ".staging").iterdir())


def test_int8_export_of_a_learned_model_passes_and_reports_speed(store_copy):
    store = Store(store_copy)
    export_step(store, 0, ["onnx"])
    results = export_step(store, 0, ["int8"])  # the base learned: INT8 keeps its accuracy
    assert [r.format for r in results] == ["int8"] and results[0].parity.passed
    speed = store.card(0).extra["parity"]["int8"]["speed"]
    assert speed["fp32_ms"] > 0 and speed["int8_ms"] > 0
    assert "model.int8.onnx" in store.verify(0).artifacts
    meta = read_metadata(store.step_dir(0) / "model.int8.onnx")  # describes itself too
    assert meta["weights_sha256"] == store.card(0).artifacts["weights.safetensors"]


def test_an_engine_exported_from_other_weights_is_refused(tmp_path):
    from ciss.engines.load import check_weights

    check_weights({"weights_sha256": "a" * 64}, {"weights.safetensors": "a" * 64}, "m.onnx")
    with pytest.raises(CissError, match="exported from other weights"):
        check_weights({"weights_sha256": "b" * 64}, {"weights.safetensors": "a" * 64}, "m.onnx")
    with pytest.raises(CissError, match="exported from other weights"):
        check_weights({}, {"weights.safetensors": "a" * 64}, "m.onnx")


def test_int8_that_loses_accuracy_is_refused_and_not_kept(store_copy, monkeypatch):
    from ciss.exporters import quantize as q
    from ciss.exporters.onnx import export_onnx
    from ciss.models import build_model

    store = Store(store_copy)
    export_step(store, 0, ["onnx"])
    card = store.card(0)

    def broken_quantize(src, dst, reader, work, **kw):  # a model that lost what it knew
        torch.manual_seed(123)
        return export_onnx(build_model("tiny", num_classes=len(card.classes)).eval(), dst,
                           card, "0" * 64)

    monkeypatch.setattr(q, "quantize", broken_quantize)
    with pytest.raises(CheckFailed, match="INT8 accuracy gate failed"):
        export_step(store, 0, ["int8"])
    assert "model.int8.onnx" not in store.verify(0).artifacts
    assert not (store.step_dir(0) / "model.int8.onnx").exists()


def test_unknown_format_suggests():
    with pytest.raises(CissError, match="did you mean 'onnx'"):
        check_format("onx")


def test_export_bad_inputs(store_copy, tmp_path):
    store = Store(store_copy)
    with pytest.raises(CissError, match="needs --out"):
        export_step(store, 0, ["triton"])
    (tmp_path / "repo").mkdir()
    with pytest.raises(CissError, match="already exists"):
        export_step(store, 0, ["triton"], tmp_path / "repo")
    w = store.step_dir(0) / "weights.safetensors"
    w.write_bytes(w.read_bytes() + b"0")
    res = CliRunner().invoke(main, ["export", "--store", str(store_copy)])
    assert res.exit_code == 2 and "checksum mismatch" in res.output


def test_predict_writes_masks_at_input_size(store_copy, tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, (w, h), mode in [("a.png", (37, 21), "RGB"), ("b.jpg", (64, 64), "L"),
                               ("c.png", (20, 30), "RGBA")]:
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode).save(
            tmp_path / name)
        paths.append(str(tmp_path / name))
    res = CliRunner().invoke(main, ["predict", "--store", str(store_copy), "--engine", "torch",
                                    "--out", str(tmp_path / "masks"), *paths])
    assert res.exit_code == 0, res.output
    for name, size in [("a", (37, 21)), ("b", (64, 64)), ("c", (20, 30))]:
        m = Image.open(tmp_path / "masks" / f"{name}.png")
        assert m.mode == "P" and m.size == size
        assert np.asarray(m).max() < 16
    (tmp_path / "bad.png").write_bytes(b"nope")
    res = CliRunner().invoke(main, ["predict", "--store", str(store_copy), "--engine", "torch",
                                    "--out", str(tmp_path / "m2"), str(tmp_path / "bad.png")])
    assert res.exit_code == 2 and "bad.png: not a readable image" in res.output


def test_predict_defaults_to_the_deployed_step_exports_on_demand_and_reads_folders(
        store_copy, tmp_path):
    """#30: predict used the latest step whatever was deployed, said neither step nor engine,
    failed without model.onnx, and took no folder (and created --out anyway)."""
    from ciss.runtime.deploy import deploy

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("x.png", "y.jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    cmd = ["predict", "--store", str(store_copy), "--device", "cpu"]
    res = CliRunner().invoke(main, [*cmd, "--out", str(tmp_path / "o"), str(photos)])
    assert res.exit_code == 0, res.output
    assert "with step 0 (latest; nothing is deployed), engine onnx" in res.output
    assert "device cpu" in res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["x.png", "y.png"]
    assert "model.onnx" in Store(store_copy).card(0).artifacts  # exported on demand
    deploy(Store(store_copy), 0, "torch", force=True)
    res = CliRunner().invoke(main, [*cmd, "--out", str(tmp_path / "o2"), str(photos / "x.png")])
    assert res.exit_code == 0 and "with step 0 (deployed), engine torch" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, [*cmd, "--out", str(tmp_path / "o3"), str(empty)])
    assert res.exit_code == 2 and "empty: no image in this folder" in res.output
    assert not (tmp_path / "o3").exists()


def test_formats_table_drives_choices():
    assert set(FORMATS) == {"onnx", "int8", "tensorrt", "triton"}


def test_evaluate_defaults_to_the_deployed_step_and_engine(store_copy, split_dir):
    """#30: evaluate scored the latest step on torch whatever was deployed, unsaid."""
    from ciss.runtime.deploy import deploy

    cmd = ["evaluate", "--store", str(store_copy), "--data", str(split_dir / "step-0"),
           "--device", "cpu"]
    res = CliRunner().invoke(main, cmd)
    assert res.exit_code == 0, res.output
    assert "step 0 (latest; nothing is deployed) on" in res.output
    assert "(engine torch, device cpu)" in res.output
    deploy(Store(store_copy), 0, "onnx", force=True)
    res = CliRunner().invoke(main, cmd)
    assert res.exit_code == 0, res.output
    assert "step 0 (deployed) on" in res.output and "(engine onnx, device cpu)" in res.output
