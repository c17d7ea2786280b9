"""Base step of `tiny` on the synthetic default (15 base classes): mIoU and training time.

Usage: python benchmarks/base_training.py --out bench-out/base [--iterations N]
Writes the synthetic data and the 15-5 split under --out, trains step 0 with the defaults (the
family recipe through ``resolve_step``, as ``ciss train``; --iterations overrides its budget) and
scores classes 1-15 on the full-label val split. Also times data loading against an epoch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _common import machine
from ciss.analysis.evaluate import evaluate_step
from ciss.data.dataset import label_lut
from ciss.data.folder import open_folder
from ciss.data.scenarios import parse_scenario, write_split
from ciss.data.synthetic import SyntheticConfig, write_synthetic
from ciss.store import Store
from ciss.updater.config import StepOptions, resolve_step
from ciss.updater.train import train_base, training_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iterations", type=int, default=None,
                    help="training budget (default: the tiny recipe's)")
    args = ap.parse_args()
    config = resolve_step("train", StepOptions(arch="tiny", iterations=args.iterations))
    torch.set_num_threads(2)
    data, split = args.out / "data", args.out / "15-5"
    if not data.exists():
        write_synthetic(data, SyntheticConfig())
        write_split(open_folder(data), parse_scenario("15-5"), split)
    step0 = open_folder(split / "step-0")
    ds = training_dataset(step0, label_lut(step0.classes, step0.classes), config.data, 0)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    load_s = time.perf_counter() - t0
    store = Store(args.out / "store")
    rep = train_base(store, split / "step-0", config=config, progress=False)
    doc = evaluate_step(store, data, step=rep.step).to_json()
    epoch_s = [h["seconds"] for h in rep.fit.history]
    print(json.dumps({"machine": machine(), "iterations": rep.fit.iterations,
                      "train_s": round(rep.fit.seconds, 1),
                      "miou_1_15_full_val": round(doc["new_miou"], 4),
                      "background_iou": round(doc["per_class_iou"]["background"], 4),
                      "median_epoch_s": sorted(epoch_s)[len(epoch_s) // 2],
                      "data_loading_s_per_epoch": round(load_s, 2),
                      "data_loading_share": round(load_s / (sorted(epoch_s)[len(epoch_s) // 2]),
                                                  3)}, indent=2))


if __name__ == "__main__":
    main()
