"""ONNX Runtime behind the engine interface: ``run(images) -> {"logits", "labels"}``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ciss.errors import CissError


@dataclass
class OnnxEngine:
    """An ONNX Runtime session over a ciss ONNX file.

    Attributes:
        path: the model file.
        providers: requested providers, best first.
        threads: intra-op threads (0 = ORT's default, one per physical core).
        cache_dir: where the TensorRT execution provider keeps built engines and its timing
            cache, so a restart does not rebuild them (only used with that provider).
        tf32: let the CUDA provider use TF32 (its default, for serving); False for the
            export's parity check, compared with torch in exact fp32.
    """

    path: Path
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    threads: int = 0
    cache_dir: Path | None = None
    tf32: bool = True

    def __post_init__(self) -> None:
        from ciss.engines.ort import import_onnxruntime

        ort = import_onnxruntime()

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts,
                                                providers=provider_options(
                                                    self.providers, self.cache_dir,
                                                    self.tf32))
        except Exception as exc:  # noqa: BLE001 - ORT raises several unrelated types
            raise CissError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from exc
        # Providers silently fall back to CPU when a GPU library is missing: report what loaded.
        self.loaded = self.session.get_providers()
        if self.providers[0] not in self.loaded:
            raise CissError(f"{self.path}: requested {self.providers[0]} but ONNX Runtime "
                            f"loaded only {', '.join(self.loaded)}")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.classes = json.loads(meta.get("classes", "[]"))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N,3,H,W] -> {"logits": float32 [N,K,H,W], "labels": uint8 [N,H,W]}."""
        outs = self.session.run(None, {self.input_name: np.ascontiguousarray(images,
                                                                             dtype=np.uint8)})
        return dict(zip(self.output_names, outs))

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        outs = self.session.run(["labels"], {self.input_name: np.ascontiguousarray(
            images, dtype=np.uint8)})
        return outs[0]

    def describe(self) -> str:
        return f"onnxruntime {Path(self.path).name} on {', '.join(self.loaded)}"


def provider_options(providers: list[str], cache_dir: Path | None = None,
                     tf32: bool = True) -> list:
    """ONNX Runtime's providers list with ciss's options for each."""
    out = []
    for name in providers:
        if name == "TensorrtExecutionProvider" and cache_dir is not None:
            cache = str(Path(cache_dir) / "trt-ep")
            out.append((name, {"trt_engine_cache_enable": True,
                               "trt_engine_cache_path": cache,
                               "trt_timing_cache_enable": True,
                               "trt_timing_cache_path": cache}))
        elif name == "CUDAExecutionProvider":
            # Variable image sizes: exhaustive cuDNN search on every new shape is slow.
            opts = {"cudnn_conv_algo_search": "HEURISTIC"}
            if not tf32:
                opts["use_tf32"] = "0"
            out.append((name, opts))
        else:
            out.append(name)
    return out
