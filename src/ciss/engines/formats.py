"""The formats table: one row per compiled artifact. Export, loading, the gate and the docs all
read it, so a new format is one row."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ciss.errors import CissError


@dataclass(frozen=True)
class Format:
    """One row of the formats table.

    Attributes:
        artifact: file (or folder) name inside the step; None for formats written elsewhere.
        engine: the runtime engine name that serves it (None: not served by ciss itself).
        needs: what the machine must have.
    """

    artifact: str | None
    engine: str | None
    needs: str


FORMATS: dict[str, Format] = {
    "onnx": Format("model.onnx", "onnx", "onnx, onnxruntime"),
    "int8": Format("model.int8.onnx", "int8", "onnxruntime (quantization); a model.onnx"),
    "tensorrt": Format("engines/", "tensorrt", "an NVIDIA GPU, tensorrt>=10, a model.onnx"),
    "triton": Format(None, None, "--out DIR; model.onnx and/or a TensorRT plan"),
}


def has_artifact(artifacts: dict[str, str], fmt: str) -> bool:
    """Whether a card's artifacts include format ``fmt``'s (torch needs none)."""
    if fmt == "torch":
        return True
    name = check_format(fmt).artifact
    if name is None:
        return False
    return any(a.startswith(name) for a in artifacts) if name.endswith("/") else name in artifacts


def check_format(name: str) -> Format:
    if name not in FORMATS:
        hint = difflib.get_close_matches(name, list(FORMATS), n=1)
        raise CissError(f"unknown format '{name}'" + (f"; did you mean '{hint[0]}'?" if hint
                                                        else "")
                        + f" (choose from {', '.join(FORMATS)})")
    return FORMATS[name]
