"""The gate's tolerances, in one place: the retention gate's drops and the learning check's
floor. Plain data (no numpy, no torch): the command line builds its options from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_FLOOR = 5.0  # IoU points: below this a class counts as not learned


@dataclass(frozen=True)
class GateThresholds:
    """What ``check``, ``deploy`` and the server demand of a step.

    Attributes:
        max_mean_drop: largest allowed drop of the mean old-class IoU, points.
        max_class_drop: largest allowed drop of any one old class, points.
        min_new_iou: the learning check: every new class reaches this IoU (points) on the
            step's own retention set.
    """

    max_mean_drop: float = 5.0
    max_class_drop: float = 15.0
    min_new_iou: float = DEFAULT_FLOOR

    def to_json(self) -> dict:
        return asdict(self)
