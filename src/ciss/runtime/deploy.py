"""Promote a step to serving (``deployed.json``), gated on retention; roll back."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from ciss.analysis.tolerances import GateThresholds, shown_reasons
from ciss.data.transforms import SERVE_MAX_SIDE
from ciss.errors import CheckFailed, CissError
from ciss.failpoints import failpoint
from ciss.hints import CHECK_FAILED, REFUSED
from ciss.runtime.gate import GateResult, gate_fingerprint, run_gate, where_it_runs
from ciss.store import Store

HISTORY = 50
log = logging.getLogger("ciss.deploy")


@dataclass
class DeployResult:
    record: dict
    gate: GateResult


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def ensure_engine(store: Store, step: int, engine: str) -> None:
    """Export the engine's artifact first when the step does not have it yet."""
    from ciss.engines.formats import has_artifact
    from ciss.exporters.export import export_step

    if not has_artifact(store.card(step).artifacts, engine):
        export_step(store, step, [engine])


def ensure_calibration(store: Store, step: int, engine: str, device: str = "cpu") -> None:
    """Measure the step's score calibration (``runtime.scoring``) on ``engine`` when it has
    none yet, and store it as a step artifact (before the gate's fingerprint, which names
    every artifact). A failure is logged, never raised: the server then measures it at load,
    or scores uncertainty only."""
    from ciss.runtime.scoring import calibrate_step, stored_calibration

    try:
        if stored_calibration(store, step, engine) is None:
            calibrate_step(store, step, engine, device)
    except (CissError, ValueError, OSError) as exc:
        log.warning("step %d: score calibration not stored (%s)", step, exc)


def deploy(store: Store, step: int | None = None, engine: str = "onnx", force: bool = False,
           thresholds: GateThresholds = GateThresholds(), device: str = "cpu") -> DeployResult:
    """Gate ``step`` on ``engine`` and point ``deployed.json`` at it.

    Raises:
        CheckFailed: the gate failed and ``force`` is False (nothing changes).
    """
    if engine not in ("onnx", "int8", "tensorrt", "torch"):
        raise CissError(f"--engine {engine}: choose onnx, int8, tensorrt or torch")
    step = store.resolve(step)
    # the lease keeps 'ciss prune' off this step while it is exported and gated
    with store.lease(None, steps=[step]):
        ensure_engine(store, step, engine)
        ensure_calibration(store, step, engine, device)
        store.verify(step)
        gate = run_gate(store, step, engine=engine, thresholds=thresholds, device=device)
        fingerprint = gate_fingerprint(store, step, engine, where_it_runs(engine, device),
                                       thresholds=thresholds, max_side=SERVE_MAX_SIDE)
        summary = {"step": step, "engine": engine, "mean_old_drop": gate.mean_old_drop,
                   "reasons": gate.reasons, "by": "ciss deploy"}
        if not gate.passed and not force:
            store.record_event("refused", **summary)
            raise CheckFailed(f"step {step} refused: " + shown_reasons(gate.reasons, step)
                              + "; " + REFUSED() + "\n" + CHECK_FAILED(step=step))
        failpoint("deploy.gated", store.root)
        record = _point_at(store, step, engine, gate, fingerprint, force, summary)
    return DeployResult(record, gate)


def _point_at(store: Store, step: int, engine: str, gate: GateResult, fingerprint: str,
              force: bool, summary: dict) -> dict:
    """Move ``deployed.json`` to ``step`` with its event; returns the record written.

    Recovery rule: the gate ran outside the lock, so the step is checked again under it
    (every file present and matching its card, the card matching its manifest) before the
    pointer moves; the pointer and its event are one change (``Store.move_pointer``: the
    event is recovered from the pointer after a kill).
    """
    with store.lock():
        store.verify(step)
        failpoint("deploy.rechecked", store.root)
        current = store.deployed() or {}
        history = list(current.get("history", []))
        if current.get("step") is not None:
            history.append({k: current[k] for k in ("step", "engine", "since", "forced", "gate")
                            if k in current})
        forced = bool(force and not gate.passed)
        record = {"step": step, "engine": engine, "since": _now(), "forced": forced,
                  "gate": {"passed": gate.passed, "mean_old_drop": gate.mean_old_drop,
                           "reasons": gate.reasons, "fingerprint": fingerprint,
                           "result": gate.to_record()},
                  "history": history[-HISTORY:]}
        return store.move_pointer(record, "forced" if forced else "deployed", **summary)


def rollback(store: Store, *, by: str = "ciss rollback", reason: str = "") -> dict:
    """Point ``deployed.json`` back at the previously deployed step (checksums verified).

    ``by`` and ``reason`` go into the store's event log (the server's automatic rollback
    names itself and the alarm)."""
    with store.lock():
        current = store.deployed()
        if not current or not current.get("history"):
            raise CissError(f"{store.root}: nothing to roll back to (no earlier deployment)")
        history = list(current["history"])
        previous = history.pop()
        store.verify(previous["step"])
        failpoint("rollback.verified", store.root)
        # the restored deployment keeps what it was: a forced one stays forced, so a server
        # without --accept-forced still refuses it after a rollback
        record = {"step": previous["step"], "engine": previous["engine"], "since": _now(),
                  "forced": bool(previous.get("forced", False)),
                  "rolled_back_from": current["step"], "history": history}
        if reason:
            record["reason"] = reason
        if "gate" in previous:
            record["gate"] = previous["gate"]
        record = store.move_pointer(record, "rolled_back", step=record["step"],
                                    engine=record["engine"],
                                    rolled_back_from=record["rolled_back_from"], by=by,
                                    reason=reason)
    return record
