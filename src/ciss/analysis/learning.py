"""Did the classes a step trained on get learned? Warnings that name each one that did not.

A step whose classes sit at IoU ~0 looks like any other in a table, and everything downstream
(the retention gate, export, serving) assumes a model that learned: comparing 0.0 with 0.0
protects nothing. So every training command ends by naming each class whose IoU on the val
split is below a floor, or that the model never predicts, with what to try next.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ciss import hints
from ciss.analysis.tolerances import DEFAULT_FLOOR  # noqa: F401 - re-exported: the floor's home


@dataclass
class ClassWarning:
    """One class the step did not learn.

    Attributes:
        name: the class.
        iou: its IoU on the val split (fraction), None when the split has no pixel of it.
        predicted_pixels: val pixels the model assigns to it (0 = never predicted).
        train_pixels: its labelled pixels in the training split.
        train_share: those as a fraction of all labelled training pixels.
        advice: a concrete next step.
    """

    name: str
    iou: float | None
    predicted_pixels: int
    train_pixels: int
    train_share: float
    advice: str

    def line(self, advice: bool = True) -> str:
        """The one-line ``warning:`` message for the terminal (``advice`` False: without the
        advice, for commands that give it once for every class)."""
        what = ("never predicted" if self.predicted_pixels == 0 else
                f"val IoU {100 * (self.iou or 0):.1f}")
        return (f"warning: class '{self.name}' was not learned ({what}; "
                f"{self.train_pixels} training pixels, {100 * self.train_share:.2f} %)"
                + (f": {self.advice}" if advice else ""))

    def to_json(self) -> dict:
        return asdict(self)


def model_pixels(folder, stems: list[str], model_classes) -> np.ndarray:
    """Labelled pixels of ``stems`` per class id of the model (folder classes matched by name;
    names the model does not know are left out)."""
    out = np.zeros(len(model_classes), dtype=np.int64)
    for fid, count in enumerate(folder.class_pixels(stems)):
        name = folder.classes.names[fid]
        if name in model_classes:
            out[model_classes.index(name)] += count
    return out


def _advice(share: float, still_rising: bool, loss: str | None, command: str) -> str:
    """What to try, naming only options of ``command`` (train, add-classes or import)."""
    if command == "import":  # nothing was trained: the model and the folder disagree
        return hints.IMPORT_WEAK()
    if share < 0.002:
        return hints.FEW_PIXELS()
    if still_rising:
        return hints.STILL_RISING()
    if share < 0.05 and command == "add-classes":
        return hints.SMALL_CLASS_STEP()
    if loss in ("ce", None) and share < 0.05:
        return hints.SMALL_CLASS_TRAIN()
    return hints.CHECK_MASKS()


def still_rising(validation: list[dict[str, float]]) -> bool:
    """True when the last validation point scored best by a clear margin (training was cut
    short, not converged)."""
    if len(validation) < 2:
        return False
    *earlier, last = [v["score"] for v in validation]
    return last > max(earlier) + 0.01


def learning_warnings(names: list[str], ids: list[int], iou: list[float | None],
                      cm: np.ndarray, train_pixels: np.ndarray, *,
                      floor: float = DEFAULT_FLOOR, validation: list[dict] | None = None,
                      loss: str | None = None, command: str = "train"
                      ) -> list[ClassWarning]:
    """Warnings for the classes ``ids`` that a step trained on and did not learn.

    Args:
        names: the model's class names (ids are positions).
        ids: the classes to check (those the step trained on, background excluded).
        iou: per-class IoU on the val split (None where the split has no pixel of a class).
        cm: the val confusion matrix (rows = truth, columns = prediction).
        train_pixels: labelled training pixels per class id of the model.
        floor: IoU points under which a class counts as not learned.
        validation: the training's validation points (to tell "cut short" from "stuck").
        loss: the base loss used (the advice depends on it).
        command: the command that trained (train, add-classes, import): the advice names
            only its options.
    """
    total = max(1, int(train_pixels.sum()))
    rising = still_rising(validation or [])
    out = []
    for c in ids:
        predicted = int(cm[:, c].sum())
        value = iou[c]
        if predicted > 0 and (value is None or 100 * value >= floor):
            continue
        share = int(train_pixels[c]) / total
        out.append(ClassWarning(names[c], value, predicted, int(train_pixels[c]), share,
                                _advice(share, rising, loss, command)))
    return out
