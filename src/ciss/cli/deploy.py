"""``ciss check``, ``deploy`` and ``rollback``."""

from __future__ import annotations

import functools
import json
import sys

import click

from ciss import hints
from ciss.analysis.tolerances import GateThresholds
from ciss.cli.base import ENGINE_CHOICE, device_option, main, open_store, store_option
from ciss.tables import pct, table


def _gate_options(f):
    """The gate's three tolerances as options, handed to the command as one ``thresholds``
    (``GateThresholds``: the defaults live there and nowhere else)."""
    d = GateThresholds()

    @functools.wraps(f)
    def command(*args, max_mean_drop, max_class_drop, min_new_iou, **kwargs):
        return f(*args, thresholds=GateThresholds(max_mean_drop, max_class_drop, min_new_iou),
                 **kwargs)

    command = click.option("--min-new-iou", type=click.FloatRange(min=0, max=100),
                           default=d.min_new_iou, show_default=True,
                           help="Learning check: every new class must reach this IoU (points) "
                                "on the step's own retention set.")(command)
    command = click.option("--max-class-drop", type=float, default=d.max_class_drop,
                           show_default=True,
                           help="Largest allowed drop of any old class, IoU points.")(command)
    return click.option("--max-mean-drop", type=float, default=d.max_mean_drop,
                        show_default=True,
                        help="Largest allowed drop of the mean old-class IoU, points.")(command)


@main.command()
@store_option
@click.option("--step", type=int, default=None,
              help="Candidate step (default: latest); -1 is the latest, -2 the one before.")
@click.option("--against", type=int, default=None,
              help="Reference step (default: parent); -1 is the latest, -2 the one before.")
@click.option("--engine", type=ENGINE_CHOICE, default=None,
              help="Engine to gate (default: the one that serves on this host: the TensorRT "
                   "plan when one is exported for this GPU, else onnx).")
@_gate_options
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def check(store_path, step, against, engine, thresholds, device, as_json) -> None:
    """Retention gate: exit 1 when old classes regressed on the engine that will serve, or
    when a new class was not learned (below --min-new-iou).

    Example: ciss check --step 2 --engine onnx --json
    """
    store = open_store(store_path)
    target = store.resolve(step)  # cheap refusals before the heavy imports below
    from ciss.engines.load import serving_engine
    from ciss.runtime.deploy import ensure_engine
    from ciss.runtime.gate import run_gate

    engine = engine or serving_engine(store.card(target).artifacts, device)
    ensure_engine(store, target, engine)
    result = run_gate(store, target, against, engine, thresholds, device=device)
    if as_json:
        click.echo(json.dumps(result.to_json()))
    else:
        rows = [[c.name, "new" if c.before is None and c.introduced_in == result.step
                 else "old", f"step {c.introduced_in}", pct(c.before), pct(c.after),
                 "-" if c.drop is None else f"{-c.drop:+.1f}",
                 "-" if c.since_introduced is None else f"{-c.since_introduced:+.1f}"]
                for c in result.classes]
        if rows:
            click.echo(table(["class", "group", "introduced", "before %", "after %", "change",
                              "since introduced"], rows))
        verdict = "PASS" if result.passed else "FAIL"
        mean = "-" if result.mean_old_drop is None else f"{result.mean_old_drop:.1f}"
        click.echo(f"{verdict}: step {result.step} vs {result.against} on {engine}, "
                   f"mean old-class drop {mean} points")
        for r in result.reasons:
            click.echo(f"  - {r}")
    if not result.passed:
        if not as_json:  # --json: the document alone, for scripts
            click.echo(hints.CHECK_FAILED(step=result.step))
        sys.exit(1)


@main.command()
@store_option
@click.option("--step", type=int, default=None,
              help="Step to deploy (default: latest); -1 is the latest, -2 the one before.")
@click.option("--engine", type=ENGINE_CHOICE, default=None,
              help="Engine to gate and serve (default: the TensorRT plan when one is exported "
                   "for this GPU, else onnx).")
