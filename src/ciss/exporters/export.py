"""``ciss export``: one formats table drives export, loading, the benchmark and the docs.

Every artifact is built in a staging folder, checked, and only then moved into the step
(``Store.add_artifact``), so a failing gate leaves the step exactly as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ciss.data.classes import ClassList
from ciss.engines.formats import check_format, has_artifact
from ciss.errors import CheckFailed, CissError
from ciss.exporters.common import ExportResult, record_engine, staging_dir
from ciss.exporters.parity import check_parity
from ciss.store import Store
from ciss.store.retention import retention_sets


def export_onnx_step(store: Store, step: int, device: str = "cpu") -> ExportResult:
    """Export ``step`` to ``model.onnx`` behind the parity gate.

    ``device``: where the gate runs both sides ("auto": the GPU when ONNX Runtime has its
    CUDA provider here), in exact fp32 (TF32 off in torch and in the CUDA provider), so
    the tolerance means the same on a GPU as on a CPU. The file exported is the same.

    Raises:
        CheckFailed: the gate failed (nothing is kept).
    """
    from ciss.engines.load import ort_providers, torch_device
    from ciss.engines.onnx import OnnxEngine
    from ciss.exporters.onnx import export_onnx
    from ciss.exporters.parity import exact_fp32

    providers = ort_providers(device)
    on_gpu = providers[0] == "CUDAExecutionProvider"
    model, card = store.load_model(step)
    sets = retention_sets(store, step)
    tmp = staging_dir(store, step)
    try:
        path = export_onnx(model, tmp / "model.onnx", card,
                           card.artifacts["weights.safetensors"])
        import onnx

        try:
            onnx.checker.check_model(str(path), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise CheckFailed(f"onnx.checker rejected the export of step {step}: {exc}") from exc
        engine = OnnxEngine(path, providers=providers, tf32=False)
        with exact_fp32():
            report = check_parity(model.to(torch_device(device) if on_gpu else "cpu"),
                                  engine.run, "onnx", sets, ClassList(tuple(card.classes)))
        if not report.passed:
            raise CheckFailed(f"step {step} ONNX parity gate failed: "
                              + "; ".join(report.reasons))
        final = store.add_artifact(step, "model.onnx", lambda p: shutil.move(path, p),
                                   record_engine(report, "onnx"))
    finally:
        store.drop_staging(tmp)
    return ExportResult("onnx", final, report)


def ensure_onnx(store: Store, step: int) -> Path:
    """The step's verified model.onnx, exported first when missing."""
    if not has_artifact(store.card(step).artifacts, "onnx"):
        export_onnx_step(store, step)
    store.verify(step, ["model.onnx"])
    return store.step_dir(step) / "model.onnx"


def export_step(store: Store, step: int | None, formats: list[str],
                out: Path | None = None, triton_gpu: str | None = None,
                triton_device: str = "auto", trt_precision: str = "fp16",
                device: str = "cpu") -> list[ExportResult]:
    """Export a step to each named format (see FORMATS), in a sensible order.

    ``triton_gpu``/``triton_device``: the GPU model a Triton repository is for and where its
    ONNX model runs (``exporters.triton.write_repository``); ``trt_precision``: fp16, fp32 or
    int8 (from the calibrated INT8 model, exported first) for the TensorRT plan;
    ``device``: where the ONNX parity gate runs (``export_onnx_step``).
    """
    for f in formats:
        check_format(f)
    step = store.resolve(step)
    store.verify(step, ["weights.safetensors"])
    order = [f for f in ("onnx", "int8", "tensorrt", "triton") if f in formats]
    if "triton" in order and out is None:
        raise CissError("--format triton needs --out DIR (the model repository)")
    if "triton" in order and out.exists():
        raise CissError(f"{out}: already exists; choose a new folder for the repository")
    results = []
    for f in order:
        if f == "onnx":
            results.append(export_onnx_step(store, step, device))
        elif f == "int8":
            from ciss.exporters.quantize import export_int8_step

            ensure_onnx(store, step)
            results.append(export_int8_step(store, step))
        elif f == "tensorrt":
            from ciss.exporters.tensorrt import export_tensorrt_step

            ensure_onnx(store, step)
            if trt_precision == "int8" and "int8" not in order:
                from ciss.exporters.quantize import export_int8_step

                if not has_artifact(store.card(step).artifacts, "int8"):
                    results.append(export_int8_step(store, step))
            results.append(export_tensorrt_step(store, step, precision=trt_precision))
        elif f == "triton":
            from ciss.exporters.triton import write_repository

            ensure_onnx(store, step)
            results.append(write_repository(store, step, out, gpu=triton_gpu,
                                            device=triton_device))
    return results
