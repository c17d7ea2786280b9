"""A Triton Inference Server model repository for a step (onnxruntime_onnx, tensorrt_plan).

Layout (version folder = step + 1, since Triton versions start at 1)::

    OUT/ciss_onnx/config.pbtxt   OUT/ciss_onnx/<step+1>/model.onnx
    OUT/ciss_trt/config.pbtxt    OUT/ciss_trt/<step+1>/model.plan     (when a plan exists)
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from ciss.errors import CissError
from ciss.exporters.common import ExportResult
from ciss.store import Store

MAX_BATCH = 8


def config_pbtxt(name: str, platform: str, num_classes: int, gpu: bool,
                 max_batch: int = MAX_BATCH) -> str:
    """config.pbtxt text; dims exclude the batch axis (max_batch_size > 0), -1 is dynamic."""
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {{
    name: "image"
    data_type: TYPE_UINT8
    dims: [ 3, -1, -1 ]
  }}
]
output [
  {{
    name: "logits"
    data_type: TYPE_FP32
    dims: [ {num_classes}, -1, -1 ]
  }},
  {{
    name: "labels"
    data_type: TYPE_UINT8
    dims: [ -1, -1 ]
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: 2000
}}
version_policy: {{ latest: {{ num_versions: 1 }} }}
instance_group [
  {{
    count: 1
    kind: {kind}
  }}
]
"""


def write_repository(store: Store, step: int, out: Path) -> ExportResult:
    """Write (or extend) a Triton repository with this step's ONNX model and TensorRT plan.

    The repository is assembled beside ``out`` and renamed into place.
    """
    card = store.verify(step, ["model.onnx"])
    out = Path(out)
    if out.exists():
        raise CissError(f"{out}: already exists; choose a new folder for the repository")
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    version = str(step + 1)
    try:
        onnx_dir = tmp / "ciss_onnx" / version
        onnx_dir.mkdir(parents=True)
        shutil.copyfile(store.step_dir(step) / "model.onnx", onnx_dir / "model.onnx")
        (tmp / "ciss_onnx" / "config.pbtxt").write_text(
            config_pbtxt("ciss_onnx", "onnxruntime_onnx", len(card.classes), gpu=False))
        plans = sorted(n for n in card.artifacts if n.startswith("engines/"))
        if plans:
            store.verify(step, [plans[-1]])
            trt_dir = tmp / "ciss_trt" / version
            trt_dir.mkdir(parents=True)
            shutil.copyfile(store.step_dir(step) / plans[-1], trt_dir / "model.plan")
            (tmp / "ciss_trt" / "config.pbtxt").write_text(
                config_pbtxt("ciss_trt", "tensorrt_plan", len(card.classes), gpu=True))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    note = f"Triton repository: {out} (ciss_onnx" + (", ciss_trt" if plans else "") + \
        f", version {version})"
    return ExportResult("triton", out, None, note)
