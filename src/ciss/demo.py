"""``ciss demo``: the product's story end to end on the embedded synthetic data."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ciss import hints
from ciss.analysis.tolerances import GateThresholds
from ciss.errors import CissError
from ciss.tables import pct, table


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets of one demo run."""

    n_train: int
    n_val: int
    base_iterations: int | None  # None: the default recipe's budget
    step_iterations: int | None
    gate: GateThresholds  # the gate's tolerances (a smoke run learns nothing: floor 0)


FULL = DemoPlan(n_train=2000, n_val=300, base_iterations=None, step_iterations=None,
                gate=GateThresholds())
FAST = DemoPlan(n_train=160, n_val=60, base_iterations=20, step_iterations=10,
                gate=GateThresholds(min_new_iou=0.0))


MARKER = ".ciss-demo"  # written first into every folder the demo creates


def prepare_output(out: Path, echo: Callable[[str], None]) -> None:
    """Make ``out`` an empty folder marked as the demo's own.

    A folder holding an earlier demo's marker is emptied, so ``make demo`` can run again; any
    other non-empty folder is refused: the demo never deletes what it did not create.
    """
    import shutil

    if out.exists() and not out.is_dir():
        raise CissError(f"{out}: is a file; pass another --out")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise CissError(f"{out}: exists, is not empty and was not written by 'ciss demo'; "
                            "remove it or pass another --out")
        echo(f"[0/8] {out} holds an earlier demo run: replacing it")
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by 'ciss demo'; the next demo run may replace this "
                              "folder\n")


