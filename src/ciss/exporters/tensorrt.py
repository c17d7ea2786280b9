"""TensorRT engines built from the step's ONNX with the TensorRT Python API (10 and 11).

TensorRT 11 has only strongly typed networks: precision comes from the ONNX itself, so FP16
means building from an FP16 ONNX (I/O kept uint8/float32). On TensorRT 10 the network is also
built strongly typed for FP32, and FP16 uses the builder flag. Engines are cached per GPU,
TensorRT version, precision and optimisation profile; they are never portable, so ONNX stays
the source of truth. Needs an NVIDIA GPU: elsewhere every entry point raises a clear error.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ciss.data.classes import ClassList
from ciss.errors import CheckFailed, CissError
from ciss.exporters.export import ExportResult, record_engine, staging_dir
from ciss.exporters.parity import ParityTolerance, check_parity
from ciss.store.retention import retention_sets


@dataclass(frozen=True)
class Profile:
    """Optimisation profile: (N, H, W) at min, opt and max."""

    min: tuple[int, int, int] = (1, 32, 32)
    opt: tuple[int, int, int] = (1, 512, 512)
    max: tuple[int, int, int] = (8, 1024, 1024)

    def key(self) -> str:
        return "-".join("x".join(map(str, s)) for s in (self.min, self.opt, self.max))


def _require_trt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise CissError("TensorRT is not installed: pip install -e '.[tensorrt]' on a machine "
                        "with an NVIDIA GPU") from exc
    import torch

    if not torch.cuda.is_available():
        raise CissError("TensorRT needs an NVIDIA GPU and none is visible; export onnx instead")
    return trt


def engine_key(precision: str, profile: Profile) -> str:
    """``<gpu>-cc<major><minor>-trt<version>-<precision>-<profile>``: one plan per key."""
    import torch

    trt = _require_trt()
    name = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    cc = "".join(map(str, torch.cuda.get_device_capability()))
    return f"{name}-cc{cc}-trt{trt.__version__}-{precision}-{profile.key()}"


def fp16_onnx(src: Path, dst: Path) -> Path:
    """An FP16 copy of the model with uint8/float32 I/O (for strongly typed FP16 builds)."""
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:
        raise CissError("FP16 on TensorRT 11 needs onnxconverter-common "
                        "(pip install -e '.[tensorrt]')") from exc
    model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(model, str(dst))
    out_types = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    if out_types.get("logits") != onnx.TensorProto.FLOAT:
        raise CheckFailed("FP16 conversion changed the logits output away from float32")
    return dst


def build_plan(onnx_path: Path, plan_path: Path, precision: str, profile: Profile,
               timing_cache: Path) -> Path:
    """Parse the ONNX, build a serialized engine with one profile, update the timing cache."""
    trt = _require_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    use_strong = strongly is not None and (major >= 11 or precision == "fp32")
    flags = (1 << int(strongly)) if use_strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    src = onnx_path
    if precision == "fp16" and use_strong:
        src = fp16_onnx(onnx_path, plan_path.with_suffix(".fp16.onnx"))
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailed(f"TensorRT could not parse {src.name}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16" and not use_strong:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    opt.set_shape("image", (profile.min[0], 3, *profile.min[1:]),
                  (profile.opt[0], 3, *profile.opt[1:]), (profile.max[0], 3, *profile.max[1:]))
    config.add_optimization_profile(opt)
    blob = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckFailed(f"TensorRT failed to build an engine from {src.name}")
    plan_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


class TensorRTEngine:
    """A deserialized plan run with the name-based tensor API (TensorRT 10+), on torch CUDA
    buffers."""

    def __init__(self, plan: Path) -> None:
        trt = _require_trt()
        import torch

        self.path = Path(plan)
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise CissError(f"{plan}: TensorRT cannot deserialize this plan (other GPU or "
                            "TensorRT version?); rebuild it with 'ciss export --format tensorrt'")
        self.context = self.engine.create_execution_context()
        self.torch = torch
        self.dtypes = {"logits": torch.float32, "labels": torch.uint8}

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)).cuda()
        self.context.set_input_shape("image", tuple(x.shape))
        self.context.set_tensor_address("image", x.data_ptr())
        outs = {}
        for name in ("logits", "labels"):
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise CheckFailed(f"{self.path.name}: TensorRT execution failed")
        stream.synchronize()
        return {k: v.cpu().numpy() for k, v in outs.items()}

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)["labels"]

    def describe(self) -> str:
        return f"TensorRT {self.path.name}"


def export_tensorrt_step(store, step: int, precision: str = "fp16",
                         profile: Profile = Profile()) -> ExportResult:
    """Build (or reuse) the plan for this GPU and check it against ONNX Runtime's labels."""
    from ciss.runtime.engine import OnnxEngine

    trt = _require_trt()
    key = engine_key(precision, profile)
    name = f"engines/{key}.plan"
    card = store.card(step)
    if name in card.artifacts:
        store.verify(step, [name])
        return ExportResult("tensorrt", store.step_dir(step) / name, None, "cached plan reused")
    sets = retention_sets(store, step)
    tmp = staging_dir(store)
    try:
        cache = store.root / ".work" / f"trt{trt.__version__}.timing"
        cache.parent.mkdir(parents=True, exist_ok=True)
        plan = build_plan(store.step_dir(step) / "model.onnx", tmp / "model.plan", precision,
                          profile, cache)
        engine = TensorRTEngine(plan)
        # Reference: ONNX Runtime's output (the engine the plan replaces), wrapped as a model.
        reference = OnnxEngine(store.step_dir(step) / "model.onnx")
        model = _OrtAsTorch(reference)
        tol = ParityTolerance(min_agreement=0.995, max_miou_delta=0.005)
        report = check_parity(model, engine.run, "tensorrt", sets,
                              ClassList(tuple(card.classes)), tol=tol,
                              compare_logits=precision == "fp32")
        if not report.passed:
            raise CheckFailed(f"step {step} TensorRT parity gate failed: "
                              + "; ".join(report.reasons))
        final = store.add_artifact(step, name, lambda p: shutil.move(plan, p),
                                   record_engine(report, "tensorrt"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult("tensorrt", final, report)


class _OrtAsTorch:
    """Lets the parity check call an ORT engine where it expects a torch model."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def eval(self):
        return self

    def __call__(self, x):
        import torch

        return torch.from_numpy(self.engine.run(x.numpy())["logits"])


def load_tensorrt_engine(store, step: int) -> TensorRTEngine:
    """The newest verified plan of the step that matches this GPU and TensorRT."""
    trt = _require_trt()
    import torch

    card = store.card(step)
    gpu = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    cc = "".join(map(str, torch.cuda.get_device_capability()))
    prefix = f"engines/{gpu}-cc{cc}-trt{trt.__version__}-"
    plans = sorted(n for n in card.artifacts if n.startswith(prefix))
    if not plans:
        raise CissError(f"step {step} has no TensorRT plan for this GPU and TensorRT "
                        f"{trt.__version__}; run 'ciss export --step {step} --format tensorrt'")
    store.verify(step, [plans[-1]])
    return TensorRTEngine(store.step_dir(step) / plans[-1])
