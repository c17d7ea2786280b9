"""TensorRT engines built from the step's ONNX with the TensorRT Python API (10 and 11).

TensorRT 11 has only strongly typed networks: precision comes from the ONNX itself, so FP16
means building from an FP16 ONNX (I/O kept uint8/float32). On TensorRT 10 the network is also
built strongly typed for FP32, and FP16 uses the builder flag. The plan is built from the
logits-only graph: the engine takes the labels' argmax on the GPU (``engines.tensorrt``), so
no int64 ArgMax or uint8 Cast has to go through TensorRT's parser. Engines are cached per GPU,
TensorRT version, precision and optimisation profile; they are never portable, so ONNX stays
the source of truth. Needs an NVIDIA GPU: elsewhere every entry point raises a clear error.
The engine that runs a plan lives in ``ciss.engines.tensorrt``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ciss.data.classes import ClassList
from ciss.engines.tensorrt import Profile, TensorRTEngine, engine_key, require_trt
from ciss.errors import CheckFailed, CissError
from ciss.exporters.common import ExportResult, record_engine, staging_dir
from ciss.exporters.parity import ParityTolerance, check_parity
from ciss.store.retention import retention_sets


def logits_only_onnx(src: Path, dst: Path) -> Path:
    """The step's graph with the ``labels`` output (ArgMax, Cast) cut away: image -> logits."""
    import onnx.utils

    onnx.utils.extract_model(str(src), str(dst), ["image"], ["logits"])
    return dst


def timing_cache_path(store, trt_version: str) -> Path:
    """The builder's timing cache for this GPU model, compute capability and TensorRT
    version (tactic timings are valid for nothing else)."""
    from ciss.engines.tensorrt import plan_prefix

    return store.work_dir / f"{plan_prefix(trt_version)[len('engines/'):].rstrip('-')}.timing"


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
               timing_cache: Path) -> tuple[Path, str]:
    """Parse the logits-only ONNX, build a serialized engine with one profile, update the
    timing cache. Returns the plan and what happened to the cache ("used", "new",
    "rejected": a cache TensorRT would not take, e.g. from another build; built without)."""
    trt = require_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    use_strong = strongly is not None and (major >= 11 or precision == "fp32")
    flags = (1 << int(strongly)) if use_strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    src = logits_only_onnx(onnx_path, plan_path.with_suffix(".logits.onnx"))
    if precision == "fp16" and use_strong:
        src = fp16_onnx(src, plan_path.with_suffix(".fp16.onnx"))
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailed(f"TensorRT could not parse {src.name}: {errors}")
    config = builder.create_builder_config()
    if precision in ("fp16", "int8") and not use_strong:
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8" and not use_strong:
        # explicit quantization: the QDQ nodes of model.int8.onnx say what runs in INT8
        # (strongly typed networks on TensorRT 11 read them without a flag)
        config.set_flag(trt.BuilderFlag.INT8)
    opt = builder.create_optimization_profile()
    opt.set_shape("image", (profile.min[0], 3, *profile.min[1:]),
                  (profile.opt[0], 3, *profile.opt[1:]), (profile.max[0], 3, *profile.max[1:]))
    config.add_optimization_profile(opt)
    blob = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = config.create_timing_cache(blob)
    # set_timing_cache says False when it will not take the cache (another GPU or version)
    status = ("used" if blob else "new") if config.set_timing_cache(
        cache, ignore_mismatch=False) else "rejected"
    if status == "rejected":
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CheckFailed(f"TensorRT failed to build an engine from {src.name}")
    plan_path.write_bytes(bytes(serialized))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path, status


PRECISIONS = ("fp16", "fp32", "int8")


def export_tensorrt_step(store, step: int, precision: str = "fp16",
                         profile: Profile = Profile()) -> ExportResult:
    """Build (or reuse) the plan for this GPU and check it against ONNX Runtime's labels.

    ``int8`` builds from the step's calibrated QDQ model (``model.int8.onnx``, exported
    first by ``export_step``) and is checked against that model in ONNX Runtime.
    """
    if precision not in PRECISIONS:
        raise CissError(f"--trt-precision {precision}: choose {', '.join(PRECISIONS)}")
    from ciss.engines.onnx import OnnxEngine

    trt = require_trt()
    key = engine_key(precision, profile)
    name = f"engines/{key}.plan"
    card = store.card(step)
    if name in card.artifacts:
        store.verify(step, [name])
        return ExportResult("tensorrt", store.step_dir(step) / name, None, "cached plan reused")
    sets = retention_sets(store, step)
    tmp = staging_dir(store, step, "model.onnx")
    try:
        import time

        import torch

        cache = timing_cache_path(store, trt.__version__)
        cache.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        source = store.step_dir(step) / ("model.int8.onnx" if precision == "int8"
                                         else "model.onnx")
        store.verify(step, [source.name])
        plan, cache_status = build_plan(source, tmp / "model.plan", precision, profile, cache)
        build_s = time.perf_counter() - t0
        engine = TensorRTEngine(plan, profile)
        # Reference: ONNX Runtime's output (the engine the plan replaces), wrapped as a model.
        reference = OnnxEngine(source)
        model = _OrtAsTorch(reference)
        # INT8 kernels of TensorRT and ONNX Runtime round differently: the INT8 gate's
        # own accuracy check already bounded what quantization may cost
        tol = (ParityTolerance(min_agreement=0.98, max_miou_delta=0.02) if precision == "int8"
               else ParityTolerance(min_agreement=0.995, max_miou_delta=0.005))
        report = check_parity(model, engine.run, "tensorrt", sets,
                              ClassList(tuple(card.classes)), tol=tol,
                              compare_logits=precision == "fp32")
        if not report.passed:
            raise CheckFailed(f"step {step} TensorRT parity gate failed: "
                              + "; ".join(report.reasons))
        built = {"gpu": torch.cuda.get_device_name(),
                 "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())),
                 "tensorrt": trt.__version__, "precision": precision,
                 "profile": profile.key(), "build_s": round(build_s, 1),
                 "timing_cache": cache_status}
        parity = record_engine(report, "tensorrt")

        def update(card) -> None:
            parity(card)
            card.extra.setdefault("tensorrt_plans", {})[name] = built

        final = store.add_artifact(step, name, lambda p: shutil.move(plan, p), update)
    finally:
        store.drop_staging(tmp)
    note = (f"TensorRT {precision} plan for {built['gpu']} (cc {built['compute_capability']}, "
            f"TensorRT {trt.__version__}) built in {build_s:.0f}s; timing cache {cache_status}"
            + (" (TensorRT would not take it; built without)" if cache_status == "rejected"
               else ""))
    return ExportResult("tensorrt", final, report, note)


class _OrtAsTorch:
    """Lets the parity check call an ORT engine where it expects a torch model."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def eval(self):
        return self

    def __call__(self, x):
        import torch

        return torch.from_numpy(self.engine.run(x.numpy())["logits"])
