"""The retention gate: a candidate step may not serve if its old classes regressed.

Measured per class on the retention sets (partial-label rule), on the engine that will serve,
against the parent (or ``--against``). Fails when the mean old-class IoU drops more than
``max_mean_drop`` points, any old class drops more than ``max_class_drop`` points, or the
engine's export parity gate failed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ciss.analysis.evaluate import predictor_for
from ciss.data.classes import ClassList
from ciss.exporters.export import has_artifact
from ciss.store import Store
from ciss.store.retention import ancestors, resolve_comparison
from ciss.updater.add_classes import score_retention


@dataclass
class ClassDrop:
    name: str
    before: float | None
    after: float | None
    drop: float | None  # points (percentage), positive = worse
    since_introduced: float | None  # points lost since the step that introduced the class
    introduced_in: int


@dataclass
class GateResult:
    """The ``--json`` contract of ``ciss check`` (IoU as fractions, drops in points)."""

    passed: bool
    step: int
    against: int | None
    engine: str
    mean_old_drop: float | None
    reasons: list[str] = field(default_factory=list)
    classes: list[ClassDrop] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _introduced(store: Store, chain: list[int]) -> dict[str, int]:
    first: dict[str, int] = {}
    for s in chain:
        for name in store.card(s).new_classes:
            first.setdefault(name, s)
    return first


def run_gate(store: Store, step: int | None = None, against: int | None = None,
             engine: str = "onnx", max_mean_drop: float = 5.0,
             max_class_drop: float = 15.0, predict=None) -> GateResult:
    """Compare ``step`` with ``against`` (default: its parent) on the old classes.

    Args:
        predict: the candidate's predictor (uint8 [N,3,H,W] -> labels); default: ``engine``
            loaded from the store. The server passes the very engine it is about to serve.

    Raises:
        CissError: unknown steps, ``against`` not an ancestor, a missing engine artifact.
    """
    step, against, chain = resolve_comparison(store, step, against)
    card = store.card(step)
    if against is None:
        return GateResult(True, step, None, engine, None,
                          ["step has no parent: no old class to protect"])
    parent = store.card(against)
    oldest = ancestors(store, against)[0]
    classes_now = ClassList(tuple(card.classes))
    after = score_retention(store, against, predict or predictor_for(store, step, engine),
                            classes_now)
    before_engine = engine if has_artifact(parent.artifacts, engine) else "torch"
    before = score_retention(store, against, predictor_for(store, against, before_engine),
                             ClassList(tuple(parent.classes)))
    introduced = _introduced(store, chain)
    result = GateResult(True, step, against, engine, None)
    drops = []
    for name in parent.classes[1:]:
        s = str(introduced.get(name, oldest))
        b = before.get(s, {}).get(name)
        a = after.get(s, {}).get(name)
        d = None if a is None or b is None else 100 * (b - a)
        first = store.card(int(s)).retention.get(s, {}).get("torch", {}).get(name)
        since = None if a is None or first is None else 100 * (first - a)
        result.classes.append(ClassDrop(name, b, a, d, since, int(s)))
        if d is not None:
            drops.append(d)
            if d > max_class_drop:
                result.reasons.append(f"{name}: IoU {100 * b:.1f} -> {100 * a:.1f} "
                                      f"(-{d:.1f} points > {max_class_drop:g})")
    result.mean_old_drop = sum(drops) / len(drops) if drops else None
    if result.mean_old_drop is not None and result.mean_old_drop > max_mean_drop:
        result.reasons.insert(0, f"mean old-class IoU dropped {result.mean_old_drop:.1f} points "
                                 f"(> {max_mean_drop:g})")
    if engine != "torch":
        parity = card.extra.get("parity", {}).get(engine)
        if parity is not None and not parity.get("passed", False):
            result.reasons.append(f"the {engine} export failed its parity gate")
    result.passed = not result.reasons
    if before_engine != engine:
        result.reasons.append(f"note: step {against} has no {engine} engine; its scores come "
                              "from torch")
    return result

