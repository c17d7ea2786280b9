"""``ciss prune``: bound the store's size when classes arrive every week for a year.

Every step keeps its weights, its engines (ONNX, INT8, TensorRT plans) and, when asked for,
a replay memory: tens of megabytes to gigabytes per step. A pruned step keeps its card and its
retention set, which are small and which every later step still needs: the gate scores a step
on the retention sets of its whole line, and the parent's stored scores are read from its
card. What goes is what only serving, exporting, diagnosing or training *from that step*
would read. Kept whole: the latest steps, the deployed step, the last rollback targets of
``deployed.json``, and the parent of each (the reference its gate and the server's shadow
score it against).

Never pruned: a step a running job holds a lease on (``store.lease``: the parent of an
add-classes in flight), whatever the rule says.

Recovery rule, as for ``ciss memory clear``: ``deployed.json``'s history drops the entries
that point at pruned steps before any file is deleted, so ``ciss rollback`` never lands on
one; then each step goes through ``Store.remove_artifacts`` (a pending record, the card
forgets its artifacts recording what they were, the files go, the record goes), so no card
ever names a missing file and a kill leaves a record the next command finishes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass, field

from ciss.errors import CissError
from ciss.failpoints import failpoint
from ciss.store.files import disk_bytes

KEPT_ARTIFACTS = ("retention",)  # what every descendant's gate reads


@dataclass(frozen=True)
class PrunePlan:
    """What ``prune`` would do.

    Attributes:
        keep_last, keep_rollbacks: the rule it was made with (``plan_prune``'s arguments).
        prune: steps whose heavy artifacts go, oldest first.
        keep: step -> why it stays whole.
        artifacts: step -> the artifact names that go.
        bytes: step -> bytes freed.
        history_dropped: how many ``deployed.json`` history entries point at pruned steps.
    """

    keep_last: int
    keep_rollbacks: int
    prune: list[int]
    keep: dict[int, str]
    artifacts: dict[int, list[str]] = field(default_factory=dict)
    bytes: dict[int, int] = field(default_factory=dict)
    history_dropped: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def only(self, steps: set[int], history: list[dict]) -> PrunePlan:
        """This plan restricted to ``steps``."""
        chosen = [s for s in self.prune if s in steps]
        return PrunePlan(self.keep_last, self.keep_rollbacks, chosen, self.keep,
                         {s: self.artifacts[s] for s in chosen},
                         {s: self.bytes[s] for s in chosen},
                         sum(1 for h in history if h.get("step") in set(chosen)))

    def to_json(self) -> dict:
        return {"prune": self.prune, "keep": {str(k): v for k, v in self.keep.items()},
                "artifacts": {str(k): v for k, v in self.artifacts.items()},
                "bytes": {str(k): v for k, v in self.bytes.items()},
                "total_bytes": self.total_bytes, "history_dropped": self.history_dropped}


def _protected(store, keep_last: int, keep_rollbacks: int) -> dict[int, str]:
    """Step -> why it stays whole: the latest steps, the deployed one, the rollback targets,
    and each one's parent (the reference its gate, its export's check and the server's
    shadow score it against)."""
    steps = store.steps()
    keep = {s: f"one of the latest {keep_last}" for s in steps[-keep_last:]}
    deployed = store.deployed() or {}
    if deployed.get("step") in steps:
        keep[deployed["step"]] = "deployed"
    history = deployed.get("history", [])
    targets = [h["step"] for h in history[::-1] if h.get("step") in steps]
    for s in list(dict.fromkeys(targets))[:keep_rollbacks]:
        keep.setdefault(s, "a rollback target")
    for s, why in store.leased_steps().items():
        if s in steps:
            keep.setdefault(s, why)
    for s in list(keep):
        parent = store.card(s).parent
        if parent is not None:
            keep.setdefault(parent, f"the parent of step {s} (its gate's reference)")
    return keep


def plan_prune(store, keep_last: int = 3, keep_rollbacks: int = 3) -> PrunePlan:
    """The steps ``prune`` would strip, and why the others stay whole.

    Args:
        keep_last: the latest steps kept whole (at least 1: the next add-classes starts there).
        keep_rollbacks: the most recent distinct steps of ``deployed.json``'s history kept
            whole, so that many ``ciss rollback`` calls still work.

    Raises:
        CissError: ``keep_last`` below 1 or ``keep_rollbacks`` below 0.
    """
    if keep_last < 1:
        raise CissError(f"--keep-last {keep_last}: keep at least the latest step (1)")
    if keep_rollbacks < 0:
        raise CissError(f"--keep-rollbacks {keep_rollbacks}: must be 0 or more")
    keep = _protected(store, keep_last, keep_rollbacks)
    prune, artifacts, sizes = [], {}, {}
    for s in store.steps():
        if s in keep:
            continue
        card = store.card(s)
        names = [n for n in card.artifacts if n not in KEPT_ARTIFACTS]
        # files an interrupted prune had already unrecorded but not yet deleted
        names += [n for n in card.extra.get("pruned", {}).get("artifacts", {})
                  if n not in names and (store.step_dir(s) / n).exists()]
        if not names:
            continue  # pruned already
        prune.append(s)
        artifacts[s] = names
        sizes[s] = sum(disk_bytes(store.step_dir(s) / n) for n in names)
    history = (store.deployed() or {}).get("history", [])
    return PrunePlan(keep_last, keep_rollbacks, prune, keep, artifacts, sizes,
                     sum(1 for h in history if h.get("step") in set(prune)))


def prune(store, plan: PrunePlan, by: str = "ciss prune") -> PrunePlan:
    """Strip the planned steps down to card and retention set (see the module's docstring).

    The plan is made again under the store lock with the same rule, and only steps in both
    go: one deployed or written since ``plan`` was shown is left whole. Returns what was done.
    """
    with store.lock():
        now_plan = plan_prune(store, plan.keep_last, plan.keep_rollbacks)
        deployed = store.deployed()
        done = now_plan.only(set(plan.prune), (deployed or {}).get("history", []))
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        history = list((deployed or {}).get("history", []))
        if deployed and done.history_dropped:
            gone = set(done.prune)
            store.write_deployed({**deployed, "history": [h for h in history
                                                          if h.get("step") not in gone]})
        stripped: list[int] = []
        try:
            failpoint("prune.history_dropped", store.root / "deployed.json")
            for s in done.prune:
                store.remove_artifacts(s, done.artifacts[s], _record_pruned(
                    s, done, now, by), why=by)
                stripped.append(s)
        except BaseException:  # a full disk: the history of the steps still whole comes back
            if deployed and done.history_dropped:
                with contextlib.suppress(OSError):
                    store.write_deployed({**deployed, "history": [
                        h for h in history if h.get("step") not in set(stripped)]})
            raise
    if done.prune:
        store.record_event("pruned", steps=done.prune, bytes=done.total_bytes, by=by,
                           history_dropped=done.history_dropped)
    return done


def _record_pruned(step: int, done: PrunePlan, now: str, by: str):
    """The card update of a pruned step: what went, with its checksums, when and by whom."""

    def update(card, removed: dict[str, str]) -> None:
        record = card.extra.get("pruned", {"artifacts": {}, "bytes": 0})
        card.extra["pruned"] = {"at": now, "by": by,
                                "artifacts": {**record["artifacts"], **removed},
                                "bytes": record["bytes"] + done.bytes[step]}
        if "memory" in removed and card.memory:  # the replay memory's artifact
            card.memory = {**card.memory, "images": 0, "cleared": True}

    return update