def run_demo(out: Path, *, fast: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Synthetic data -> split 15-5 -> base -> add-classes (mib, and ft for contrast) ->
    ONNX export with parity -> full-label scores. Returns the headline numbers."""
    from ciss.analysis.evaluate import evaluate_step
    from ciss.data.folder import open_folder
    from ciss.data.scenarios import parse_scenario, write_split
    from ciss.data.synthetic import SyntheticConfig, write_synthetic
    from ciss.exporters.export import export_step
    from ciss.store import Store
    from ciss.store.listing import before_after_table
    from ciss.updater.add_classes import add_classes
    from ciss.updater.config import StepOptions, resolve_step
    from ciss.updater.train import train_base

    plan = FAST if fast else FULL
    out = Path(out)
    prepare_output(out, echo)
    t0 = time.perf_counter()
    data_dir, split_dir, store = out / "data", out / "15-5", Store(out / "store")
    echo(f"[1/8] synthetic data: {plan.n_train} train + {plan.n_val} val images -> {data_dir}")
    write_synthetic(data_dir, SyntheticConfig(n_train=plan.n_train, n_val=plan.n_val))
    echo("[2/8] split 15-5 (overlap): step-0 learns 15 classes, step-1 adds 5 dotted shapes "
         "labelled alone (old objects in those images are 'background')")
    steps = write_split(open_folder(data_dir), parse_scenario("15-5"), split_dir)
    base_cfg = resolve_step("train", StepOptions(arch="tiny", iterations=plan.base_iterations))
    echo(f"[3/8] base training of tiny on {steps[0]} ({base_cfg.loop.iterations} iterations)")
    base = train_base(store, steps[0], config=base_cfg, progress=not fast)
    echo(f"      step {base.step} written ({base.fit.seconds:.0f}s of training)")
    for w in base.warnings:
        echo(f"      {w.line()}")
    numbers = {"base_step": base.step}
    for method in ("mib", "ft"):
        step_cfg = resolve_step("add-classes", StepOptions(
            method=method, parent=base.step, iterations=plan.step_iterations), store)
        echo(f"[{4 if method == 'mib' else 5}/8] add-classes --method {method} --from 0 "
             f"({step_cfg.loop.iterations} iterations, the stem frozen and shared with the "
             "teacher)")
        rep = add_classes(store, steps[1], config=step_cfg, progress=not fast)
        echo(before_after_table(store, rep.step))
        numbers[f"{method}_step"] = rep.step
        pretune_s = rep.card.timings.get("pretune_s", 0.0)
        echo(f"      step {rep.step} ({method}) written ({rep.fit.seconds:.0f}s of training"
             + (f" + {pretune_s:.0f}s pre-tuning the classifier" if pretune_s else "") + ")")
    echo("[6/8] export every step to ONNX behind the parity gate, score on the full-label val, "
         "gate the deploys")
    rows = []
    for step in store.steps():
        (res,) = export_step(store, step, ["onnx"])
        doc = evaluate_step(store, data_dir, step=step, engine="onnx").to_json()
        card = store.card(step)
        base_miou = doc["new_miou"] if step == 0 else doc["old_miou"]
        numbers[f"step{step}"] = {"old": base_miou, "new": None if step == 0
                                  else doc["new_miou"], "agreement": res.parity.label_agreement}
        rows.append([step, card.method, pct(base_miou), "-" if step == 0 else pct(doc["new_miou"]),
                     f"{100 * res.parity.label_agreement:.2f}",
                     "pass" if res.parity.passed else "FAIL"])
    echo(table(["step", "method", "old classes mIoU %", "new classes mIoU %",
                "ONNX label agreement %", "parity"], rows))
    echo("retention gate (ciss check / ciss deploy) on the ONNX engines:")
    from ciss.errors import CheckFailed
    from ciss.runtime.deploy import deploy

    if plan.gate.min_new_iou == 0:
        echo("      (--fast: a smoke run learns nothing, so the learning check is off here)")
    for step in (numbers["mib_step"], numbers["ft_step"]):
        method = store.card(step).method
        try:
            res = deploy(store, step, "onnx", thresholds=plan.gate)
            mean = res.gate.mean_old_drop
            echo(f"      step {step} ({method}): PASS, mean old-class drop "
                 f"{0.0 if mean is None else mean:.1f} points -> deployed")
            numbers[f"{method}_gate"] = "pass"
        except CheckFailed as exc:
            echo(f"      step {step} ({method}): REFUSED. {exc}")
            numbers[f"{method}_gate"] = "refused"
    echo("[7/8] ciss diagnose: why did each step forget?")
    from ciss.analysis.diagnose import diagnose
    from ciss.analysis.report import write_report

    for method in ("ft", "mib"):
        diag = diagnose(store, numbers[f"{method}_step"])
        page, _ = write_report(diag, out / f"diagnosis-{method}")
        store.record_event("diagnosed", step=diag.step, against=diag.against,
                           report=str(page.resolve()), verdict=diag.verdict)
        numbers[f"{method}_diagnosis"] = {"lost": diag.lost, "cka": diag.cka,
                                          "transplant_gain": diag.transplant_gain}
        echo(f"      {method} (step {diag.step}, {diag.seconds}s): {diag.verdict}")
        echo(f"      report: {page}")
    if store.deployed() is None:  # nothing passed: serve the base step, which has no old class
        deploy(store, base.step, "onnx", thresholds=plan.gate)
    echo("[8/8] ciss serve: segment over HTTP, then force the ft step live and watch the server "
         "roll it back on live traffic")
    ft_step = numbers["ft_step"] if numbers.get("ft_gate") == "refused" else None
    numbers["served"] = serve_story(store, data_dir, out / "served-masks", ft_step, echo,
                                    plan.gate)
    numbers["seconds"] = round(time.perf_counter() - t0, 1)
    old = {m: numbers[f"step{numbers[m + '_step']}"]["old"] for m in ("mib", "ft")}
    echo(f"done in {numbers['seconds']}s. old-class mIoU after the new step: mib "
         f"{pct(old['mib'])}, ft {pct(old['ft'])} (base {pct(numbers['step0']['old'])})")
    echo(f"outputs in {out}: store/ (steps, engines, deployed.json), served-masks/ (PNG masks "
         "from the server), diagnosis-ft/ and diagnosis-mib/ (report.html), 15-5/ and data/")
    echo(hints.DEMO_DONE(store=store.root))
    return numbers


def serve_story(store, data_dir: Path, masks_dir: Path, ft_step: int | None,
                echo: Callable[[str], None],
                gate: GateThresholds = GateThresholds()) -> dict:
    """Serve the deployed step on loopback and segment a few val images over HTTP; then force
    the ft step live (when the gate refused it) on a server that shadows every request with the
    step's parent, and show the server rolling it back by itself."""
    import json
    import logging
    import urllib.error
    import urllib.request

    from ciss.data.folder import open_folder
    from ciss.runtime.deploy import deploy, rollback
    from ciss.runtime.server import ServeConfig, background

    def http(url: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "image/png"})
        with urllib.request.urlopen(req, timeout=120) as r:  # our own loopback server
            return r.read()

    folder = open_folder(data_dir, require_train=False)
    masks_dir.mkdir(parents=True, exist_ok=True)
    # The server logs refusals as warnings; the demo prints them itself, once.
    logging.getLogger("ciss.serve").setLevel(logging.ERROR)
    from ciss.runtime.shadow import ShadowPolicy
    from ciss.runtime.slot import SwapPolicy

    policy = SwapPolicy(gate=gate, accept_forced=True)
    watch = ShadowPolicy(rate=1.0, window=20, min_agreement=0.5, auto_rollback=True)
    config = ServeConfig(store=store.root, poll_s=0.2, policy=policy, shadow=watch)
    with background(config) as (url, app):
        meta = json.loads(http(f"{url}/v2/models/ciss"))
        echo(f"      {url}: model ciss versions {meta['versions']} (version = step + 1), "
             f"serving step {meta['parameters']['step']} on {meta['parameters']['runtime']}")
        for stem in sorted(folder.val)[:3]:
            path = folder.images[stem]
            (masks_dir / f"{stem}.png").write_bytes(http(f"{url}/v1/segment",
                                                         path.read_bytes()))
            doc = json.loads(http(f"{url}/v1/segment?format=json", path.read_bytes()))
            top = sorted(doc["pixels"].items(), key=lambda kv: -kv[1])[:3]
            echo(f"      POST /v1/segment {path.name} -> {masks_dir.name}/{stem}.png "
                 f"({doc['width']}x{doc['height']}; " + ", ".join(f"{k} {v}px" for k, v in top)
                 + ")")
        served = app.state.slot.current.step
        if ft_step is None:
            echo("      (the ft step passed the gate on this run, so there is nothing to catch)")
            return {"step": served, "rolled_back": None}
        deploy(store, ft_step, "onnx", force=True, thresholds=gate)
        echo(f"      ciss deploy --step {ft_step} --force (the ft step, forced past the gate); "
             "this server runs with --accept-forced --shadow-rate 1 --auto-rollback")
        deadline = time.monotonic() + 120
        while app.state.slot.current.step != ft_step and time.monotonic() < deadline:
            time.sleep(0.1)
        echo(f"      server: step {app.state.slot.current.step} is live; its parent shadows "
             "every request, comparing old-class pixels")
        codes, stems = [], sorted(folder.val)
        while app.state.slot.current.step == ft_step and time.monotonic() < deadline:
            try:
                http(f"{url}/v1/segment", folder.images[stems[len(codes) % len(stems)]]
                     .read_bytes())
                codes.append(200)
            except urllib.error.HTTPError as exc:
                codes.append(exc.code)
        status = json.loads(http(f"{url}/v1/status"))
        shadow = status.get("shadow") or {}
        rolled = status["step"] != ft_step
        failed = sum(c != 200 for c in codes)
        if rolled:
            echo(f"      server: {shadow.get('status', '')[:200]}")
            echo(f"      server: rolled back by itself to step {status['step']} after "
                 f"{shadow.get('samples')} shadowed requests; {failed} of {len(codes)} "
                 "requests failed (deployed.json's history records why)")
        else:
            echo("      (no alarm within the time allowed: a smoke run's base knows too little "
                 "to be shadowed); rolling back by hand")
            rollback(store)
    return {"step": served, "rolled_back": rolled, "requests": len(codes), "failed": failed,
            "shadowed": shadow.get("samples")}
