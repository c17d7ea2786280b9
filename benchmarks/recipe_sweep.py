"""Train step 0 (and optionally add the next step's classes) under named recipe variants and
score them on a full-label val split: the measurements behind the default recipe.

Usage:
  python benchmarks/recipe_sweep.py --split DIR/15-5 --full DIR/syn --out OUT \\
      default wce,loss=wce long,iterations=8000 [--add]

A run is NAME[,key=value...]; keys: iterations, epochs, lr, loss, scale (MIN:MAX), evals,
batch, warmup, crop, arch, and for --add: step_iterations, step_lr, method, freeze.
Prints one JSON line per run (old/new mIoU on the full-label val split, seconds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from _common import machine
from ciss.analysis.evaluate import evaluate_step
from ciss.store import Store
from ciss.updater.add_classes import UpdateConfig, add_classes
from ciss.updater.defaults import base_defaults, step_defaults
from ciss.updater.loop import LoopConfig
from ciss.updater.methods import MethodConfig
from ciss.updater.train import DataConfig, train_base


def parse(run: str) -> tuple[str, dict[str, str]]:
    name, *pairs = run.split(",")
    return name, dict(p.split("=", 1) for p in pairs)


def base_config(kw: dict[str, str]):
    arch = kw.get("arch", "tiny")
    d = base_defaults(arch)
    loop = LoopConfig(iterations=int(kw.get("iterations", d.iterations)),
                      epochs=int(kw["epochs"]) if "epochs" in kw else None,
                      lr=float(kw.get("lr", d.lr)), evals=int(kw.get("evals", d.evals)),
                      batch_size=int(kw.get("batch", 16)),
                      warmup=float(kw.get("warmup", d.warmup)))
    lo, hi = (float(v) for v in kw.get("scale", ":".join(map(str, d.scale))).split(":"))
    data = DataConfig(crop_size=int(kw["crop"]) if "crop" in kw else None, scale=(lo, hi))
    return arch, loop, data, kw.get("loss", d.loss)


def run_one(name: str, kw: dict[str, str], split: Path, full: Path, out: Path,
            add: bool) -> dict:
    store_dir = out / name
    shutil.rmtree(store_dir, ignore_errors=True)
    store = Store(store_dir)
    arch, loop, data, loss = base_config(kw)
    t0 = time.perf_counter()
    rep = train_base(store, split / "step-0", arch=arch, loop=loop, data=data, loss=loss,
                     progress=False)
    row = {"run": name, **kw, "base_s": round(time.perf_counter() - t0, 1),
           "iterations": rep.fit.iterations, "best": rep.fit.best}
    ev = evaluate_step(store, full, step=0).to_json()
    row["base_old"] = round(_objects(ev), 4)
    row["base_per_class"] = {k: None if v is None else round(v, 3)
                             for k, v in ev["per_class_iou"].items()}
    if add:
        method = kw.get("method", "mib")
        sd = step_defaults(method)
        sloop = LoopConfig(iterations=int(kw.get("step_iterations", sd.iterations)),
                           lr=float(kw.get("step_lr", sd.lr)), evals=sd.evals)
        t0 = time.perf_counter()
        add_classes(store, split / "step-1",
                    method=MethodConfig(method=method, kd_weight=sd.kd_weight),
                    update=UpdateConfig(freeze=kw.get("freeze")), loop=sloop, progress=False)
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