@click.option("--force", is_flag=True, help="Deploy even if the gate fails (recorded).")
@_gate_options
@device_option
def deploy(store_path, step, engine, force, thresholds, device) -> None:
    """Gate a step and point deployed.json at it (exports the engine first if needed).

    Example: ciss deploy --step 1 --engine onnx
    """
    store = open_store(store_path)
    target = store.resolve(step)  # cheap refusals before the heavy imports below
    from ciss.engines.load import serving_engine
    from ciss.runtime.deploy import deploy as do_deploy

    engine = engine or serving_engine(store.card(target).artifacts, device)
    res = do_deploy(store, target, engine, force, thresholds, device)
    rec = res.record
    note = " (FORCED past a failing gate)" if rec["forced"] else ""
    click.echo(f"deployed step {rec['step']} on {rec['engine']}{note}; "
               f"history: {len(rec['history'])} earlier deployment(s)")
    for r in res.gate.reasons:
        if r.startswith("note: class "):  # a first step's weak classes: said, not refused
            click.echo(f"warning: {r.removeprefix('note: ')}", err=True)
    click.echo(hints.DEPLOYED_FORCED() if rec["forced"] else hints.DEPLOYED())


@main.command()
@store_option
def rollback(store_path) -> None:
    """Point deployed.json back at the previously deployed step.

    Example: ciss rollback --store ciss-store
    """
    from ciss.runtime.deploy import rollback as do_rollback

    rec = do_rollback(open_store(store_path))
    click.echo(f"rolled back to step {rec['step']} on {rec['engine']} "
               f"(from step {rec['rolled_back_from']})")


@main.command()
@store_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on (0.0.0.0 exposes it to the network).")
@click.option("--port", type=int, default=8000, show_default=True,
              help="TCP port to listen on (a busy port is refused in one line).")
@click.option("--model-name", default="ciss", show_default=True,
              help="OIP model name; 'ciss_onnx' matches the exported Triton repository's URLs.")
@click.option("--engine", type=ENGINE_CHOICE, default=None,
              help="Serve this engine instead of the one deployed.json names.")
@click.option("--providers", default=None,
              help="ONNX Runtime providers, best first, comma-separated (e.g. "
                   "CUDAExecutionProvider,CPUExecutionProvider); the first must load "
                   "(default: from --device: CUDA first where onnxruntime-gpu and a GPU are).")
@device_option
@click.option("--admin-token", envvar="CISS_ADMIN_TOKEN", default=None,
              help="Enables /admin/* with 'Authorization: Bearer <token>' (env CISS_ADMIN_TOKEN).")
@click.option("--poll", type=float, default=1.0, show_default=True,
              help="Seconds between looks at deployed.json.")
@click.option("--max-body-mb", type=float, default=32.0, show_default=True,
              help="Largest request body in MB (also after gzip inflation); larger is refused.")
@click.option("--max-pixels", type=int, default=16_000_000, show_default=True,
              help="Largest image (or N*H*W of an /infer tensor).")
@click.option("--concurrency", type=int, default=1, show_default=True,
              help="Engine runs at once (1 suits a small CPU; raise it on a GPU).")
@click.option("--accept-forced", is_flag=True,
              help="Serve a deployment forced past a failing gate (refused by default).")
@click.option("--shadow-rate", type=click.FloatRange(min=0, max=1), default=0.0,
              show_default=True,
              help="After a swap, run the previous step on this fraction of requests (off the "
                   "request path) and watch each old class's agreement; 0 = off.")
@click.option("--watch-window", type=click.IntRange(min=1), default=50, show_default=True,
              help="Shadowed requests the agreement is computed over (sliding).")
@click.option("--min-agreement", type=click.FloatRange(min=0, max=1), default=0.5,
              show_default=True,
              help="Alarm when an old class (with enough pixels) agrees less than this.")
@click.option("--auto-rollback", is_flag=True,
              help="Roll back to the previous deployment on an alarm (recorded with why).")
@click.option("--scores/--no-scores", default=True, show_default=True,
              help="Score every image (uncertainty, novelty) from its own engine run's logits: "
                   "in the responses (OIP parameters, /v1/segment JSON and X-Ciss-Scores) "
                   "and /metrics histograms.")
