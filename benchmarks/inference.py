"""Inference speed: torch eager vs ONNX Runtime fp32 vs ONNX Runtime int8, per architecture.

Usage: python benchmarks/inference.py [--archs tiny,...] [--sizes 64,256,512] [--batches 1,8]
Random-init models (speed only; accuracy is what the parity gates measure on real steps).
Reports median ms, speed-up vs eager, achieved GFLOPS (convolution FLOPs counted by torch)
and their share of a matmul peak measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from _common import machine, matmul_gflops, median_ms
from ciss.models import ARCHS, build_model
from ciss.store.card import StepCard


def export(model, path: Path) -> Path:
    from ciss.exporters.onnx import export_onnx

    card = StepCard(step=0, parent=None, classes=["background"] + [f"c{i}" for i in range(20)],
                    new_classes=[], arch=model.arch, frozen=[], method="base", hparams={},
                    data={})
    return export_onnx(model, path, card, "0" * 64)


def int8(path: Path, size: int, work: Path, signed: bool = False) -> Path:
    from ciss.exporters.quantize import quantize

    class Reader:
        def __init__(self):
            rng = np.random.default_rng(0)
            self.items = [{"image": rng.integers(0, 256, (1, 3, size, size), dtype=np.uint8)}
                          for _ in range(8)]

        def get_next(self):
            return self.items.pop() if self.items else None

        def rewind(self):
            pass

    return quantize(path, work / ("int8s.onnx" if signed else "int8.onnx"), Reader(), work,
                    signed_activations=signed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--sizes", default="64,256,512")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-int8", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from ciss.engines.onnx import OnnxEngine

    peak = matmul_gflops()
    print(f"machine: {machine()}; matmul peak (2048^2, median) {peak:.0f} GFLOPS")
    print("| arch | batch | size | GFLOP | eager ms | ORT fp32 ms | ORT int8 ms | ORT/eager | "
          "int8/fp32 | ORT GFLOPS | % of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        model = build_model(arch, num_classes=21).eval()
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = export(model, Path(tmp) / "model.onnx")
            fp32 = OnnxEngine(onnx_path, threads=2)
            for size in map(int, args.sizes.split(",")):
                q = None
                if not args.no_int8:
                    q = OnnxEngine(int8(onnx_path, size, Path(tmp)), threads=2)
                for batch in map(int, args.batches.split(",")):
                    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
                    with FlopCounterMode(display=False) as fc, torch.inference_mode():
                        model(x)
                    gflop = fc.get_total_flops() / 1e9
                    reps = max(3, args.repeats if gflop * batch < 50 else args.repeats // 3)
                    with torch.inference_mode():
                        eager = median_ms(partial(model, x), repeats=reps)
                    xn = x.numpy()
                    ort_ms = median_ms(partial(fp32.run, xn), repeats=reps)
                    q_ms = median_ms(partial(q.run, xn), repeats=reps) if q else float("nan")
                    achieved = gflop / (ort_ms / 1000)
                    print(f"| {arch} | {batch} | {size} | {gflop:.2f} | {eager:.1f} | "
                          f"{ort_ms:.1f} | {q_ms:.1f} | {eager / ort_ms:.2f}x | "
                          f"{ort_ms / q_ms:.2f}x | {achieved:.0f} | {100 * achieved / peak:.0f}% |",
                          flush=True)


if __name__ == "__main__":
    main()
