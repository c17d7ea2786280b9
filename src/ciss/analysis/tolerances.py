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


def retention_first(reasons: list[str]) -> list[str]:
    """``reasons`` with retention failures (forgetting: what the gate exists to catch) first,
    then learning failures ("new class X was not learned"), then notes; stable within each."""
    def rank(reason: str) -> int:
        return 2 if reason.startswith("note:") else 1 if reason.startswith("new class ") else 0

    return sorted(reasons, key=rank)


def shown_reasons(reasons: list[str], step: int, learning_shown: int = 2) -> str:
    """The reasons of a refusal on one line: every retention failure (forgetting is what the
    gate is for, so one is never cut off), then at most ``learning_shown`` learning ones."""
    reasons = [r for r in retention_first(reasons) if not r.startswith("note:")]
    kept = [r for r in reasons if not r.startswith("new class ")]
    learning = [r for r in reasons if r.startswith("new class ")]
    kept += learning[:learning_shown]
    more = len(learning) - min(len(learning), learning_shown)
    return "; ".join(kept) + (f"; and {more} more new class(es) not learned (see 'ciss check "
                              f"--step {step}')" if more else "")
