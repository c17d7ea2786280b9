"""``ciss serve``: the deployed step over HTTP (Open Inference Protocol v2, PNG masks, metrics).

This module imports FastAPI at the top (unlike most of ciss): FastAPI resolves the handlers
type hints from the module's globals. Only ``ciss serve`` imports it.

Endpoints (model name ``ciss`` unless ``--model-name``; OIP version = step + 1, as in the
exported Triton repository):

- ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/ciss[/versions/V]``,
  ``/v2/models/ciss[/versions/V]/ready``; ``POST /v2/models/ciss[/versions/V]/infer`` with
  input ``image`` UINT8 [N,3,H,W], outputs ``labels`` UINT8 [N,H,W] and ``logits`` FP32
  [N,K,H,W], JSON tensors or Triton's binary-data extension.
- ``POST /v1/segment``: image bytes in, palette PNG mask out (``?format=json`` for JSON).
- ``GET /v1/status``: served step, gate result, why the last deployment was refused.
- ``GET /metrics``: Prometheus text format.
- ``POST /admin/reload|deploy|rollback`` with ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ciss import __version__
from ciss.data.imageio import ImageTooLarge, mask_png
from ciss.engines.tensorrt import OutOfProfile
from ciss.errors import CissError
from ciss.runtime.admin import add_admin_routes
from ciss.runtime.bodies import HttpError, read_body
from ciss.runtime.collect import Collector, CollectPolicy, Scored, ScoreSink
from ciss.runtime.metrics import MeteredASGI, ServerMetrics, endpoint_label
from ciss.runtime.oip import (
    HEADER,
    InferRequest,
    ProtocolError,
    encode_infer_response,
    parse_infer_request,
)
from ciss.runtime.shadow import ShadowPolicy, ShadowWatch
from ciss.runtime.slot import ModelSlot, ServedModel, SwapPolicy, oip_version
from ciss.store import Store

log = logging.getLogger("ciss.serve")


@dataclass
class ServeConfig:
    """Everything ``ciss serve`` needs.

    Attributes:
        store: the model store (its ``deployed.json`` says what to serve).
        model_name: the OIP model name (``ciss_onnx`` gives the exported Triton repository's
            URLs, so one client configuration serves both).
        policy: gate tolerances, engine override, ORT providers, forced deployments.
        admin_token: enables ``/admin/*``; without it those answer 403.
        poll_s: how often ``deployed.json`` is checked.
        max_body_bytes: largest request body (also after gzip/deflate inflation).
        max_pixels: largest image (``/v1/segment``) or tensor (N*H*W, ``/infer``).
        max_side: ``/v1/segment`` images are shrunk to this longer side for inference.
        min_side: smaller images are refused (the network's strides need a few pixels).
        max_batch: largest N of an ``/infer`` tensor.
        concurrency: engine runs at once.
        graceful_s: how long shutdown waits for in-flight requests.
        shadow: the live retention watch (off unless ``shadow.rate`` > 0).
        scores: score every image (``runtime.scoring``: uncertainty, novelty) from the
            logits of its own engine run; in the responses and ``/metrics``.
        collect: keep unusual images and a random share (``runtime.collect``; needs scores).
    """

    store: Path
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "ciss"
    policy: SwapPolicy = field(default_factory=SwapPolicy)
    admin_token: str | None = None
    poll_s: float = 1.0
    max_body_bytes: int = 32 << 20
    max_pixels: int = 16_000_000
    max_side: int = 1024
    min_side: int = 8
    max_batch: int = 16
    concurrency: int = 1
    graceful_s: float = 10.0
    shadow: ShadowPolicy = field(default_factory=ShadowPolicy)
    scores: bool = True
    collect: CollectPolicy | None = None


def _check_tensor(images: np.ndarray, config: ServeConfig) -> None:
    if images.dtype != np.uint8:
        raise HttpError(400, f"input 'image' must be UINT8, got {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise HttpError(400, f"input 'image' must have shape [N,3,H,W], got {list(images.shape)}")
    n, _, h, w = images.shape
    if not 1 <= n <= config.max_batch:
        raise HttpError(400, f"input 'image': batch of {n}; allowed 1..{config.max_batch}")
    if min(h, w) < config.min_side:
        raise HttpError(422, f"input 'image' is {h}x{w}; the smallest side served is "
                             f"{config.min_side} px", "too_small")
    if n * h * w > config.max_pixels:
        raise HttpError(413, f"input 'image' has {n * h * w} pixels; the limit is "
                             f"{config.max_pixels}", "too_large")


def _metadata(name: str, served: ServedModel, store: Store, history: list[dict]) -> dict:
    seen, versions, stored = set(), [], set(store.steps())
    for step in [served.step] + [h.get("step") for h in reversed(history) if isinstance(h, dict)]:
        if isinstance(step, int) and step not in seen and step in stored:
            seen.add(step)
            versions.append(oip_version(step))
    k = len(served.classes)
    return {"name": name, "versions": versions, "platform": "ciss_" + served.engine,
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 3, -1, -1]}],
            "outputs": [{"name": "labels", "datatype": "UINT8", "shape": [-1, -1, -1]},
                        {"name": "logits", "datatype": "FP32", "shape": [-1, k, -1, -1]}],
            "parameters": {"step": served.step, "engine": served.engine,
                           "classes": served.classes, "runtime": served.describe,
                           "gate": served.gate, "loaded_at": served.loaded_at}}


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _parse_infer(body: bytes, header_length: str | None, config: ServeConfig) -> InferRequest:
    """An ``/infer`` body decoded and checked against what this model takes.

    Raises:
        HttpError: 400/413/422 naming the field that is wrong.
    """
    if not body:
        raise HttpError(400, "empty body: send an inference request")
    if header_length is not None and not header_length.isdigit():
        raise HttpError(400, f"{HEADER} {header_length!r} is not a number")
    try:
        req = parse_infer_request(body, None if header_length is None else int(header_length),
                                  max_elements=3 * config.max_pixels)
    except ProtocolError as exc:
        raise HttpError(400, str(exc)) from exc
    if set(req.inputs) != {"image"}:
        raise HttpError(400, f"inputs must be exactly ['image'], got {sorted(req.inputs)}")
    bad = set(req.outputs or ()) - {"labels", "logits"}
    if bad:
        raise HttpError(400, f"unknown output(s) {sorted(bad)}: choose labels, logits")
    _check_tensor(req.inputs["image"], config)
    return req


def _run_engine(served: ServedModel, req: InferRequest, scored: bool = False
                ) -> tuple[dict[str, np.ndarray], list[dict] | None]:
    """The outputs the request names (all when it names none, as the protocol says) and,
    with ``scored``, each image's scores from the same run's logits. Unscored, a labels-only
    request never materialises the K x H x W logits."""
    from ciss.runtime.scoring import safe_scores

    engine = served.segmenter.engine
    try:
        if not scored and req.outputs and set(req.outputs) == {"labels"}:
            return {"labels": engine.predict_labels(req.inputs["image"])}, None
        outputs = engine.run(req.inputs["image"])
    except OutOfProfile as exc:
        raise HttpError(422, str(exc), "out_of_profile") from exc
    if not scored:
        return outputs, None
    scores = [safe_scores(lg, served.calibration) for lg in outputs["logits"]]
    return outputs, None if any(sc is None for sc in scores) else scores


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _segment(served: ServedModel, data: bytes, as_json: bool, min_side: int,
             shadow: ShadowWatch | None = None, sink: ScoreSink | None = None) -> Response:
    """``/v1/segment``'s work (in a worker thread): decode, segment, encode."""
    try:
        image = served.segmenter.decode(data)
    except ImageTooLarge as exc:
        raise HttpError(413, str(exc), "too_large") from exc
    except CissError as exc:
        raise HttpError(400, str(exc), "bad_image") from exc
    h, w = image.shape[:2]
    if min(h, w) < min_side:
        raise HttpError(422, f"image is {w}x{h}; the smallest side served is {min_side} px",
                        "too_small")
    scores = None
    received = _now()
    try:
        if sink is not None:
            labels, scores = served.segmenter.segment_scored(image, served.calibration)
        else:
            labels = served.segmenter.segment(image)
    except OutOfProfile as exc:
        raise HttpError(422, str(exc), "out_of_profile") from exc
    if shadow is not None:
        shadow.offer(served.step, image, labels)
    headers = {"X-Ciss-Step": str(served.step), "X-Ciss-Version": served.version}
    if scores is not None:
        sink.offer(Scored(image, labels, scores, served.step, served.engine, served.classes,
                          served.calibration, received))
        scores = public_scores(scores, served)
        headers["X-Ciss-Scores"] = json.dumps(scores, separators=(",", ":"))
    if not as_json:
        return Response(mask_png(labels), media_type="image/png", headers=headers)
    counts = np.bincount(labels.ravel(), minlength=len(served.classes))
    doc = {"step": served.step, "version": served.version, "width": w, "height": h,
           "classes": served.classes,
           "pixels": {served.classes[i]: int(c) for i, c in enumerate(counts)
                      if c and i < len(served.classes)},
           "labels": labels.tolist()}
    if scores is not None:
        doc["scores"] = scores
    return JSONResponse(doc, headers=headers)


def public_scores(scores: dict, served: ServedModel) -> dict:
    """One image's scores as responses give them: the four scores and ``unusual`` (the
    calibrated thresholds they pass); the pooled vector stays inside."""
    from ciss.runtime.scoring import public, unusual

    return dict(public(scores), unusual=unusual(scores, served.calibration))


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Every error is ``{"error": message}``; client errors are counted by reason."""

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(HttpError)
    async def _http_error(request, exc: HttpError):
        metrics.failures.labels(endpoint_label(request.url.path), exc.reason).inc()
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error(400, f"invalid request: {exc.errors()[:1]}")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        log.error("request to %s failed", request.url.path, exc_info=exc)
        metrics.failures.labels(endpoint_label(request.url.path), "server").inc()
        return error(500, f"internal error ({type(exc).__name__}); see the server log")


def create_app(config: ServeConfig):
    """The FastAPI app over ``config.store``, its deployed step loaded, verified and gated.

    Raises:
        CissError: nothing deployed, or the deployment cannot be loaded.
        CheckFailed: the deployed step fails the retention gate.
    """
    store = Store(config.store)
    name = config.model_name
    metrics = ServerMetrics.create()
    slot: ModelSlot

    def on_alarm(reason: str) -> None:
        """The shadow watch's alarm: record it, and roll back when asked to."""
        try:
            store.record_event("alarm", step=slot.current.step, reason=reason, by="ciss serve")
        except (CissError, OSError) as exc:  # a full disk must not stop the serving
            log.warning("could not record the alarm in %s (%s)", store.root, exc)
        if not config.shadow.auto_rollback:
            return
        from ciss.runtime.deploy import rollback

        try:
            rollback(store, by="ciss serve (shadow watch)", reason=reason)
        except CissError as exc:
            log.error("shadow watch: cannot roll back (%s)", exc)
            return
        outcome = slot.refresh(force=True)  # the same verified, gated path as any deployment
        log.warning("shadow watch: rolled back to step %s (%s)", outcome.step, outcome.outcome)

    watch = ShadowWatch(config.shadow, metrics, on_alarm)
    if config.collect is not None and not config.scores:
        raise CissError("collecting needs the scores: turn scores on (drop --no-scores)")
    collector = Collector(config.collect) if config.collect is not None else None
    sink = ScoreSink(metrics, collector) if config.scores else None
    slot = ModelSlot(store, config.policy, metrics, max_side=config.max_side,
                     max_pixels=config.max_pixels, concurrency=config.concurrency,
                     shadow=watch, scores=config.scores)
    slot.start()
    if collector is not None:  # the overview's event log shows where traffic is collected
        try:
            store.record_event("collecting", step=slot.current.step,
                               folder=str(collector.folder.resolve()), by="ciss serve",
                               random_share=config.collect.random_share)
        except (CissError, OSError) as exc:  # a full disk must not stop the serving
            log.warning("could not record the collection in %s (%s)", store.root, exc)
    stop = threading.Event()
    state = {"ready": True}

    @asynccontextmanager
    async def lifespan(app):
        watcher = threading.Thread(target=slot.watch, args=(stop, config.poll_s),
                                   name="ciss-deploy-watcher", daemon=True)
        watcher.start()
        if sink is not None:
            sink.start()
        try:
            yield
        finally:
            state["ready"] = False  # uvicorn has drained in-flight requests by now
            stop.set()
            watcher.join(timeout=5)
            if sink is not None:
                sink.stop()
            log.info("shut down cleanly (was serving step %s)", slot.current.step)

    app = FastAPI(title="ciss", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.slot = slot
    app.state.metrics = metrics
    app.state.scores = sink

    _add_error_handlers(app, metrics)
    app.add_middleware(MeteredASGI, metrics=metrics)

    def served_version(version: str | None) -> ServedModel:
        served = slot.current
        if version is not None and version != served.version:
            raise HttpError(404, f"model {name} version {version} is not served; serving "
                                 f"version {served.version} (step {served.step})", "not_found")
        return served

    @app.get("/v2")
    def server_metadata():
        return {"name": "ciss", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    def ready():
        ok = state["ready"] and slot.current is not None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/v2/models/" + name)
    @app.get("/v2/models/" + name + "/versions/{version}")
    def model_metadata(version: str | None = None):
        served = served_version(version)
        try:
            history = (store.deployed() or {}).get("history", [])
        except CissError:  # a hand-broken deployed.json: the served model is still described
            history = []
        return _metadata(name, served, store, history if isinstance(history, list) else [])

    @app.get("/v2/models/" + name + "/ready")
    @app.get("/v2/models/" + name + "/versions/{version}/ready")
    def model_ready(version: str | None = None):
        served = slot.current
        ok = state["ready"] and (version is None or version == served.version)
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @app.post("/v2/models/" + name + "/infer")
    @app.post("/v2/models/" + name + "/versions/{version}/infer")
    async def infer(request: Request, version: str | None = None):
        served = served_version(version)  # one engine for the whole request, even mid-swap
        if _content_type(request) not in ("", "application/json", "application/octet-stream"):
            raise HttpError(415, f"Content-Type {_content_type(request)!r}: send "
                                 "application/json, or application/octet-stream with "
                                 "Inference-Header-Content-Length", "unsupported")
        body = await read_body(request, config.max_body_bytes)
        # a 9 MB JSON tensor takes ~1 s to parse: off the event loop, so health checks and
        # /metrics keep answering meanwhile
        req = await run_in_threadpool(_parse_infer, body, request.headers.get(HEADER.lower()),
                                      config)
        received = _now()
        outputs, scores = await run_in_threadpool(_run_engine, served, req, sink is not None)
        if "labels" in outputs:  # the first image of the batch may be shadowed
            watch.offer(served.step, np.ascontiguousarray(
                req.inputs["image"][0].transpose(1, 2, 0)), outputs["labels"][0])
        parameters = None
        if scores is not None:
            for i, sc in enumerate(scores):
                sink.offer(Scored(req.inputs["image"][i].transpose(1, 2, 0),
                                  outputs["labels"][i], sc, served.step, served.engine,
                                  served.classes, served.calibration, received))
            shown = [public_scores(sc, served) for sc in scores]
            # OIP parameters are scalars: the per-image list travels as one JSON string
            parameters = {"ciss_step": served.step,
                          "ciss_scores": json.dumps(shown, separators=(",", ":"))}
            if len(shown) == 1:
                parameters.update({f"ciss_{k}": v for k, v in shown[0].items()
                                   if isinstance(v, (int, float))})
        payload, header_len = await run_in_threadpool(
            encode_infer_response, name, served.version, req, outputs, parameters)
        headers = {HEADER: str(header_len)} if header_len is not None else {}
        return Response(payload, media_type="application/octet-stream" if header_len
                        else "application/json", headers=headers)

    @app.get("/v2/models/{other}")
    @app.post("/v2/models/{other}/infer")
    def unknown_model(other: str):
        raise HttpError(404, f"unknown model {other!r}; this server serves {name!r}",
                        "not_found")

    @app.post("/v1/segment")
    async def segment_image(request: Request, format: str = "png"):
        if format not in ("png", "json"):
            raise HttpError(400, f"format={format!r}: choose png or json")
        ctype = _content_type(request)
        if not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise HttpError(415, f"Content-Type {ctype or '(none)'!r}: send the image bytes as "
                                 "image/* or application/octet-stream, e.g. curl -H "
                                 "'Content-Type: image/png' --data-binary @x.png", "unsupported")
        served = slot.current
        body = await read_body(request, config.max_body_bytes)
        if not body:
            raise HttpError(400, "empty body: send the image's bytes")
        return await run_in_threadpool(_segment, served, body, format == "json",
                                       config.min_side, watch, sink)

    @app.get("/v1/status")
    def status():
        served = slot.current
        return {"step": served.step, "version": served.version, "engine": served.engine,
                "runtime": served.describe, "loaded_at": served.loaded_at, "gate": served.gate,
                "last_error": slot.last_error, "ready": state["ready"],
                "shadow": watch.status(),
                "scores": None if sink is None else dict(
                    sink.status(), calibrated=served.calibration is not None)}

    @app.get("/")
    async def overview():
        """The store overview (as ``ciss report``) with an upload form for /v1/segment."""
        from ciss.analysis.overview import build_overview, render_overview

        def page() -> str:
            ov = build_overview(store)
            ov.shadow = watch.status()
            return render_overview(ov, upload=True)

        return HTMLResponse(await run_in_threadpool(page))

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    add_admin_routes(app, config.admin_token, config.policy, slot, store)
    return app


def make_server(app, config: ServeConfig):
    """A uvicorn server for ``app`` that drains in-flight requests on shutdown."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=config.graceful_s, lifespan="on"))


def serve(config: ServeConfig, sock=None, on_ready=None) -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish (``graceful_s``).

    Args:
        sock: an already bound socket (instead of ``config.host``/``port``).
        on_ready: called with the app once it is loaded, before the port accepts connections.
    """
    if sock is None:  # a busy port is one clear line, before any model is loaded
        sock = _bind(config.host, config.port)
    app = create_app(config)
    if on_ready is not None:
        on_ready(app)
    make_server(app, config).run(sockets=[sock])


def _bind(host: str, port: int):
    """A TCP socket bound to ``host:port`` (uvicorn listens on it).

    Raises:
        CissError: the port is taken or the address is not this host's.
    """
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CissError(f"cannot listen on {host}:{port}: {exc.strerror}; another server may "
                        "be running there, choose another --port") from exc
    return sock


@contextmanager
def background(config: ServeConfig, timeout_s: float = 60.0) -> Iterator[tuple[str, object]]:
    """Serve on a free loopback port in a thread: yields (base URL, app); stops on exit.

    For the demo, tests and benchmarks: the same app and uvicorn server as ``ciss serve``.
    """
    import socket

    app = create_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = make_server(app, config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="ciss-serve")
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise CissError("the server did not start (see the log above)")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(timeout=config.graceful_s + 10)
        sock.close()
