"""A torch model behind the engine interface (``--engine torch``)."""

from __future__ import annotations

import numpy as np
import torch


class TorchEngine:
    """A torch model behind the engine interface (for ``--engine torch``)."""

    def __init__(self, model: torch.nn.Module, device: str | None = None) -> None:
        """``device``: where to run (default: where the model's weights are)."""
        self.device = str(next(model.parameters()).device) if device is None else device
        self.model = model.eval().to(self.device)

    def run(self, images: np.ndarray, outputs: tuple[str, ...] = ("logits", "labels")
            ) -> dict[str, np.ndarray]:
        """uint8 [N,3,H,W] -> the named outputs; only those cross to the host."""
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
            out = {"logits": logits.float(), "labels": logits.argmax(1).to(torch.uint8)} \
                if "labels" in outputs else {"logits": logits.float()}
            return {k: out[k].cpu().numpy() for k in outputs}

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        return self.run(images, outputs=("labels",))["labels"]

    def describe(self) -> str:
        return f"torch on {self.device}"
