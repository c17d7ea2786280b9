"""A torch model behind the engine interface (``--engine torch``)."""

from __future__ import annotations

import numpy as np
import torch


class TorchEngine:
    """A torch model behind the engine interface (for ``--engine torch``)."""

    def __init__(self, model: torch.nn.Module, device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = device

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.ascontiguousarray(images)).to(self.device))
        return {"logits": logits.float().cpu().numpy(),
                "labels": logits.argmax(1).to(torch.uint8).cpu().numpy()}

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        return self.run(images)["labels"]

    def describe(self) -> str:
        return f"torch on {self.device}"
