"""Train step 0 (and optionally add the next step's classes) under named recipe variants and
score them on a full-label val split: the measurements behind the default recipe.

Usage:
  python benchmarks/recipe_sweep.py --split DIR/15-5 --full DIR/syn --out OUT \\
      default wce,loss=wce long,iterations=8000 [--add]

A run is NAME[,key=value...]; keys: iterations, epochs, lr, loss, scale (MIN:MAX), evals,
batch, warmup, crop, arch, weights (e.g. imagenet), and for --add: step_iterations,
step_lr, method, freeze.
Prints one JSON line per run (old/new mIoU on the full-label val split, seconds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from _common import machine
from ciss.analysis.evaluate import evaluate_step
from ciss.store import Store
from ciss.updater.add_classes import add_classes
from ciss.updater.config import StepConfig, StepOptions, resolve_step
from ciss.updater.train import train_base


def parse(run: str) -> tuple[str, dict[str, str]]:
    name, *pairs = run.split(",")
    return name, dict(p.split("=", 1) for p in pairs)


def base_config(kw: dict[str, str]) -> StepConfig:
    """The train recipe under the run's overrides (resolve_step), plus the loop knobs no
    command-line option sets (evals, warmup)."""
    scale = tuple(float(v) for v in kw["scale"].split(":")) if "scale" in kw else None
    config = resolve_step("train", StepOptions(
        arch=kw.get("arch", "tiny"), weights=kw.get("weights"),
        iterations=int(kw["iterations"]) if "iterations" in kw else None,
        epochs=int(kw["epochs"]) if "epochs" in kw else None,
        lr=float(kw["lr"]) if "lr" in kw else None, batch_size=int(kw.get("batch", 16)),
        crop_size=int(kw["crop"]) if "crop" in kw else None, scale=scale,
        loss=kw.get("loss")))
    loop = config.loop
    return replace(config, loop=replace(
        loop, evals=int(kw.get("evals", loop.evals)), warmup=float(kw.get("warmup",
                                                                          loop.warmup))))


def run_one(name: str, kw: dict[str, str], split: Path, full: Path, out: Path,
            add: bool) -> dict:
    store_dir = out / name
    shutil.rmtree(store_dir, ignore_errors=True)
    store = Store(store_dir)
    t0 = time.perf_counter()
    rep = train_base(store, split / "step-0", config=base_config(kw), progress=False)
    row = {"run": name, **kw, "base_s": round(time.perf_counter() - t0, 1),
           "iterations": rep.fit.iterations, "best": rep.fit.best}
    ev = evaluate_step(store, full, step=0).to_json()
    row["base_old"] = round(_objects(ev), 4)
    row["base_per_class"] = {k: None if v is None else round(v, 3)
                             for k, v in ev["per_class_iou"].items()}
    if add:
        method = kw.get("method", "mib")
        config = resolve_step("add-classes", StepOptions(
            method=method, freeze=kw.get("freeze"),
            iterations=int(kw["step_iterations"]) if "step_iterations" in kw else None,
            lr=float(kw["step_lr"]) if "step_lr" in kw else None), store)
        t0 = time.perf_counter()
        add_classes(store, split / "step-1", config=config, progress=False)
        row["step_s"] = round(time.perf_counter() - t0, 1)
        ev = evaluate_step(store, full, step=1).to_json()
        row["old"], row["new"] = round(ev["old_miou"], 4), round(ev["new_miou"], 4)
    return row


def _objects(ev: dict) -> float:
    vals = [v for k, v in ev["per_class_iou"].items() if k != "background" and v is not None]
    return sum(vals) / len(vals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--full", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--add", action="store_true")
    ap.add_argument("--log", type=Path, default=None, help="append JSON lines here too")
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(json.dumps({"machine": machine()}), flush=True)
    for run in args.runs:
        name, kw = parse(run)
        row = run_one(name, kw, args.split, args.full, args.out, args.add)
        row["data"] = args.split.name
        line = json.dumps(row)
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
