"""Load a stored step's engine by name (checksums verified first)."""

from __future__ import annotations

from ciss.engines.formats import FORMATS, has_artifact
from ciss.errors import CissError
from ciss.store.store import WEIGHTS

ENGINES = ("torch", "onnx", "int8", "tensorrt")


def torch_device(device: str):
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:i]`` as a torch device.

    Raises:
        CissError: CUDA asked for and not visible.
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CissError(f"--device {device}: no CUDA GPU is visible to PyTorch")
    return torch.device(device)


def ort_providers(device: str, available: list[str] | None = None) -> list[str]:
    """ONNX Runtime providers for ``device``: CUDA first on a GPU (``auto`` only when this
    ONNX Runtime has the CUDA provider; ``cuda`` insists, and the engine refuses to load
    without it), the CPU otherwise."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if available is None:
        from ciss.engines.ort import import_onnxruntime

        available = import_onnxruntime().get_available_providers()
    if device == "auto":
        import torch

        if not (torch.cuda.is_available() and "CUDAExecutionProvider" in available):
            return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def serving_engine(artifacts: dict[str, str], device: str = "auto") -> str:
    """The engine a step serves on this host: its TensorRT plan for this GPU and TensorRT
    when one is exported (and CUDA and TensorRT are here), else ONNX (on ONNX Runtime's CUDA
    provider where ``ort_providers`` finds it)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "onnx"
    try:
        import tensorrt as trt
    except ImportError:
        return "onnx"
    from ciss.engines.tensorrt import plan_prefix

    prefix = plan_prefix(trt.__version__)
    return "tensorrt" if any(n.startswith(prefix) for n in artifacts) else "onnx"


def load_engine(store, step: int, engine: str, providers: list[str] | None = None,
                contexts: int = 1, device: str = "cpu"):
    """The verified engine ``engine`` (torch, onnx, int8 or tensorrt) of a stored step.

    Args:
        providers: ONNX Runtime providers for onnx/int8, best first (default: CPU).
        contexts: runs at once a TensorRT engine serves (one execution context each).
        device: where the torch engine runs ("auto": CUDA when present).

    Raises:
        CissError: unknown engine, the artifact is missing (export it first) or fails its
            checksum.
    """
    if engine == "torch":
        from ciss.engines.torch import TorchEngine

        model, _ = store.load_model(step, device=str(torch_device(device)))
        return TorchEngine(model)
    if engine == "tensorrt":
        from ciss.engines.tensorrt import load_tensorrt_engine

        return load_tensorrt_engine(store, step, contexts=contexts)
    if engine not in ("onnx", "int8"):
        raise CissError(f"--engine {engine}: choose {', '.join(ENGINES)}")
    from ciss.engines.onnx import OnnxEngine

    name = FORMATS[engine].artifact
    card = store.card(step)
    pruned = card.pruned_message(WEIGHTS, store.step_dir(step) / WEIGHTS)
    if pruned:  # no engine to export either: say why, not "export it first"
        raise CissError(pruned)
    if not has_artifact(card.artifacts, engine):
        raise CissError(f"step {step} has no {name}; run 'ciss export --step {step} "
                        f"--format {engine}' first")
    store.verify(step, [name])
    engine = OnnxEngine(store.step_dir(step) / name, providers or ["CPUExecutionProvider"],
                        cache_dir=store.work_dir)
    check_weights(engine.metadata, card.artifacts, store.step_dir(step) / name)
    return engine


def check_weights(metadata: dict[str, str], artifacts: dict[str, str], path) -> None:
    """An exported file must come from the step's weights: its ``weights_sha256`` metadata
    against the card's checksum of ``weights.safetensors``.

    Raises:
        CissError: the file names other weights (or none).
    """
    made_from = metadata.get("weights_sha256")
    if made_from != artifacts.get("weights.safetensors"):
        raise CissError(f"{path}: exported from other weights ({str(made_from)[:12]}...) than "
                        f"the step's weights.safetensors; export it again with 'ciss export'")
