"""Retention watched on live traffic: after a swap, the previously served step's engine runs on
a sample of the requests (off the request path) and the served step is compared with it.

Nobody labels production traffic, so the previous step stands in for the truth on its own
classes: of the pixels it assigns to old class c, the share the served step also assigns to c
is c's *agreement*; the rest went to background, a new class or another old class (as in the
diagnosis). Over a sliding window of shadowed requests, an old class with enough pixels whose
agreement falls below ``min_agreement`` raises an alarm; with ``auto_rollback`` the server rolls
back through the same verified path as ``ciss rollback``, recording why.

Cost is bounded: at most one shadow run at a time, at a lower OS priority than requests,
skipped whenever a request is waiting for or using the engine; the previous step's engine is
held only while a watch is active (``watch_requests`` shadowed requests, then released).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("ciss.serve")


@dataclass(frozen=True)
class ShadowPolicy:
    """``ciss serve --shadow-rate R --watch-window N --min-agreement A [--auto-rollback]``.

    Attributes:
        rate: fraction of requests shadowed (0 = off).
        window: shadowed requests the agreement is computed over (sliding).
        min_agreement: an old class below this (fraction) raises the alarm.
        min_pixels: pixels the previous step must assign to a class within the window before
            its agreement counts (a class seen on a handful of pixels says nothing).
        auto_rollback: roll back to the previous deployment on an alarm.
        watch_requests: shadowed requests after which a quiet watch ends and the previous
            engine is released (0: watch as long as the step is served).
    """

    rate: float = 0.0
    window: int = 50
    min_agreement: float = 0.5
    min_pixels: int = 500
    auto_rollback: bool = False
    watch_requests: int = 500


@dataclass
class _Sample:
    """One shadowed request: per old class, the reference's pixels and where they went."""

    pixels: np.ndarray  # [K_old]
    kept: np.ndarray
    to_background: np.ndarray
    to_new: np.ndarray


def compare(reference: np.ndarray, served: np.ndarray, k_ref: int) -> _Sample:
    """Where each of the reference's classes (ids 1..k_ref-1) went in the served labels.

    Ids below ``k_ref`` mean the same class in both (a child keeps its parent's ids); ids from
    ``k_ref`` up are classes the reference does not know (new classes).
    """
    ref = reference.astype(np.int64).ravel()
    out = served.astype(np.int64).ravel()
    pixels = np.bincount(ref, minlength=k_ref)[:k_ref]
    kept = np.bincount(ref[ref == out], minlength=k_ref)[:k_ref]
    to_bg = np.bincount(ref[(out == 0) & (ref != 0)], minlength=k_ref)[:k_ref]
    to_new = np.bincount(ref[out >= k_ref], minlength=k_ref)[:k_ref]
    return _Sample(pixels, kept, to_bg, to_new)


