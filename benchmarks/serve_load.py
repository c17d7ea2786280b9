"""Load on ``ciss serve`` over loopback: req/s, p50/p99, errors, and a hot swap under load.

Usage: python benchmarks/serve_load.py [--store DIR --from-step 0 --to-step 1]
           [--clients 1,2,4,8] [--seconds 8] [--size 256] [--repeats 3] [--out FILE.json]
       python benchmarks/serve_load.py --shadow-rates 0,0.1,1 --clients 1,4 [...]
       python benchmarks/serve_load.py --scores --clients 1,4 [...]

The second form measures the live retention watch: --to-step (which has a parent) is served
with each shadow rate in turn (a fresh server per rate, rates interleaved within a repeat; the
alarm threshold is 0 so the watch never stops), steady load only. The third measures the
per-request scores (#31): --from-step served with --no-scores, with scores (the default), and
with scores plus --collect into a temporary folder (default caps and random share), a fresh
server per mode, modes interleaved within a repeat, steady load only.

Without --store it builds a small store first (synthetic data, tiny, 1 epoch base + 1 epoch
mib, both exported to ONNX); those 1-epoch models are what gets served, so the gate tolerances
are loosened to 100 points for them (the gate still runs in full on every swap, which is the
CPU load a real swap adds). The server is a separate process (``python -m ciss serve``); the
clients are threads of this process, each with its own keep-alive connection, POSTing the same
PNG to ``/v1/segment`` back to back. Every repeat runs each client count for --seconds, then a
swap phase: 4 clients, and halfway through ``deploy`` switches to the other step.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import machine

LOOSE = ["--max-mean-drop", "100", "--max-class-drop", "100"]


def build_store(root: Path) -> Path:
    from ciss.data.folder import open_folder
    from ciss.data.scenarios import parse_scenario, write_split
    from ciss.data.synthetic import SyntheticConfig, write_synthetic
    from ciss.exporters.export import export_step
    from ciss.store import Store
    from ciss.updater.add_classes import UpdateConfig, add_classes
    from ciss.updater.loop import LoopConfig
    from ciss.updater.methods import MethodConfig
    from ciss.updater.train import train_base

    write_synthetic(root / "data", SyntheticConfig(n_train=200, n_val=40))
    steps = write_split(open_folder(root / "data"), parse_scenario("15-5"), root / "split")
    store = Store(root / "store")
    train_base(store, steps[0], loop=LoopConfig(epochs=1), progress=False)
    add_classes(store, steps[1], method=MethodConfig(method="mib"), update=UpdateConfig(parent=0),
                loop=LoopConfig(epochs=1), progress=False)
    for step in store.steps():
        export_step(store, step, ["onnx"])
    return store.root


def png(size: int) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def load(url: str, body: bytes, clients: int, seconds: float, during=None,
         to_step: int | None = None) -> dict:
    """``clients`` threads POST ``body`` for ``seconds``; ``during`` runs halfway through."""
    import httpx

    records: list[tuple[float, float, int, str]] = []
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def client() -> None:
        mine = []
        with httpx.Client(timeout=60) as c:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    r = c.post(f"{url}/v1/segment", content=body,
                               headers={"Content-Type": "image/png"})
                    code, step = r.status_code, r.headers.get("x-ciss-step", "")
                except httpx.HTTPError:
                    code, step = 0, ""
                mine.append((t0 - start, time.perf_counter() - t0, code, step))
        with lock:
            records.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    swap_at = None
    if during is not None:
        time.sleep(seconds / 2)
        swap_at = time.perf_counter() - start
        during()
    for t in threads:
        t.join()
    lat = sorted(r[1] * 1000 for r in records)
    errors = sum(1 for r in records if r[2] != 200)
    out = {"clients": clients, "requests": len(records), "errors": errors,
           "req_per_s": len(records) / seconds,
           "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}
    if swap_at is not None:
        out["steps_seen"] = sorted({r[3] for r in records})
        first_new = min((r[0] for r in records if r[3] == str(to_step)), default=None)
        out["swap_visible_after_s"] = None if first_new is None else first_new - swap_at
    return out


def start_server(store: Path, loose: bool, extra: list[str] | None = None
                 ) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "ciss", "serve", "--store", str(store), "--port", str(port),
           "--poll", "0.2"] + (LOOSE if loose else []) + (extra or [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    raise SystemExit("server did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=None)
    ap.add_argument("--from-step", type=int, default=0)
    ap.add_argument("--to-step", type=int, default=1)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--shadow-rates", default=None, help="e.g. 0,0.1,1: measure the watch")
    ap.add_argument("--scores", action="store_true",
                    help="measure scoring: --no-scores vs scores vs scores + --collect")
    args = ap.parse_args()
    from ciss.analysis.tolerances import GateThresholds
    from ciss.runtime.deploy import deploy
    from ciss.store import Store

    tmp = tempfile.TemporaryDirectory()
    loose = args.store is None
    root = build_store(Path(tmp.name)) if loose else args.store
    store = Store(root)
    tol = {"thresholds": GateThresholds(max_mean_drop=100, max_class_drop=100)} if loose else {}
    if args.shadow_rates:
        shadow_overhead(store, root, loose, tol, args)
        tmp.cleanup()
        return
    if args.scores:
        scores_overhead(store, root, loose, tol, args, Path(tmp.name))
        tmp.cleanup()
        return
    deploy(store, args.from_step, "onnx", **tol)
    proc, url = start_server(root, loose)
    body = png(args.size)
    counts = [int(c) for c in args.clients.split(",")]
    runs: list[dict] = []
    target = args.to_step
    try:
        load(url, body, 1, 2.0)  # warm-up: first ORT runs allocate
        for rep in range(args.repeats):
            for c in counts:
                runs.append({"repeat": rep, "phase": "steady", **load(url, body, c,
                                                                      args.seconds)})
            step = target
            runs.append({"repeat": rep, "phase": "swap", "to_step": step, **load(
                url, body, 4, args.seconds,
                during=lambda s=step: deploy(store, s, "onnx", **tol), to_step=step)})
            target = args.from_step if target == args.to_step else args.to_step
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    report(runs, counts, args)
    tmp.cleanup()


def shadow_overhead(store, root: Path, loose: bool, tol: dict, args) -> None:
    """Steady load on --to-step at each shadow rate; medians over repeats, ratios to rate 0."""
    from ciss.runtime.deploy import deploy

    deploy(store, args.to_step, "onnx", force=True, **tol)
    rates = [float(r) for r in args.shadow_rates.split(",")]
    variants = {f"{r:g}": ["--accept-forced", "--shadow-rate", str(r), "--min-agreement", "0"]
                for r in rates}
    runs = compare_servers(root, loose, args, variants)
    print(f"image {args.size}x{args.size} PNG, {args.seconds:g} s per phase, {args.repeats} "
          "repeats; medians over repeats; ratios within each repeat, then their median")
    ratio_table(runs, variants, args, "shadow rate", "p50 at rate 0")


def scores_overhead(store, root: Path, loose: bool, tol: dict, args, tmp: Path) -> None:
    """Steady load on --from-step without scores, with them, and with collection; medians
    over repeats, p50 ratios to 'off' taken within each repeat."""
    from ciss.data.collection import items
    from ciss.runtime.deploy import deploy

    deploy(store, args.from_step, "onnx", **tol)  # stores the step's score calibration
    variants = {"off": ["--no-scores"], "scores": [],
                "scores+collect": ["--collect", str(tmp / "collected")]}
    runs = compare_servers(root, loose, args, variants)
    print(f"image {args.size}x{args.size} PNG to /v1/segment, {args.seconds:g} s per phase, "
          f"{args.repeats} repeats; medians over repeats; ratios within each repeat, then "
          f"their median; {len(items(tmp / 'collected'))} image(s) collected in all")
    ratio_table(runs, variants, args, "mode", "p50 off")


def compare_servers(root: Path, loose: bool, args, variants: dict[str, list[str]]
                    ) -> list[dict]:
    """Steady load on a fresh server per variant (its extra ``ciss serve`` options), the
    variants interleaved within each repeat."""
    body = png(args.size)
    counts = [int(c) for c in args.clients.split(",")]
    runs = []
    for rep in range(args.repeats):
        for name, extra in variants.items():
            proc, url = start_server(root, loose, extra)
            try:
                load(url, body, 1, 2.0)  # warm-up
                for c in counts:
                    runs.append({"repeat": rep, "variant": name,
                                 **load(url, body, c, args.seconds)})
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    return runs


def ratio_table(runs: list[dict], variants: dict, args, label: str, against: str) -> None:
    """Medians per variant and client count, p50 ratios to the first variant within each
    repeat; the JSON to --out."""
    print(f"machine: {machine()}; {os.cpu_count()} cpus shared by server and clients")
    print(f"| {label} | clients | req/s | p50 ms | p99 ms | p50 / {against} | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    first = next(iter(variants))
    summary = {}
    for name in variants:
        for c in sorted({r["clients"] for r in runs}):
            sel = [r for r in runs if r["variant"] == name and r["clients"] == c]
            base = {r["repeat"]: r["p50_ms"] for r in runs if r["variant"] == first
                    and r["clients"] == c}
            med = {k: statistics.median(r[k] for r in sel)
                   for k in ("req_per_s", "p50_ms", "p99_ms")}
            ratio = statistics.median(r["p50_ms"] / base[r["repeat"]] for r in sel)
            errors = sum(r["errors"] for r in sel)
            summary[f"{name}_{c}"] = {**med, "p50_ratio": ratio, "errors": errors}
            print(f"| {name} | {c} | {med['req_per_s']:.1f} | {med['p50_ms']:.1f} | "
                  f"{med['p99_ms']:.1f} | {ratio:.3f} | {errors} |")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))


def report(runs: list[dict], counts: list[int], args) -> None:
    print(f"machine: {machine()}; {os.cpu_count()} cpus shared by server and clients")
    print(f"image {args.size}x{args.size} PNG, {args.seconds:g} s per phase, "
          f"{args.repeats} repeats; medians over repeats")
    print("| phase | clients | req/s | p50 ms | p99 ms | errors | p99 / p50(1 client) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = {r["repeat"]: r["p50_ms"] for r in runs if r["phase"] == "steady"
            and r["clients"] == 1}
    rows = [("steady", c) for c in counts] + [("swap", 4)]
    summary = {}
    for phase, c in rows:
        sel = [r for r in runs if r["phase"] == phase and r["clients"] == c]
        med = {k: statistics.median(r[k] for r in sel) for k in ("req_per_s", "p50_ms", "p99_ms")}
        ratio = (statistics.median(r["p99_ms"] / base[r["repeat"]] for r in sel)
                 if base else float("nan"))
        errors = sum(r["errors"] for r in sel)
        summary[f"{phase}_{c}"] = {**med, "errors": errors, "p99_over_single_p50": ratio}
        print(f"| {phase} | {c} | {med['req_per_s']:.1f} | {med['p50_ms']:.1f} | "
              f"{med['p99_ms']:.1f} | {errors} | {ratio:.2f} |")
    swaps = [r for r in runs if r["phase"] == "swap"]
    def visible(r) -> str:
        s = r["swap_visible_after_s"]
        return ("not yet visible when the phase ended" if s is None
                else f"visible {s:.2f} s after deploy")

    print("swaps: " + "; ".join(f"to step {r['to_step']}: saw steps {r['steps_seen']}, new step "
                                 f"{visible(r)}, {r['errors']} errors" for r in swaps))
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
