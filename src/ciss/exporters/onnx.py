"""ONNX export: uint8 image in, logits and uint8 labels out, dynamic N/H/W, one file.

The TorchScript exporter is used on purpose: it writes one self-contained file in about a
second, keeps GlobalAveragePool (faster in ORT than the dynamo path's ReduceMean at small
sizes), and its output was measured identical to PyTorch (see the deployment notes). Every
export is checked numerically before it is kept (``ciss.exporters.parity``).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ciss import __version__
from ciss.store.card import StepCard

OPSET = 17
INPUT = "image"
OUTPUTS = ("logits", "labels")


class ExportWrapper(nn.Module):
    """Adds the label output (argmax, uint8) to a segmentation model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image)
        return logits, logits.argmax(dim=1).to(torch.uint8)


def preprocessing_note(model: nn.Module) -> str:
    """What the graph does to its input, with the model's own mean/std (not always
    ImageNet's: TF-ported encoders take 0.5/0.5)."""
    p = getattr(model, "preprocessing", None)
    if not p:
        return "uint8 RGB [N,3,H,W], normalisation inside the graph"
    return (f"uint8 RGB [N,3,H,W], normalisation inside the graph: (x/255 - mean) / std, "
            f"mean {p['mean']}, std {p['std']}")


def export_onnx(model: nn.Module, path: Path, card: StepCard, weights_sha256: str,
                example_size: int = 64) -> Path:
    """Export ``model`` to ``path`` with self-describing metadata.

    Metadata keys: ``classes`` (JSON list), ``step``, ``weights_sha256`` (of the weights it
    was exported from: checked when the engine is loaded), ``arch``, ``preprocessing``,
    ``ciss_version``.
    """
    import onnx

    model = model.eval().cpu()
    example = torch.zeros(1, 3, example_size, example_size, dtype=torch.uint8)
    dyn = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # The exporter restores the wrapper's mode afterwards: a new module is in training
        # mode, which would leave ``model`` training (BatchNorm on batch statistics).
        torch.onnx.export(ExportWrapper(model).eval(), (example,), str(path), dynamo=False,
                          opset_version=OPSET, input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes={INPUT: dyn, "logits": dyn,
                                        "labels": {0: "batch", 1: "height", 2: "width"}})
    proto = onnx.load(str(path))
    meta = {"classes": json.dumps(card.classes), "step": str(card.step),
            "weights_sha256": weights_sha256, "arch": card.arch,
            "preprocessing": preprocessing_note(model),
            "ciss_version": __version__}
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.doc_string = f"ciss step {card.step} ({card.arch}): {len(card.classes)} classes"
    onnx.save(proto, str(path))
    return path


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file as a dict."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}
