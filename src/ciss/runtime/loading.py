"""Build a Segmenter for a stored step on a named engine."""

from __future__ import annotations

from ciss.runtime.segmenter import Segmenter, TorchEngine
from ciss.store import Store


def load_engine_any(store: Store, step: int, engine: str, providers: list[str] | None = None):
    """torch, onnx, int8 or tensorrt, checksums verified.

    Args:
        providers: ONNX Runtime providers for onnx/int8, best first (default: CPU).
    """
    if engine == "torch":
        model, _ = store.load_model(step)
        return TorchEngine(model)
    from ciss.runtime.engine import load_engine

    return load_engine(store, step, engine, providers)


def load_segmenter(store: Store, step: int | None, engine: str) -> Segmenter:
    step = store.resolve(step)
    card = store.card(step)
    return Segmenter(load_engine_any(store, step, engine), card.classes)
