"""The retention gate: a candidate step may not serve if its old classes regressed.

Measured per class on the retention sets (partial-label rule), on the engine that will serve,
against the parent (or ``--against``). Fails when the mean old-class IoU drops more than
``max_mean_drop`` points or any old class drops more than ``max_class_drop`` points. (An engine
that failed its export parity gate is never stored, so there is no such engine to gate: see
docs/decisions.md.)

Beside it, the learning check: a step whose *new* classes score below ``min_new_iou`` points on
the step's own retention set was not learned, and fails the same way (a model that learned
nothing would otherwise pass a retention gate that compares 0 with 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ciss.analysis.evaluate import predictor_for
from ciss.analysis.scoring import score_retention
from ciss.analysis.tolerances import GateThresholds, retention_first
from ciss.data.classes import ClassList
from ciss.data.transforms import SERVE_MAX_SIDE
from ciss.engines.formats import has_artifact
from ciss.store import Store
from ciss.store.retention import ancestors, resolve_comparison


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
    """A gate's outcome. Drops are held in points (as the tolerances and messages say them);
    :meth:`to_json`, the ``--json`` contract of ``ciss check`` (DESIGN §10), gives every
    number as a fraction; :meth:`to_record` is what ``deployed.json`` keeps (points)."""

    passed: bool
    step: int
    against: int | None
    engine: str
    mean_old_drop: float | None
    reasons: list[str] = field(default_factory=list)
    classes: list[ClassDrop] = field(default_factory=list)

    @classmethod
    def from_json(cls, doc: dict) -> GateResult:
        """The inverse of :meth:`to_record` (a result recorded by ``deploy``)."""
        classes = [ClassDrop(**c) for c in doc.get("classes", [])]
        return cls(bool(doc["passed"]), int(doc["step"]), doc.get("against"), doc["engine"],
                   doc.get("mean_old_drop"), list(doc.get("reasons", [])), classes)

    def to_record(self) -> dict:
        """Every field as held (drops in points): what ``deploy`` records."""
        return asdict(self)

    def to_json(self) -> dict:
        """The ``check --json`` document: IoU values and their drops as fractions."""
        def frac(points: float | None) -> float | None:
            return None if points is None else points / 100

        doc = asdict(self)
        doc["mean_old_drop"] = frac(self.mean_old_drop)
        for c in doc["classes"]:
            c["drop"], c["since_introduced"] = frac(c["drop"]), frac(c["since_introduced"])
        return doc


def where_it_runs(engine: str, device: str = "auto", providers: list[str] | None = None) -> str:
    """What the gate's figures depend on besides the files: the device an engine runs on
    (ONNX Runtime's providers; the GPU model for TensorRT; torch's device)."""
    from ciss.engines.load import ort_providers, torch_device

    if engine in ("onnx", "int8"):
        return ",".join(providers or ort_providers(device))
    dev = torch_device(device) if engine == "torch" else None
    if engine == "tensorrt" or (dev is not None and dev.type == "cuda"):
        import torch

        return f"cuda:{torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cuda"
    return str(dev)


def gate_fingerprint(store: Store, step: int, engine: str, where: str, *,
                     thresholds: GateThresholds, max_side: int) -> str:
    """A checksum of everything a gate result depends on: the step, its ancestors' and its
    own artifacts (weights, engines, retention sets: their sha256 from the cards), the engine,
    where it runs, the tolerances and the serving resize. Equal fingerprints, equal results:
    the server then reuses the result ``deploy`` recorded instead of scoring every retention
    image again at each start."""
    import hashlib
    import json

    chain = ancestors(store, step)
    blob = json.dumps({"step": step, "engine": engine, "where": where,
                       "tol": [thresholds.max_mean_drop, thresholds.max_class_drop,
                               thresholds.min_new_iou, max_side],
                       "artifacts": {s: store.card(s).artifacts for s in chain}},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def _introduced(store: Store, chain: list[int]) -> dict[str, int]:
    first: dict[str, int] = {}
    for s in chain:
        for name in store.card(s).new_classes:
            first.setdefault(name, s)
    return first


def serving_predictor(store: Store, step: int, engine: str, max_side: int,
                      device: str = "cpu"):
    """The stored engine behind the same resize the server applies (labels come back at the
    image's size)."""
    from ciss.runtime.segmenter import Segmenter

    return Segmenter(_Labels(predictor_for(store, step, engine, device)),
                     store.card(step).classes, max_side=max_side).predict_labels


class _Labels:
    """A bare predictor seen as an engine with ``predict_labels``."""

    def __init__(self, predict) -> None:
        self.predict_labels = predict


def parent_scores(store: Store, step: int, engine: str, max_side: int,
                  device: str = "cpu") -> dict:
    """The reference step's per-class IoU on its retention sets.

    Reused from its card when that holds scores of this very engine on every set (engine and
    retention files are checksum-verified on load, so the numbers are still theirs and
    re-decoding the sets would recompute them); scored otherwise.
    """
    card = store.card(step)
    sets = [str(s) for s in ancestors(store, step)]
    stored = {s: card.retention.get(s, {}).get(engine) for s in sets}
    if all(v is not None for v in stored.values()) and _all_within(store, sets, max_side):
        store.verify(step, ["retention"])
        return stored
    return score_retention(store, step, serving_predictor(store, step, engine, max_side,
                                                          device),
                           ClassList(tuple(card.classes)))


def _all_within(store: Store, sets: list[str], max_side: int) -> bool:
    """True when no retention image exceeds ``max_side`` (stored scores ran at native size,
    which is then exactly what the serving resize gives)."""
    return all(store.card(int(s)).data.get("retention_max_side", 10**9) <= max_side
               for s in sets)


def _learning_check(result: GateResult, card, after: dict, min_new_iou: float
                    ) -> list[ClassDrop]:
    """Add a reason for every new class of the step that scores below ``min_new_iou`` points
    on its own retention set; return an entry (``before: None``) per new class."""
    own = after.get(str(card.step), {})
    entries = []
    for name in card.new_classes:
        a = own.get(name)
        entries.append(ClassDrop(name, None, a, None, None, card.step))
        if a is None or 100 * a < min_new_iou:
            shown = "not in its retention set" if a is None else f"IoU {100 * a:.1f}"
            result.reasons.append(f"new class {name} was not learned ({shown} < "
                                  f"{min_new_iou:g} points)")
    return entries


def run_gate(store: Store, step: int | None = None, against: int | None = None,
             engine: str = "onnx", thresholds: GateThresholds = GateThresholds(),
             predict=None, max_side: int = SERVE_MAX_SIDE, device: str = "cpu") -> GateResult:
    """Compare ``step`` with ``against`` (default: its parent) on the old classes, and check
    that its new classes reach ``thresholds.min_new_iou`` points on its own retention set.

    Args:
        thresholds: the tolerated drops and the learning check's floor.
        predict: the candidate's predictor (uint8 [N,3,H,W] -> labels); default: ``engine``
            loaded from the store behind the serving resize (``max_side``). The server passes
            the very segmenter it is about to serve.
        max_side: the serving resize (longer side) applied before the engine runs.
        device: where the stored engines run ("auto": CUDA when present).

    Raises:
        CissError: unknown steps, ``against`` not an ancestor, a missing engine artifact.
    """
    step, against, chain = resolve_comparison(store, step, against)
    max_mean_drop, max_class_drop, min_new_iou = (
        thresholds.max_mean_drop, thresholds.max_class_drop, thresholds.min_new_iou)
    card = store.card(step)
    classes_now = ClassList(tuple(card.classes))
    # the step's own retention set comes with its ancestors' (it labels the new classes)
    after = score_retention(store, step, predict or serving_predictor(
        store, step, engine, max_side, device), classes_now)
    if against is None:
        # A first step (trained, or an imported production model) has no parent: nothing to
        # protect and nothing "new" to have learned. Its own scores are what later steps are
        # gated against, so a weak class is said, not refused.
        result = GateResult(True, step, None, engine, None)
        result.classes = _learning_check(result, card, after, min_new_iou)
        result.reasons = [f"note: {r.replace('new class ', 'class ', 1)} (a weak class of "
                          "the first step: a warning, not a refusal)" for r in result.reasons]
        result.reasons.append("note: step has no parent: no old class to protect")
        return result
    parent = store.card(against)
    oldest = ancestors(store, against)[0]
    before_engine = engine if has_artifact(parent.artifacts, engine) else "torch"
    before = parent_scores(store, against, before_engine, max_side, device)
    introduced = _introduced(store, chain)
    result = GateResult(True, step, against, engine, None)
    new_entries = _learning_check(result, card, after, min_new_iou)
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
    result.classes.extend(new_entries)
    result.mean_old_drop = sum(drops) / len(drops) if drops else None
    if result.mean_old_drop is not None and result.mean_old_drop > max_mean_drop:
        result.reasons.insert(0, f"mean old-class IoU dropped {result.mean_old_drop:.1f} points "
                                 f"(> {max_mean_drop:g})")
    result.passed = not result.reasons
    result.reasons = retention_first(result.reasons)
    if before_engine != engine:
        result.reasons.append(f"note: step {against} has no {engine} engine; its scores come "
                              "from torch")
    return result

