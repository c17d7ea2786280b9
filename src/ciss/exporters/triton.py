"""A Triton Inference Server model repository for a step (onnxruntime_onnx, tensorrt_plan).

Layout (version folder = step + 1, since Triton versions start at 1)::

    OUT/ciss_onnx/config.pbtxt   OUT/ciss_onnx/<step+1>/model.onnx
    OUT/ciss_trt/config.pbtxt    OUT/ciss_trt/<step+1>/model.plan     (when a plan exists)

A plan runs only on the GPU model and TensorRT version it was built for, so the plan copied is
the one built for the GPU the repository is for (``gpu``: by name, else this host's GPU, else
the only GPU any plan was built for), never just the name that sorts last. ``ciss_trt``
returns ``logits`` only: ciss's plans leave the argmax out (``engines.tensorrt``); take it on
the client or ask ``ciss_onnx`` for ``labels``.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from ciss.errors import CissError
from ciss.exporters.common import ExportResult
from ciss.store import Store

MAX_BATCH = 8


LABELS_OUTPUT = """,
  {
    name: "labels"
    data_type: TYPE_UINT8
    dims: [ -1, -1 ]
  }"""


def config_pbtxt(name: str, platform: str, num_classes: int, gpu: bool,
                 max_batch: int = MAX_BATCH, labels: bool = True) -> str:
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
  }}{LABELS_OUTPUT if labels else ""}
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


def choose_repository_plan(store: Store, step: int, gpu: str | None) -> str | None:
    """The plan artifact for the GPU named ``gpu`` (else this host's, else the only GPU any
    plan was built for); None when the step has no plan.

    Raises:
        CissError: no plan for the GPU asked for, or plans for several GPUs and none named.
    """
    from ciss.engines.tensorrt import choose_stored_plan, gpu_slug, parse_plan_name

    card = store.card(step)
    plans = {n: parse_plan_name(n) for n in card.artifacts}
    plans = {n: p for n, p in plans.items() if p is not None}
    if not plans:
        return None
    built_for = sorted({p["gpu"] for p in plans.values()})
    if gpu is None:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name()
        elif len(built_for) == 1:
            gpu = built_for[0]
        else:
            raise CissError(f"step {step} has TensorRT plans for {', '.join(built_for)}; "
                            "name the GPU the repository is for with --triton-gpu")
    slug = gpu_slug(gpu)
    if slug not in built_for:
        raise CissError(f"step {step} has no TensorRT plan for {gpu} (plans for: "
                        f"{', '.join(built_for)}); build one there with 'ciss export "
                        f"--step {step} --format tensorrt'")
    names = [n for n, p in plans.items() if p["gpu"] == slug]
    return choose_stored_plan(store, step, names, f"engines/{slug}-")


def write_repository(store: Store, step: int, out: Path, gpu: str | None = None,
                     device: str = "auto") -> ExportResult:
    """Write a Triton repository with this step's ONNX model and TensorRT plan.

    Args:
        gpu: the GPU model the repository is for (picks the plan built for it).
        device: "gpu" or "cpu" instances for the ONNX model; "auto": GPU when the repository
            gets a plan or this host has one.

    The repository is assembled beside ``out`` and renamed into place.
    """
    card = store.verify(step, ["model.onnx"])
    out = Path(out)
    if out.exists():
        raise CissError(f"{out}: already exists; choose a new folder for the repository")
    if device not in ("auto", "gpu", "cpu"):
        raise CissError(f"--triton-device {device}: choose auto, gpu or cpu")
    plan = choose_repository_plan(store, step, gpu)
    if device == "auto":
        import torch

        device = "gpu" if plan is not None or torch.cuda.is_available() else "cpu"
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    version = str(step + 1)
    try:
        onnx_dir = tmp / "ciss_onnx" / version
        onnx_dir.mkdir(parents=True)
        shutil.copyfile(store.step_dir(step) / "model.onnx", onnx_dir / "model.onnx")
        (tmp / "ciss_onnx" / "config.pbtxt").write_text(
            config_pbtxt("ciss_onnx", "onnxruntime_onnx", len(card.classes),
                         gpu=device == "gpu"))
        if plan is not None:
            store.verify(step, [plan])
            trt_dir = tmp / "ciss_trt" / version
            trt_dir.mkdir(parents=True)
            shutil.copyfile(store.step_dir(step) / plan, trt_dir / "model.plan")
            # plans built before the argmax moved out of them still have a labels output
            logits_only = plan in card.extra.get("tensorrt_plans", {})
            (tmp / "ciss_trt" / "config.pbtxt").write_text(
                config_pbtxt("ciss_trt", "tensorrt_plan", len(card.classes), gpu=True,
                             labels=not logits_only))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    note = (f"Triton repository: {out} (ciss_onnx on {device.upper()}"
            + (f", ciss_trt from {plan.removeprefix('engines/')}" if plan else "")
            + f", version {version})")
    return ExportResult("triton", out, None, note)