@click.option("--collect", "collect_dir", type=click.Path(file_okay=False), default=None,
              help="Keep unusual images (novelty or uncertainty past the step's calibrated "
                   "thresholds) and a random share in this folder, with the prediction, the "
                   "scores and the step (see 'ciss collect show DIR').")
@click.option("--collect-random", type=click.FloatRange(min=0, max=1), default=0.02,
              show_default=True, help="Share of the other images kept at random (a baseline).")
@click.option("--collect-novelty", type=float, default=None,
              help="Keep images whose novelty exceeds this (default: the step's calibrated "
                   "threshold, its retention images' 95th percentile).")
@click.option("--collect-uncertainty", type=click.FloatRange(min=0, max=1), default=None,
              help="Keep images whose uncertainty exceeds this (default: calibrated, as "
                   "--collect-novelty).")
@click.option("--collect-caps", default="10,100,1000", show_default=True,
              help="Kept images at most per minute,hour,day.")
@click.option("--collect-max-mb", type=click.FloatRange(min=0), default=1000.0,
              show_default=True, help="Keep nothing more once the folder holds this many MB.")
@_gate_options
def serve(store_path, host, port, model_name, engine, providers, device, admin_token, poll,
          max_body_mb,
          max_pixels, concurrency, accept_forced, shadow_rate, watch_window, min_agreement,
          auto_rollback, scores, collect_dir, collect_random, collect_novelty,
          collect_uncertainty, collect_caps, collect_max_mb, thresholds) -> None:
    """Serve the deployed step over HTTP; hot-swap when deployed.json changes and passes the gate.

    Speaks the Open Inference Protocol v2 (model 'ciss' by default, version = step + 1) plus
    POST /v1/segment (image in, PNG mask out), /v1/status and /metrics.

    Example: ciss serve --port 8000 --collect collected/  then  curl -H 'Content-Type:
    image/png' --data-binary @x.png localhost:8000/v1/segment -o mask.png
    """
    import logging
    from pathlib import Path

    from ciss.runtime.collect import CollectPolicy
    from ciss.runtime.server import ServeConfig
    from ciss.runtime.server import serve as run_server
    from ciss.runtime.shadow import ShadowPolicy
    from ciss.runtime.slot import SwapPolicy

    if concurrency < 1 or poll <= 0 or max_body_mb <= 0 or max_pixels < 1:
        raise click.UsageError("--concurrency, --poll, --max-body-mb and --max-pixels must be "
                               "positive")
    try:
        per_minute, per_hour, per_day = (int(x) for x in collect_caps.split(","))
    except ValueError:
        raise click.UsageError(f"--collect-caps {collect_caps!r}: give three whole numbers, "
                               "per minute,hour,day (e.g. 10,100,1000)") from None
    if collect_dir and not scores:
        raise click.UsageError("--collect needs the scores: drop --no-scores")
    collect = CollectPolicy(Path(collect_dir), random_share=collect_random,
                            novelty=collect_novelty, uncertainty=collect_uncertainty,
                            per_minute=per_minute, per_hour=per_hour, per_day=per_day,
                            max_mb=collect_max_mb) if collect_dir else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = ServeConfig(
        store=open_store(store_path).root, host=host, port=port, model_name=model_name,
        admin_token=admin_token or None,
        poll_s=poll, max_body_bytes=int(max_body_mb * (1 << 20)), max_pixels=max_pixels,
        concurrency=concurrency, scores=scores, collect=collect,
        shadow=ShadowPolicy(rate=shadow_rate, window=watch_window, min_agreement=min_agreement,
                            auto_rollback=auto_rollback),
        policy=SwapPolicy(engine=engine, device=device,
                          providers=[p.strip() for p in providers.split(",") if p.strip()]
                          if providers else None,
                          gate=thresholds, accept_forced=accept_forced))

    def announce(app) -> None:
        cur = app.state.slot.current
        click.echo(f"serving step {cur.step} (OIP version {cur.version}) on {cur.describe}; "
                   f"gate passed={cur.gate['passed']}")
        click.echo(f"listening on http://{host}:{port}  (try: curl {host}:{port}/v1/status); "
                   f"admin endpoints {'on' if admin_token else 'off'}; Ctrl-C stops")

    run_server(config, on_ready=announce)
