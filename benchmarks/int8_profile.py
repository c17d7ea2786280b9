"""Where INT8 time goes: ONNX Runtime's op-level profile of fp32 vs static-QDQ int8.

Usage: python benchmarks/int8_profile.py [--arch tiny] [--size 256] [--runs 20]

Exports a random-init model, quantises it as ``ciss export --format int8`` does (U8S8) and
with signed activations (S8S8, for comparison), runs each
session ``--runs`` times with ORT profiling on (2 intra-op threads) and prints, per op type,
the summed kernel time per run, the share of the run, and the node counts. The explanation
for "int8 is not faster here" is read off these rows (BENCHMARKS.md §5).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from _common import machine
from inference import export, int8


def profile(path: Path, x: np.ndarray, runs: int) -> tuple[dict[str, float], dict[str, int]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(3):  # warm-up runs are profiled too; they are dropped below
        sess.run(["labels"], {"image": x})
    for _ in range(runs):
        sess.run(["labels"], {"image": x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (runs + 3)
    kernels = kernels[3 * per_run:]
    time_us: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    for e in kernels:
        op = e["args"].get("op_name", "?")
        time_us[op] += e["dur"] / runs
        nodes[op] += 1
    return dict(time_us), {k: v // runs for k, v in nodes.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tiny")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    from ciss.models import build_model

    torch.manual_seed(0)
    model = build_model(args.arch, num_classes=21).eval()
    x = np.random.default_rng(0).integers(0, 256, (1, 3, args.size, args.size), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = export(model, Path(tmp) / "model.onnx")
        prof = {"fp32": profile(fp32_path, x, args.runs),
                "int8 U8S8 (ciss default)": profile(int8(fp32_path, args.size, Path(tmp)), x,
                                                    args.runs),
                "int8 S8S8": profile(int8(fp32_path, args.size, Path(tmp), signed=True), x,
                                     args.runs)}
    print(f"machine: {machine()}; {args.arch} at {args.size}x{args.size}, batch 1, "
          f"{args.runs} profiled runs (kernel time per run, 2 threads)")
    for name, (t, n) in prof.items():
        total = sum(t.values())
        print(f"\n{name}: {total / 1000:.1f} ms of kernel time per run")
        print("| op type | ms per run | share | nodes |")
        print("|---|---:|---:|---:|")
        for op, us in sorted(t.items(), key=lambda kv: -kv[1])[:10]:
            print(f"| {op} | {us / 1000:.2f} | {100 * us / total:.0f}% | {n[op]} |")


if __name__ == "__main__":
    main()
