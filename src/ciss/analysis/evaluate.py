"""``ciss evaluate``: score a stored step on a labelled folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ciss.analysis.metrics import harmonic_iou
from ciss.analysis.scoring import FolderScores, Predictor, score_folder, torch_predictor
from ciss.data.classes import ClassList
from ciss.data.folder import open_folder
from ciss.errors import CissError
from ciss.store import StepCard, Store

ENGINES = ("torch", "onnx", "int8", "tensorrt")


@dataclass
class Evaluation:
    """Scores of one step on one folder, grouped as the DESIGN's ``--json`` contract."""

    step: int
    engine: str
    card: StepCard
    scores: FolderScores
    images: int

    def group_ids(self) -> tuple[list[int], list[int]]:
        names = self.card.classes
        old = [names.index(c) for c in self.card.old_classes]
        new = [names.index(c) for c in self.card.new_classes]
        return old, new

    def to_json(self) -> dict:
        old, new = self.group_ids()
        old_miou = self.scores.miou(old) if old else None
        new_miou = self.scores.miou(new) if new else None
        return {"step": self.step, "engine": self.engine, "miou": self.scores.miou(),
                "old_miou": old_miou, "new_miou": new_miou,
                "hiou": harmonic_iou(old_miou, new_miou),
                "per_class_iou": self.scores.per_class(),
                "unknown_classes": self.scores.unknown, "images": self.images}


def predictor_for(store: Store, step: int, engine: str, device: str = "cpu") -> Predictor:
    """A predictor for a stored step on the named engine (checksums verified first), on
    ``device`` ("auto": CUDA when present; ONNX engines then use ONNX Runtime's CUDA
    provider when it has one)."""
    from ciss.engines.load import ort_providers, torch_device

    if engine == "torch":
        dev = torch_device(device)
        model, _ = store.load_model(step, device=str(dev))
        return torch_predictor(model, dev)
    if engine in ("onnx", "int8", "tensorrt"):
        from ciss.engines.load import load_engine

        return load_engine(store, step, engine, ort_providers(device)).predict_labels
    raise CissError(f"--engine {engine}: choose from {', '.join(ENGINES)}")


def evaluate_step(store: Store, data_dir: Path, *, step: int | None = None,
                  engine: str = "torch", batch_size: int = 16,
                  device: str = "cpu", exif: str | None = None) -> Evaluation:
    """Score ``step`` (latest by default) on ``data_dir``.

    Uses the folder's val split when it names one (val.txt or VOC), else every image. The
    folder's classes are matched to the model's by name; unknown ones count as background.
    """
    step = store.resolve(step)
    folder = open_folder(data_dir, require_train=False, exif=exif)
    stems = folder.val if folder.has_val_list and folder.val else sorted(folder.images)
    if not stems:
        raise CissError(f"{data_dir}: no image to evaluate")
    card = store.card(step)
    predict = predictor_for(store, step, engine, device)
    scores = score_folder(predict, folder, stems, ClassList(tuple(card.classes)),
                          batch_size=batch_size)
    return Evaluation(step=step, engine=engine, card=card, scores=scores, images=len(stems))
