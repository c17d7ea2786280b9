"""The served model and how it is replaced: watch ``deployed.json``, verify, gate, swap.

Requests read :attr:`ModelSlot.current` once and keep that reference until they finish, so a
swap is one attribute assignment: in-flight requests complete on the old engine, new ones use
the new engine, and nothing is dropped. A candidate that fails to verify, load or pass the
retention gate is never assigned; the old engine keeps serving and the reason is kept in
:attr:`ModelSlot.last_error` (and in the metrics and the log).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field

from ciss.analysis.tolerances import GateThresholds
from ciss.errors import CheckFailed, CissError
from ciss.runtime.metrics import ServerMetrics
from ciss.runtime.segmenter import Segmenter
from ciss.store import Store
from ciss.store.store import DEPLOYED

log = logging.getLogger("ciss.serve")


def oip_version(step: int) -> str:
    """The OIP/Triton version of a step: step + 1 (Triton versions start at 1)."""
    return str(step + 1)


@dataclass
class SwapPolicy:
    """What the server demands of a deployment before it serves it.

    Attributes:
        engine: serve this engine instead of the one ``deployed.json`` names.
        providers: ONNX Runtime providers, best first (the first must load); None: those
            ``device`` calls for (CUDA first on a GPU host with onnxruntime-gpu).
        device: where the torch engine, the shadow parent and ONNX Runtime run ("auto":
            the GPU when there is one).
        gate: the retention gate's tolerances and the learning check's floor.
        accept_forced: serve a deployment recorded as forced past a failing gate.
    """

    engine: str | None = None
    providers: list[str] | None = None
    device: str = "auto"
    gate: GateThresholds = field(default_factory=GateThresholds)
    accept_forced: bool = False

    def ort_providers(self) -> list[str]:
        from ciss.engines.load import ort_providers

        return self.providers or ort_providers(self.device)


class MeteredEngine:
    """An engine whose runs take one of a bounded number of slots and are timed.

    Two cores gain nothing from two engine runs at once (each already uses every core), and
    oversubscription makes tail latency worse, so runs queue here; the wait is the queue time.
    """

    def __init__(self, engine, slots: int, metrics: ServerMetrics) -> None:
        self.engine = engine
        self.slots = threading.BoundedSemaphore(slots)
        self.metrics = metrics
        self.active = 0  # runs waiting for or holding a slot (the shadow watch yields to them)
        self._count = threading.Lock()

    def _timed(self, fn, images):
        t0 = time.perf_counter()
        with self._count:
            self.active += 1
        try:
            with self.slots:
                t1 = time.perf_counter()
                out = fn(images)
        finally:
            with self._count:
                self.active -= 1
        self.metrics.queue.observe(t1 - t0)
        self.metrics.compute.observe(time.perf_counter() - t1)
        return out

    def run(self, images):
        return self._timed(self.engine.run, images)

    def predict_labels(self, images):
        return self._timed(self.engine.predict_labels, images)


@dataclass(frozen=True)
class ServedModel:
    """One loaded, verified, gated engine."""

    step: int
    engine: str
    segmenter: Segmenter
    classes: list[str]
    loaded_at: str
    gate: dict
    describe: str
    calibration: object | None = None  # runtime.scoring.Calibration; None: uncalibrated

    @property
    def version(self) -> str:
        return oip_version(self.step)


@dataclass
class SwapOutcome:
    """What one look at ``deployed.json`` did: ``unchanged``, ``swapped`` or ``refused``."""

    outcome: str
    step: int | None = None
    reason: str | None = None


class ModelSlot:
    """Holds the served model and replaces it only with a candidate that passed every check.

    Args:
        store: the model store whose ``deployed.json`` is watched.
        policy: gate tolerances, engine override, providers.
        metrics: where swaps and gate results are counted.
        max_side, max_pixels: the Segmenter's resize and decoding limits.
        concurrency: engine runs allowed at once (more only oversubscribes a small CPU).
    """

    def __init__(self, store: Store, policy: SwapPolicy, metrics: ServerMetrics,
                 max_side: int = 1024, max_pixels: int = 16_000_000,
                 concurrency: int = 1, shadow=None, scores: bool = False) -> None:
        self.store = store
        self.scores = scores  # calibrate the novelty score of each step loaded
        self.shadow = shadow  # a ShadowWatch, started at every swap
        self.policy = policy
        self.metrics = metrics
        self.max_side = max_side
        self.max_pixels = max_pixels
        self.concurrency = concurrency
        self.current: ServedModel | None = None
        self.last_error: str | None = None
        self.last_swap: str | None = None
        self._seen: str | None = None
        self._loading = threading.Lock()

    def load(self, record: dict) -> ServedModel:
        """Verify, load and gate the deployment ``record`` (nothing is swapped here).

        Raises:
            CissError: unknown step, missing or tampered artifact, unloadable engine.
            CheckFailed: the retention gate failed on the loaded engine.
        """
        from ciss.engines.load import load_engine
        from ciss.runtime.gate import run_gate

        step = record.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise CissError(f"{self.store.root / DEPLOYED}: 'step' must be an integer")
        engine_name = self._engine_for(record)
        step = self.store.resolve(step)
        self.store.require_signed(step)  # with CISS_STORE_KEY: a card signed with that key
        card = self.store.verify(step)  # the card, then every artifact's checksum
        engine = load_engine(self.store, step, engine_name, self.policy.ort_providers(),
                             contexts=self.concurrency, device=self.policy.device)
        segmenter = Segmenter(MeteredEngine(engine, self.concurrency, self.metrics),
                              card.classes, max_side=self.max_side, max_pixels=self.max_pixels)
        gate = self._recorded_gate(record, step, engine_name)
        reused = gate is not None
        if not reused:
            # the gate measures what will be served: this engine, the serving resize, and
            # engine runs that queue behind live requests' (the concurrency limit) rather than
            # beside them
            gate = run_gate(self.store, step, engine=engine_name, thresholds=self.policy.gate,
                            predict=segmenter.predict_labels, max_side=self.max_side)
        self.metrics.gate_runs.labels(("reused-" if reused else "")
                                      + ("passed" if gate.passed else "failed")).inc()
        self.metrics.gate_passed.set(1 if gate.passed else 0)
        if gate.mean_old_drop is not None:
            self.metrics.gate_mean_drop.set(gate.mean_old_drop)
        if not gate.passed and not (record.get("forced") and self.policy.accept_forced):
            forced = (" (deployed with --force; start the server with --accept-forced to "
                      "serve forced deployments)" if record.get("forced") else "")
            raise CheckFailed(f"step {step} on {engine_name} failed the retention gate: "
                              + "; ".join(gate.reasons[:3]) + forced)
        return ServedModel(
            step=step, engine=engine_name, segmenter=segmenter,
            classes=list(card.classes),
            loaded_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            gate={"passed": gate.passed, "against": gate.against,
                  "mean_old_drop": gate.mean_old_drop, "reasons": gate.reasons},
            describe=engine.describe(),
            calibration=self._calibration(step, engine, engine_name))

    def _calibration(self, step: int, engine, engine_name: str):
        """The step's stored score calibration for this engine (``ciss deploy`` measures
        it); measured here, in memory, when the step has none (deployed before it existed).
        None when scores are off or nothing can be measured: novelty is then not scored."""
        if not self.scores:
            return None
        from ciss.runtime import scoring

        cal = scoring.stored_calibration(self.store, step, engine_name)
        if cal is not None:
            return cal
        try:
            cal = scoring.measure(self.store, step, engine, engine_name, self.max_side)
        except (CissError, ValueError, OSError) as exc:
            log.warning("step %d: novelty not calibrated (%s); scoring uncertainty only",
                        step, exc)
            return None
        log.info("step %d: score calibration measured at load on %d retention image(s) "
                 "(not stored; 'ciss deploy' stores it)", step, cal.images)
        return cal

    def _recorded_gate(self, record: dict, step: int, engine_name: str):
        """The result ``deploy`` recorded, when it was measured on exactly what is about to
        serve (same files, engine, device, tolerances and resize: see ``gate_fingerprint``);
        None otherwise, and the gate runs again."""
        from ciss.runtime.gate import GateResult, gate_fingerprint, where_it_runs

        saved = record.get("gate") or {}
        if record.get("step") != step or not saved.get("fingerprint") or "result" not in saved:
            return None
        where = where_it_runs(engine_name, self.policy.device, self.policy.providers)
        fingerprint = gate_fingerprint(
            self.store, step, engine_name, where, thresholds=self.policy.gate,
            max_side=self.max_side)
        if fingerprint != saved["fingerprint"]:
            return None
        log.info("step %d on %s: reusing the gate result recorded by deploy (same files, "
                 "engine, device and tolerances)", step, engine_name)
        return GateResult.from_json(saved["result"])

    def _engine_for(self, record: dict) -> str:
        return self.policy.engine or record.get("engine") or "onnx"

    def _read(self) -> tuple[str, dict]:
        path = self.store.root / DEPLOYED
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CissError(f"{path}: nothing deployed (run 'ciss deploy' first)") from None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            raise CissError(f"{path}: not valid JSON ({exc})") from exc
        return hashlib.sha256(raw).hexdigest(), record

    def start(self) -> ServedModel:
        """Load what ``deployed.json`` names now; raise instead of serving nothing.

        Raises:
            CissError: nothing deployed, or the deployment cannot be loaded.
            CheckFailed: the deployed step fails the retention gate.
        """
        with self._loading:
            key, record = self._read()
            self._seen = key
            model = self.load(record)
            self._install(model)
            return model

    def _reference(self, model: ServedModel, previous: ServedModel | None
                   ) -> ServedModel | None:
        """The shadow watch's reference: the served step's parent, which defines its old
        classes. Reused when it is what was served before, else loaded (verified, not gated;
        the same engine kind when the parent has it, torch otherwise). None when the watch is
        off, the step has no parent, or the parent cannot be loaded."""
        if self.shadow is None or self.shadow.policy.rate <= 0:
            return None
        parent = self.store.card(model.step).parent
        if parent is None:
            return None
        if previous is not None and previous.step == parent:
            return previous
        from ciss.engines.formats import has_artifact
        from ciss.engines.load import load_engine

        try:
            card = self.store.verify(parent)
            engine_name = model.engine if has_artifact(card.artifacts, model.engine) \
                else "torch"
            engine = load_engine(self.store, parent, engine_name, self.policy.ort_providers(),
                                 device=self.policy.device)
        except CissError as exc:
            log.warning("shadow watch: step %d's parent cannot be loaded (%s)", model.step, exc)
            return None
        return ServedModel(step=parent, engine=engine_name,
                           segmenter=Segmenter(engine, card.classes, max_side=self.max_side,
                                               max_pixels=self.max_pixels),
                           classes=list(card.classes), loaded_at="", gate={},
                           describe=engine.describe())

    def _install(self, model: ServedModel) -> None:
        previous = self.current
        self.current = model  # the swap: one reference assignment
        if self.shadow is not None:
            engine = model.segmenter.engine
            self.shadow.start(model, self._reference(model, previous),
                              engine_busy=lambda: getattr(engine, "active", 0) > 0)
        self.last_error = None
        self.last_swap = model.loaded_at
        self.metrics.swaps.labels("swapped").inc()
        self.metrics.served_step.set(model.step)
        self.metrics.model_info.clear()
        self.metrics.model_info.labels(str(model.step), model.engine, model.version).set(1)
        log.info("serving step %d on %s (%s)", model.step, model.engine, model.describe)

    def refresh(self, force: bool = False) -> SwapOutcome:
        """Look at ``deployed.json`` once; swap if it names a new deployment that passes.

        Args:
            force: re-examine the file even if its content was already seen (admin reload).
        """
        with self._loading:
            try:
                key, record = self._read()
            except CissError as exc:
                key, record = f"unreadable: {exc}", None
            if key == self._seen and not force:  # refused once is enough: no log every poll
                return SwapOutcome("unchanged", self.current and self.current.step)
            self._seen = key
            if record is None:
                return self._refuse(None, key.removeprefix("unreadable: "))
            cur = self.current
            if cur and not force and (cur.step, cur.engine) == (record.get("step"),
                                                                  self._engine_for(record)):
                return SwapOutcome("unchanged", cur.step)
            try:
                model = self.load(record)
            except (CissError, CheckFailed) as exc:
                return self._refuse(record.get("step"), str(exc))
            except Exception as exc:  # noqa: BLE001 - a bad engine must never stop serving
                log.exception("loading step %s failed", record.get("step"))
                return self._refuse(record.get("step"), f"{type(exc).__name__}: {exc}")
            self._install(model)
            return SwapOutcome("swapped", model.step)

    def _refuse(self, step, reason: str) -> SwapOutcome:
        self.last_error = reason
        self.metrics.swaps.labels("refused").inc()
        keep = (f"; still serving step {self.current.step}" if self.current
                else "; nothing is served")
        log.warning("deployment refused: %s%s", reason, keep)
        try:  # the overview page shows the server's refusals beside the CLI's
            self.store.record_event("refused", step=step if isinstance(step, int) else None,
                                    reasons=[reason], by="ciss serve")
        except (CissError, OSError) as exc:  # a full disk must not stop the serving
            log.warning("could not record the refusal in %s (%s)", self.store.root, exc)
        return SwapOutcome("refused", step if isinstance(step, int) else None, reason)

    def watch(self, stop: threading.Event, interval_s: float) -> None:
        """Poll ``deployed.json`` every ``interval_s`` until ``stop`` is set."""
        while not stop.wait(interval_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad deployment
                log.exception("watching %s failed", self.store.root / DEPLOYED)
