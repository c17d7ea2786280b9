"""The diagnosis in words: what forgot, where, and what to try.

It agrees with the retention gate: a step the gate refuses for one old class is never called
"little or no forgetting" because the mean hides it; every class over the gate's per-class
limit is named, with where its pixels went.
"""

from __future__ import annotations

from ciss import hints
from ciss.analysis.tolerances import GateThresholds


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _cause(lost: dict) -> tuple[str, str]:
    shares = {k: lost.get(k) or 0.0 for k in ("to_background", "to_new", "to_old")}
    top = max(shares, key=shares.get)
    if shares[top] >= 0.5:
        return top, {
            "to_background": "background shift ({} of the lost old-class pixels are now "
                             "predicted background)",
            "to_new": "new-class bias ({} of the lost old-class pixels are now predicted as a "
                      "new class)",
            "to_old": "confusion among old classes ({} of the lost pixels went to another old "
                      "class)"}[top].format(_pct(shares[top]))
    return "mixed", (f"mixed: of the lost old-class pixels {_pct(shares['to_background'])} went "
                     f"to background, {_pct(shares['to_new'])} to new classes and "
                     f"{_pct(shares['to_old'])} to other old classes")


def _where(d, drop: float) -> tuple[str | None, str]:
    gains = {k: v for k, v in d.transplant_gain.items() if v is not None}
    stages = list(d.cka)
    late = set(stages[-2:])
    if not gains:
        return None, "in no stage: no trainable stage differs from the parent"
    best = max(gains, key=gains.get)
    ordered = sorted(gains.items(), key=lambda kv: -kv[1])
    parts = ", ".join(f"{k} {v:+.1f}" for k, v in ordered[:3])
    early = stages[: max(1, len(stages) // 2)]
    cka_early = [d.cka[s] for s in early if d.cka.get(s) is not None]
    cka_note = ""
    if cka_early:
        cka_note = (f"; early stages barely changed (CKA >= {min(cka_early):.2f} up to "
                    f"{early[-1]})" if min(cka_early) > 0.9 else
                    f"; early stages changed too (CKA down to {min(cka_early):.2f})")
    if gains[best] < 0.5:
        return None, (f"in no single stage: putting back the parent's weights of one stage "
                      f"changes old-class mIoU by {parts} points{cka_note}")
    if gains[best] < 0.25 * drop:
        return None, (f"spread over several stages: putting back any one stage recovers at most "
                      f"{gains[best]:.1f} of the {drop:.1f} points ({parts}){cka_note}")
    place = "in the classifier stages" if best in late else f"in {best}"
    return best, (f"{place}: putting back the parent's weights recovers old-class mIoU by "
                  f"{parts} points{cka_note}")


def over_limit(d, max_class_drop: float) -> list[tuple[str, float, float, float]]:
    """(name, before, after, drop in points) of every old class whose IoU fell more than the
    gate's per-class limit, worst first."""
    out = []
    for name, c in d.classes.items():
        b, a = c.get("iou_before"), c.get("iou_after")
        if b is not None and a is not None and 100 * (b - a) > max_class_drop:
            out.append((name, b, a, 100 * (b - a)))
    return sorted(out, key=lambda t: -t[3])


def _class_sentence(d, worst: list[tuple[str, float, float, float]], limit: float) -> str:
    parts = []
    for name, b, a, drop in worst:
        c = d.classes[name]
        went = {k: c.get(k) or 0.0 for k in ("to_background", "to_new", "to_old")}
        top = max(went, key=went.get)
        where = {"to_background": "background", "to_new": "a new class",
                 "to_old": "another old class"}[top]
        parts.append(f"{name} {100 * b:.1f} -> {100 * a:.1f} ({-drop:+.1f}; "
                     f"{_pct(went[top])} of its pixels now {where})")
    return (f" Over the gate's per-class limit of {limit:g} points: " + "; ".join(parts)
            + ".")


def write_verdict(d, thresholds: GateThresholds = GateThresholds()) -> str:
    """A few sentences from a :class:`~ciss.analysis.diagnose.Diagnosis`, judged with the
    gate's ``thresholds`` (a class over the per-class limit is named whatever the mean)."""
    b, a = d.old_miou_before, d.old_miou_after
    if b is None or a is None:
        return "No old-class pixel was scored: nothing to say about forgetting."
    drop = 100 * (b - a)
    head = f"Old-class mIoU {100 * b:.1f} -> {100 * a:.1f} ({-drop:+.1f} points)."
    worst = over_limit(d, thresholds.max_class_drop)
    named = _class_sentence(d, worst, thresholds.max_class_drop) if worst else ""
    if drop < 1.0 and not worst:
        return head + " Little or no forgetting on these images."
    kind, cause = _cause(d.lost)
    best, where = _where(d, max(drop, 1.0))
    parent = d.against
    tips = []
    offset = d.bias["offset"]["new"]
    if kind in ("to_background", "mixed") and d.method != "mib":
        tips.append(hints.TRY_MIB(parent=parent))
    if kind in ("to_background", "mixed") and d.method == "mib":
        tips.append(hints.TRY_KD(parent=parent, kd=20))
    if kind in ("to_new", "mixed") and (offset.get("old_miou_gain") or 0) > 0.5:
        tips.append(f"calibrating: lowering new-class logits by {offset['best_offset']:g} "
                    f"recovers {offset['old_miou_gain']:.1f} old-class points for "
                    f"{offset['new_miou_cost'] or 0:.1f} new-class points")
    if kind in ("to_new", "mixed") and d.method != "mib":
        tips.append(hints.TRY_INIT(parent=parent))
    stages = list(d.cka)
    if best is not None and best not in stages[-2:]:
        tips.append(hints.TRY_FREEZE(parent=parent, stage=best))
    lead = "Forgetting is" if kind == "mixed" else "Most forgetting is"
    text = f"{head}{named} {lead} {cause}; it is {where}."
    if tips:
        text += " Try " + "; or ".join(tips) + "."
    return text
