"""The GPU acceptance run: every GPU path of ciss once, with figures, in <= 8 minutes on one
H100/H200. ``--smoke`` runs the same stages on the CPU with tiny sizes (a test runs it, so the
script cannot rot before a GPU is lent).

Stages (each records ok / failed / skipped with the reason, and its seconds):
  env        torch, CUDA, GPU, compute capability, ONNX Runtime providers, TensorRT version
  data       synthetic 15-5 split at --size px
  base       step 0 (a short base training of --arch, random init)
  add        add-classes (mib, the family's recipe, a fixed budget): images/s, peak GPU memory,
             share of training time spent waiting for data
  export     ONNX (parity), TensorRT fp16 and INT8 (build time, parity), raw engine runs/s at
             batch 1 for ONNX Runtime and each plan
  serve      ``ciss serve`` on the plan (else ONNX): p50/p99 and req/s at 1 and 8 clients vs
             the raw engine's runs/s, then a hot swap under load with the failed requests
  torchrun   add-classes under torchrun over every GPU present (2 CPU processes in smoke)

Usage:
    python benchmarks/gpu_check.py --out /tmp/gpu-check            # on the GPU machine
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu-smoke    # anywhere
Writes OUT/gpu_check.json and OUT/gpu_check.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import machine, run_torchrun  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """Sizes of one run."""

    arch: str
    size: int
    n_train: int
    n_val: int
    base_iterations: int
    add_iterations: int
    batch: int
    serve_seconds: float
    runs: int
    torchrun_iterations: int


FULL = Plan("deeplabv3_resnet50", 512, 320, 48, 60, 300, 8, 8.0, 50, 40)
SMOKE = Plan("tiny", 48, 48, 24, 4, 6, 4, 1.5, 5, 4)


class Report:
    """The stages' results, written out after every stage: a run stopped by a device lease's
    time limit (H200, 2026-12-04: the full run outlasted a 235 s slot) keeps what it measured."""

    def __init__(self, out: Path, header: dict) -> None:
        self.out = out
        self.header = header
        self.stages: dict[str, dict] = {}

    def stage(self, name: str, fn) -> dict:
        t0 = time.perf_counter()
        try:
            figures = fn() or {}
            status = figures.pop("status", "ok")
        except Skip as exc:
            figures, status = {"reason": str(exc)}, "skipped"
        except Exception as exc:  # noqa: BLE001 - the run goes on; the failure is recorded
            figures = {"error": f"{exc.__class__.__name__}: {str(exc)[:500]}",
                       "trace": traceback.format_exc()[-2000:]}
            status = "failed"
        self.stages[name] = {"status": status, "seconds": round(time.perf_counter() - t0, 1),
                             **figures}
        print(f"[{name}] {status} in {self.stages[name]['seconds']}s: "
              + json.dumps({k: v for k, v in figures.items() if k != "trace"})[:400],
              flush=True)
        self.write()
        return self.stages[name]

    def write(self) -> None:
        header = self.header
        self.out.mkdir(parents=True, exist_ok=True)
        doc = {**header, "stages": self.stages}
        (self.out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
        lines = [f"# ciss GPU check ({header['mode']})", "", f"machine: {header['machine']}", "",
                 "| stage | status | s | figures |", "|---|---|---|---|"]
        for name, st in self.stages.items():
            figs = ", ".join(f"{k}={v}" for k, v in st.items()
                             if k not in ("status", "seconds", "trace"))
            lines.append(f"| {name} | {st['status']} | {st['seconds']} | {figs[:600]} |")
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


class Skip(Exception):
    """A stage that cannot run here (no GPU, no TensorRT): recorded as skipped."""


def env() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                    compute_capability=".".join(map(str, torch.cuda.get_device_capability())),
                    bf16_autocast=torch.cuda.get_device_capability()[0] >= 8)
    try:
        import onnxruntime as ort

        info.update(onnxruntime=ort.__version__, providers=ort.get_available_providers())
    except ImportError:
        info["onnxruntime"] = None
    try:
        import tensorrt as trt

        info["tensorrt"] = trt.__version__
    except ImportError:
        info["tensorrt"] = None
    return info


def make_data(root: Path, plan: Plan) -> Path:
    from ciss.data.folder import open_folder
    from ciss.data.scenarios import parse_scenario, write_split
    from ciss.data.synthetic import SyntheticConfig, write_synthetic

    write_synthetic(root / "data", SyntheticConfig(size=plan.size, n_train=plan.n_train,
                                                   n_val=plan.n_val))
    write_split(open_folder(root / "data"), parse_scenario("15-5"), root / "split")
    return root / "split"


def base_step(store, split: Path, plan: Plan, device: str) -> dict:
    from dataclasses import replace

    from ciss.updater.config import StepOptions, resolve_step
    from ciss.updater.train import train_base

    config = resolve_step("train", StepOptions(arch=plan.arch, iterations=plan.base_iterations,
                                               batch_size=plan.batch, device=device,
                                               crop_size=plan.size))
    config = replace(config, loop=replace(config.loop, evals=0))  # timing only: no validation
    rep = train_base(store, split / "step-0", config=config, progress=False)
    return {"step": rep.step, "train_s": rep.card.timings["train_s"]}


def add_step(store, split: Path, plan: Plan, device: str, method: str = "mib") -> dict:
    from ciss.updater.add_classes import add_classes
    from ciss.updater.config import StepOptions, resolve_step, step_settings

    config = resolve_step("add-classes", StepOptions(
        method=method, parent=0, iterations=plan.add_iterations, batch_size=plan.batch,
        device=device, crop_size=plan.size), store)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rep = add_classes(store, split / "step-1", config=config, progress=False)
    settings = step_settings(rep.card)
    t = rep.card.timings
    out = {"step": rep.step, "iterations": t["iterations"], "train_s": t["train_s"],
           "images_per_s": round(t["iterations"] * plan.batch / max(t["train_s"], 1e-9), 1),
           "data_wait_share": round(t.get("data_wait_s", 0.0) / max(t["train_s"], 1e-9), 3),
           "recipe": f"{settings['optimizer']} lr {settings['lr']}"}
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def runs_per_s(engine, size: int, runs: int) -> float:
    x = np.random.default_rng(0).integers(0, 255, (1, 3, size, size), dtype=np.uint8)
    for _ in range(3):
        engine.predict_labels(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        engine.predict_labels(x)
        times.append(time.perf_counter() - t0)
    return round(1.0 / statistics.median(times), 1)


def export_all(store, steps: list[int], plan: Plan, gpu: bool) -> dict:
    from ciss.engines.load import load_engine, ort_providers
    from ciss.exporters.export import export_step

    out: dict = {}
    for step in steps:
        (res,) = export_step(store, step, ["onnx"], device="auto")  # the gate on the GPU
        out[f"onnx_parity_step{step}"] = res.parity.passed
        out[f"onnx_parity_device_step{step}"] = res.parity.device
        out[f"onnx_parity_max_logit_diff_step{step}"] = res.parity.max_abs_logit_diff
    top = steps[-1]
    providers = ort_providers("auto")
    out["ort_providers"] = providers
    out["ort_runs_per_s"] = runs_per_s(load_engine(store, top, "onnx", providers), plan.size,
                                       plan.runs)
    if not gpu:
        out["tensorrt"] = "skipped: no GPU"
        return out
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        out["tensorrt"] = "skipped: tensorrt not installed (pip install 'ciss[tensorrt]')"
        return out
    for precision in ("fp16", "int8"):
        t0 = time.perf_counter()
        try:
            results = export_step(store, top, ["tensorrt"], trt_precision=precision)
            trt_res = [r for r in results if r.format == "tensorrt"][0]
            out[f"trt_{precision}_build_s"] = round(time.perf_counter() - t0, 1)
            out[f"trt_{precision}_parity"] = {
                "passed": trt_res.parity.passed,
                "label_agreement": round(trt_res.parity.label_agreement, 5)}
            from ciss.engines.tensorrt import Profile, TensorRTEngine

            eng = TensorRTEngine(trt_res.path, Profile())
            out[f"trt_{precision}_runs_per_s"] = runs_per_s(eng, plan.size, plan.runs)
        except Exception as exc:  # noqa: BLE001 - record and go on to the next precision
            out[f"trt_{precision}"] = f"failed: {exc.__class__.__name__}: {str(exc)[:300]}"
    if "trt_fp16_runs_per_s" in out:
        out["trt_fp16_vs_ort"] = round(out["trt_fp16_runs_per_s"] / out["ort_runs_per_s"], 2)
    # the other steps need a plan too: the serve stage swaps between them
    for step in steps[:-1]:
        try:
            export_step(store, step, ["tensorrt"])
        except Exception as exc:  # noqa: BLE001
            out[f"trt_step{step}"] = f"failed: {exc}"
    return out


def serve_stage(store_root: Path, plan: Plan, engine: str, raw_runs_per_s: float | None) -> dict:
    from serve_load import load, png, start_server

    from ciss.runtime.deploy import deploy
    from ciss.store import Store

    store = Store(store_root)
    loose = ["--max-mean-drop", "100", "--max-class-drop", "100", "--min-new-iou", "0"]
    deploy(store, 1, engine, force=True)
    proc, url = start_server(store_root, loose=False,
                             extra=[*loose, "--accept-forced", "--engine", engine,
                                    "--concurrency", "4" if engine == "tensorrt" else "1"])
    body = png(plan.size)
    out: dict = {"engine": engine}
    try:
        for clients in (1, 8):
            r = load(url, body, clients, plan.serve_seconds)
            out[f"c{clients}"] = {k: round(v, 2) if isinstance(v, float) else v
                                  for k, v in r.items()}
        if raw_runs_per_s:
            out["served_vs_raw"] = round(out["c8"]["req_per_s"] / raw_runs_per_s, 2)

        def swap() -> None:
            deploy(store, 2, engine, force=True)

        r = load(url, body, 4, plan.serve_seconds * 2, during=swap, to_step=2)
        out["swap"] = {"requests": r["requests"], "failed": r["errors"],
                       "steps_seen": r.get("steps_seen"),
                       "visible_after_s": r.get("swap_visible_after_s")}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return out


def torchrun_stage(store_root: Path, split: Path, plan: Plan, gpu: bool) -> dict:
    import shutil

    procs = torch.cuda.device_count() if gpu else 2
    if gpu and procs < 1:
        raise Skip("no GPU")
    work = store_root.parent / "torchrun-store"
    shutil.rmtree(work, ignore_errors=True)
    # step 0 only: the distributed run adds step 1 on top of it
    from ciss.store import Store

    src = Store(store_root)
    work.mkdir(parents=True)
    shutil.copytree(src.step_dir(0), Store(work).step_dir(0))
    res, wall = run_torchrun(procs, [
        "add-classes", "--store", work, "--data", split / "step-1", "--from", "0",
        "--iterations", plan.torchrun_iterations * procs, "--batch-size", plan.batch,
        "--crop-size", plan.size, "--device", "auto", "--quiet"])
    if res.returncode != 0:
        raise RuntimeError(f"torchrun exited {res.returncode}: {res.stderr[-800:]}")
    card = Store(work).card(Store(work).latest())
    return {"procs": procs, "wall_s": round(wall, 1), "train_s": card.timings["train_s"],
            "world_size": card.extra["world_size"], "iterations_per_rank":
            card.timings["iterations"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (minutes)")
    args = ap.parse_args(argv)
    from ciss.store import Store

    plan = SMOKE if args.smoke else FULL
    gpu = torch.cuda.is_available() and not args.smoke
    device = "cuda" if gpu else "cpu"
    if not args.smoke and not torch.cuda.is_available():
        print("no GPU visible: run with --smoke on a CPU machine", file=sys.stderr)
        return 2
    work = args.out / "work"
    header = {"mode": "smoke (CPU)" if args.smoke else "full (GPU)", "machine": machine(),
              "plan": plan.__dict__}
    report = Report(args.out, header)
    report.stage("env", env)
    split = work / "split"
    report.stage("data", lambda: {"size": plan.size, "images": plan.n_train,
                                  "folder": str(make_data(work, plan))})
    store = Store(work / "store")
    report.stage("base", lambda: base_step(store, split, plan, device))
    report.stage("add", lambda: add_step(store, split, plan, device))
    report.stage("add_ft", lambda: add_step(store, split, plan, device, method="ft"))
    exported = report.stage("export", lambda: export_all(store, store.steps(), plan, gpu))
    engine = "tensorrt" if "trt_fp16_runs_per_s" in exported else "onnx"
    raw = exported.get("trt_fp16_runs_per_s") or exported.get("ort_runs_per_s")
    report.stage("serve", lambda: serve_stage(store.root, plan, engine, raw))
    report.stage("torchrun", lambda: torchrun_stage(store.root, split, plan, gpu))
    failed = [n for n, s in report.stages.items() if s["status"] == "failed"]
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