class ShadowWatch:
    """Shadows the served step with the previous one; see the module docstring.

    Args:
        policy: the knobs above.
        metrics: the server's metrics (shadow gauges and counters).
        on_alarm: called once, in the shadow thread, with the alarm's reason (the server's
            rollback).
    """

    def __init__(self, policy: ShadowPolicy, metrics, on_alarm: Callable[[str], None]) -> None:
        self.policy = policy
        self.metrics = metrics
        self.on_alarm = on_alarm
        self._lock = threading.Lock()
        self._slot = threading.Lock()  # held while a shadow run is in flight (at most one)
        self._watch: dict | None = None
        self._last: dict | None = None  # the status of the watch that ended last
        self._rng = random.Random(0)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, served, reference, engine_busy: Callable[[], bool]) -> None:
        """Watch ``served`` (a ServedModel) against ``reference`` (its parent)."""
        if self.policy.rate <= 0 or reference is None or reference.step == served.step:
            self.stop()
            return
        k_ref = len(reference.classes)
        with self._lock:
            self._watch = {"served": served, "reference": reference, "k_ref": k_ref,
                           "names": list(reference.classes), "window": deque(
                               maxlen=self.policy.window), "samples": 0, "alarm": None,
                           "engine_busy": engine_busy}
        log.info("shadow watch: step %d against step %d at rate %g", served.step,
                 reference.step, self.policy.rate)

    def stop(self, status: str | None = None) -> None:
        """End the watch and release the previous step's engine."""
        with self._lock:
            if self._watch is not None:
                self._last = self._status(self._watch, status or "ended")
            self._watch = None

    # -- the request side: cheap, never blocks ------------------------------------------------
    def offer(self, served_step: int, image: np.ndarray, labels: np.ndarray) -> None:
        """A finished request's image and served labels; maybe shadow it (in the background)."""
        w = self._watch
        if w is None or w["served"].step != served_step or w["alarm"] is not None:
            return
        if self._rng.random() >= self.policy.rate:
            return
        if not self._slot.acquire(blocking=False):
            self.metrics.shadow_skipped.labels("in_flight").inc()
            return
        threading.Thread(target=self._run, args=(w, image, labels), daemon=True,
                         name="ciss-shadow").start()

    # -- the shadow thread ----------------------------------------------------------------------
    def _run(self, w: dict, image: np.ndarray, labels: np.ndarray) -> None:
        try:
            with contextlib.suppress(AttributeError, OSError):  # below requests for the OS
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
            if w["engine_busy"]():
                self.metrics.shadow_skipped.labels("queue").inc()
                return
            reference = w["reference"].segmenter.segment(image)
            self._add(w, compare(reference, labels, w["k_ref"]))
        except Exception:  # noqa: BLE001 - a failing shadow run must never touch serving
            log.exception("shadow run failed")
        finally:
            self._slot.release()

    def _add(self, w: dict, sample: _Sample) -> None:
        with self._lock:
            if self._watch is not w:
                return  # the watch ended (swap, rollback) while this ran
            w["window"].append(sample)
            w["samples"] += 1
            self.metrics.shadow_samples.inc()
            status = self._status(w, "watching")
            for name, c in status["classes"].items():
                if c["agreement"] is not None:
                    self.metrics.shadow_agreement.labels(name).set(c["agreement"])
            low = [(n, c) for n, c in status["classes"].items()
                   if c["agreement"] is not None and c["agreement"] < self.policy.min_agreement]
            # judge only a full window: a few images say little, and a false alarm rolls back
            if low and len(w["window"]) >= self.policy.window:
                w["alarm"] = "; ".join(
                    f"{n}: agreement {100 * c['agreement']:.0f} % < "
                    f"{100 * self.policy.min_agreement:.0f} % over {c['pixels']} px "
                    f"({100 * c['to_background']:.0f} % to background, "
                    f"{100 * c['to_new']:.0f} % to new classes)" for n, c in low[:3])
            elif (self.policy.watch_requests
                  and w["samples"] >= self.policy.watch_requests):
                self._last = self._status(w, f"passed: no alarm on {w['samples']} shadowed "
                                             "requests; watch ended")
                self._watch = None
                return
            alarm = w["alarm"]
        if alarm is not None:
            self.metrics.shadow_alarms.inc()
            log.warning("shadow watch ALARM on step %d: %s", w["served"].step, alarm)
            self.on_alarm(f"step {w['served'].step} vs step {w['reference'].step} on live "
                          f"traffic: {alarm}")

    # -- reporting -----------------------------------------------------------------------------
    def _status(self, w: dict, state: str) -> dict:
        total = {k: np.zeros(w["k_ref"], np.int64) for k in
                 ("pixels", "kept", "to_background", "to_new")}
        for s in w["window"]:
            total["pixels"] += s.pixels
            total["kept"] += s.kept
            total["to_background"] += s.to_background
            total["to_new"] += s.to_new
        classes = {}
        for c in range(1, w["k_ref"]):
            n = int(total["pixels"][c])
            shares = {k: float(total[k][c]) / n if n else 0.0 for k in total}
            classes[w["names"][c]] = {
                "pixels": n,
                "agreement": shares["kept"] if n >= self.policy.min_pixels else None,
                "to_background": shares["to_background"], "to_new": shares["to_new"],
                "to_old": max(0.0, 1 - shares["kept"] - shares["to_background"]
                              - shares["to_new"]) if n else 0.0}
        return {"step": w["served"].step, "parent": w["reference"].step,
                "samples": w["samples"], "window": self.policy.window,
                "rate": self.policy.rate, "min_agreement": self.policy.min_agreement,
                "status": f"ALARM: {w['alarm']}" if w["alarm"] else state,
                "classes": classes}

    def status(self) -> dict | None:
        """The active watch (or the last one that ended), for /v1/status and the page."""
        with self._lock:
            if self._watch is not None:
                return self._status(self._watch, "watching")
            return self._last
