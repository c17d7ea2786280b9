"""The step card: everything needed to rebuild, trust and compare one model step."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ciss.errors import CissError


@dataclass
class StepCard:
    """The card stored beside every step's weights (``card.json``).

    Attributes:
        step: this step's number; parent: the step it was trained from (None for step 0).
        classes: the model's class names, background first; new_classes: added by this step.
        arch: ARCHS name; frozen: stages frozen while training this step.
        method: "base", "mib", "ft", "lwf", "ilt".
        hparams: cards written before the configuration was stored once (#29) hold every
            training setting here, flat; newer cards leave it empty and do not write it
            (``config`` holds them: ``updater.config.step_settings`` reads either).
        data: fingerprint, folder and sample counts of the training data.
        retention: step -> {"engine": {class: iou}}: IoU on each retention set.
        timings: seconds per phase.
        artifacts: file name (relative to the step folder) -> sha256.
        extra: parity results, environment and anything later tools record (``pruned``:
            the files ``ciss prune`` removed, with their checksums, when and by whom).
        model_config: what rebuilds the module besides arch and classes (the model's
            ``config``: an imported SMP/transformers model's constructor arguments and
            preprocessing); empty for models ciss defines whole.
        config: the whole configuration the step was trained with, one object per part
            (``loop``, ``data``, and for add-classes ``method`` and ``update``), after the
            family's recipe and the user's options were merged, plus the ``recipe`` (family
            and its source) they started from, and the ``request`` key of the command that
            wrote it (``updater.job``).
        memory: the replay memory kept beside the step (``updater.memory``): budget, images
            per class, where they came from; empty when it keeps none.
    """

    step: int
    parent: int | None
    classes: list[str]
    new_classes: list[str]
    arch: str
    frozen: list[str]
    method: str
    hparams: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    retention: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    model_config: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        doc = asdict(self)
        if not doc["hparams"]:  # stored once, in config (#29); old cards keep theirs
            del doc["hparams"]
        return json.dumps(doc, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> StepCard:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**raw)
        except (OSError, ValueError, TypeError) as exc:
            raise CissError(f"{path}: unreadable step card ({exc})") from exc

    def pruned_message(self, name: str, path: Path) -> str | None:
        """The error for artifact ``name`` (at ``path``) when ``ciss prune`` removed it, else
        None."""
        record = self.extra.get("pruned") or {}
        if name not in record.get("artifacts", {}):
            return None
        return (f"{path}: removed by '{record.get('by', 'ciss prune')}' on "
                f"{record.get('at', '?')}; step {self.step} keeps only its card and retention set "
                "(serve, export or add classes from a step that still has its weights: see "
                "'ciss steps')")

    @property
    def old_classes(self) -> list[str]:
        """Object classes the parent knew (background excluded)."""
        return [c for c in self.classes[1:] if c not in self.new_classes]
