"""Per-iteration time of an add-classes (mib) step: --freeze none vs the default freeze with
the shared trunk (and with the trunk cache warm), for each architecture, on random data.

Usage: python benchmarks/freeze_speed.py [--size 128] [--batch 8] [--archs tiny,...]
       python benchmarks/freeze_speed.py --sweep tiny --size 64 --batch 16
The second form times every freeze point of one architecture, each with the cache warm (the
trunk's states and the parent's logits read, not computed), against --freeze none with the
parent's logits cached too: the per-iteration ceiling of what freezing can save.
Ratios are measured in one run, medians over repeated iterations.
"""

from __future__ import annotations

import argparse
import copy

import torch

from _common import machine, median_ms
from ciss.models import ARCHS, build_model, freeze, grow_classifier
from ciss.updater.methods import IncrementalStep, MethodConfig, TrunkCache


def step_ms(arch: str, size: int, batch: int, stage: str, cached: bool) -> float:
    torch.manual_seed(0)
    teacher = build_model(arch, num_classes=16).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)
    grow_classifier(student, 5, "random")
    freeze(student, stage)
    student.train()
    cache = TrunkCache(1 << 30) if cached else None
    step = IncrementalStep(student, teacher, 16, MethodConfig(), cache)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, 21, (batch, size, size))
    keys = torch.arange(batch) if cached else None

    def once():
        out = step(x, y, keys)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()

    return median_ms(once, repeats=8, warmup=2)


def sweep(arch: str, size: int, batch: int) -> None:
    from ciss.models.build import STAGES

    points = ["none", *STAGES[:5]]
    none = step_ms(arch, size, batch, "none", True)
    print("| frozen up to | ms per iteration (cache warm) | faster than none |")
    print("|---|---|---|")
    for stage in points:
        ms = none if stage == "none" else step_ms(arch, size, batch, stage, True)
        print(f"| {stage} | {ms:.1f} | {none / ms:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--archs", default=",".join(a for a in ARCHS if a != "deeplabv3_resnet101"))
    ap.add_argument("--sweep", default=None, help="one architecture: time every freeze point")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {machine()}; batch {args.batch}, {args.size}x{args.size}")
    if args.sweep:
        sweep(args.sweep, args.size, args.batch)
        return
    print("| arch | default freeze | none ms | frozen ms | frozen+cache ms | speed-up | "
          "speed-up cached |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs.split(","):
        stage = ARCHS[arch].default_freeze
        none = step_ms(arch, args.size, args.batch, "none", False)
        frozen = step_ms(arch, args.size, args.batch, stage, False)
        cached = step_ms(arch, args.size, args.batch, stage, True)
        print(f"| {arch} | {stage} | {none:.0f} | {frozen:.0f} | {cached:.0f} | "
              f"{none / frozen:.2f}x | {none / cached:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
