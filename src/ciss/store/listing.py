"""The rows of ``ciss steps``."""

from __future__ import annotations

from dataclasses import dataclass

from ciss.store.card import StepCard
from ciss.store.store import WEIGHTS, Store
from ciss.tables import pct, table


@dataclass
class StepRow:
    step: int
    parent: int | None
    method: str
    classes: list[str]
    new_classes: list[str]
    old_miou: float | None
    new_miou: float | None
    deployed: bool
    artifacts: dict[str, str]
    warnings: list[dict]  # classes the step trained on and did not learn (card's "learning")
    pruned: bool = False  # 'ciss prune' left only the card and the retention set
    card_state: str = "ok"  # integrity.CardState.status: "edited" cards are listed, not used

    def to_json(self) -> dict:
        return {"step": self.step, "parent": self.parent, "method": self.method,
                "classes": self.classes, "new_classes": self.new_classes,
                "deployed": self.deployed, "artifacts": self.artifacts,
                "old_miou": self.old_miou, "new_miou": self.new_miou,
                "warnings": self.warnings, "pruned": self.pruned,
                "card_state": self.card_state}


def retention_groups(card: StepCard, engine: str = "torch") -> tuple[float | None, float | None]:
    """Old/new object-class mIoU from the card's retention scores (each class where labelled)."""
    per_class: dict[str, float] = {}
    for scores in card.retention.values():
        for name, v in scores.get(engine, {}).items():
            if v is not None and name != "background":
                per_class[name] = v
    old = [per_class[c] for c in card.old_classes if c in per_class]
    new = [per_class[c] for c in card.new_classes if c in per_class]
    return (sum(old) / len(old) if old else None), (sum(new) / len(new) if new else None)


def list_steps(store: Store) -> list[StepRow]:
    deployed = store.deployed() or {}
    rows = []
    for n in store.steps():
        card = store.card(n, verify=False)  # a listing shows an edited card, flagged
        old, new = retention_groups(card)
        rows.append(StepRow(n, card.parent, card.method, card.classes, card.new_classes, old, new,
                            deployed.get("step") == n, card.artifacts,
                            card.extra.get("learning", {}).get("warnings", []),
                            pruned=WEIGHTS in card.extra.get("pruned", {}).get("artifacts", {}),
                            card_state=store.card_state(n).status))
    return rows


def before_after_table(store, step: int) -> str:
    """Per-class IoU on the retention sets: parent vs this step."""
    card = store.card(step)
    parent = store.card(card.parent) if card.parent is not None else None
    rows = []
    for s, scores in card.retention.items():
        before = parent.retention.get(s, {}).get("torch", {}) if parent else {}
        for name, after in scores["torch"].items():
            if after is None or name == "background":
                continue
            kind = "new" if name in card.new_classes else "old"
            b = before.get(name)
            drop = "" if b is None else f"{100 * (after - b):+.1f}"
            rows.append([name, kind, f"step {s}", pct(b), pct(after), drop])
    return table(["class", "group", "retention set", "before %", "after %", "change"], rows)
