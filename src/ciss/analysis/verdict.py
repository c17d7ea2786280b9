"""The diagnosis in words: what forgot, where, and what to try."""

from __future__ import annotations


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


def write_verdict(d) -> str:
    """A few sentences from a :class:`~ciss.analysis.diagnose.Diagnosis`."""
    b, a = d.old_miou_before, d.old_miou_after
    if b is None or a is None:
        return "No old-class pixel was scored: nothing to say about forgetting."
    drop = 100 * (b - a)
    head = f"Old-class mIoU {100 * b:.1f} -> {100 * a:.1f} ({-drop:+.1f} points)."
    if drop < 1.0:
        return head + " Little or no forgetting on these images."
    kind, cause = _cause(d.lost)
    best, where = _where(d, drop)
    tips = []
    offset = d.bias["offset"]["new"]
    if kind in ("to_background", "mixed") and d.method != "mib":
        tips.append("--method mib (its unbiased cross-entropy and distillation use what the "
                    "old model knows about the background)")
    if kind in ("to_background", "mixed") and d.method == "mib":
        tips.append("a larger --kd-weight, or more epochs at a lower learning rate")
    if kind in ("to_new", "mixed") and (offset.get("old_miou_gain") or 0) > 0.5:
        tips.append(f"calibrating: lowering new-class logits by {offset['best_offset']:g} "
                    f"recovers {offset['old_miou_gain']:.1f} old-class points for "
                    f"{offset['new_miou_cost'] or 0:.1f} new-class points")
    if kind in ("to_new", "mixed") and d.method != "mib":
        tips.append("--method mib or --init mib against the new-class bias")
    stages = list(d.cka)
    if best is not None and best not in stages[-2:]:
        tips.append(f"freezing more of the network (--freeze {best})")
    lead = "Forgetting is" if kind == "mixed" else "Most forgetting is"
    text = f"{head} {lead} {cause}; it is {where}."
    if tips:
        text += " Try " + "; or ".join(tips) + "."
    return text
