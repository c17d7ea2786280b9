"""INT8: static QDQ quantisation calibrated on retention images, kept only if accurate."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

from ciss.analysis.scoring import at_most, batches
from ciss.data.classes import ClassList
from ciss.data.transforms import SERVE_MAX_SIDE
from ciss.errors import CheckFailed
from ciss.exporters.common import ExportResult, record_engine, staging_dir
from ciss.exporters.parity import ParityTolerance, check_parity
from ciss.store import Store
from ciss.store.retention import retention_sets
from ciss.timing import median_ms

# Quantised logits differ by design: judge labels and mIoU only, a little looser than fp32.
INT8_TOLERANCE = ParityTolerance(min_agreement=0.97, max_miou_delta=0.01)


class RetentionReader:
    """onnxruntime CalibrationDataReader over retention images (at most ``limit``)."""

    def __init__(self, sets: dict, limit: int = 64) -> None:
        self.items = []
        for folder in sets.values():
            for images, masks in batches(folder, folder.val, 1):
                # calibrate on what will be served (and in bounded memory)
                self.items.append({"image": at_most(images, masks, SERVE_MAX_SIDE)[0]})
                if len(self.items) >= limit:
                    break
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.items):
            return None
        self.pos += 1
        return self.items[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0


def quantize(src: Path, dst: Path, reader: RetentionReader, work: Path, *,
             signed_activations: bool = False) -> Path:
    """Pre-process (shape inference, fusions) then static QDQ U8S8 per-channel quantisation.

    uint8 activations with int8 weights (U8S8) is the x86 fast path: with S8S8, ONNX Runtime
    fused only 9 of tiny's 16 convolutions into QLinearConv and the Quantize/Dequantize/Transpose
    glue made INT8 slower than fp32 (20.6 vs 17.8 ms at 256 px); with U8S8 all 16 fuse and INT8
    is 1.3x faster (benchmarks/int8_profile.py, BENCHMARKS.md §5). On AVX2 CPUs without VNNI
    (this project's machine) the u8 x s8 multiply-add saturates: a trained demo step kept only
    91.8 % label agreement. ``reduce_range`` (7-bit weights) avoids that at the same speed
    (99.3 %); the accuracy gate below still refuses any model that loses too much.
    ``signed_activations`` gives the S8S8 variant (kept for the profile benchmark).
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(dst), reader, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8 if signed_activations else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True, reduce_range=True)
    copy_metadata(src, dst)  # the quantizer drops it; the INT8 file must describe itself too
    return dst


def copy_metadata(src: Path, dst: Path) -> None:
    """Put ``src``'s metadata_props (classes, step, weights_sha256, ...) into ``dst``."""
    import onnx

    source, target = onnx.load(str(src), load_external_data=False), onnx.load(str(dst))
    del target.metadata_props[:]
    for prop in source.metadata_props:
        entry = target.metadata_props.add()
        entry.key, entry.value = prop.key, prop.value
    onnx.save(target, str(dst))


def export_int8_step(store: Store, step: int) -> ExportResult:
    """Quantise the step's model.onnx into model.int8.onnx; measured speed goes in the card."""
    from ciss.engines.onnx import OnnxEngine

    model, card = store.load_model(step)
    sets = retention_sets(store, step)
    tmp = staging_dir(store, step, "model.onnx")
    try:
        path = quantize(store.step_dir(step) / "model.onnx", tmp / "model.int8.onnx",
                        RetentionReader(sets), tmp)
        engine = OnnxEngine(path)
        report = check_parity(model, engine.run, "int8", sets, ClassList(tuple(card.classes)),
                              tol=INT8_TOLERANCE, compare_logits=False)
        if not report.passed:
            raise CheckFailed(f"step {step} INT8 accuracy gate failed: "
                              + "; ".join(report.reasons) + " (model.onnx stays the engine)")
        fp32 = OnnxEngine(store.step_dir(step) / "model.onnx")
        folder = next(iter(sets.values()))
        images = at_most(*next(batches(folder, folder.val, 8)), SERVE_MAX_SIDE)[0]
        speed = {"fp32_ms": median_ms(partial(fp32.run, images), repeats=15),
                 "int8_ms": median_ms(partial(engine.run, images), repeats=15),
                 "batch": int(images.shape[0]), "size": list(images.shape[2:])}
        speed["speedup"] = speed["fp32_ms"] / speed["int8_ms"]
        update = record_engine(report, "int8")

        def with_speed(c) -> None:
            update(c)
            c.extra["parity"]["int8"]["speed"] = speed

        final = store.add_artifact(step, "model.int8.onnx", lambda p: shutil.move(path, p),
                                   with_speed)
    finally:
        store.drop_staging(tmp)
    note = (f"INT8 {speed['speedup']:.2f}x vs fp32 ({speed['int8_ms']:.1f} vs "
            f"{speed['fp32_ms']:.1f} ms, batch {speed['batch']})")
    if speed["speedup"] < 1.0:
        note += ": slower than fp32 on this CPU, not worth serving here"
    return ExportResult("int8", final, report, note)
