"""A Pascal-VOC-sized folder: how long validation takes and how fast the training loader is.

Usage: python benchmarks/voc_scale.py --out /tmp/voc [--n 10000] [--repeats 2]

Writes (once) a VOC-layout folder of ``--n`` JPEGs of 500x375 (photo crops with pasted objects,
21 VOC classes, 85/15 train/val), then measures:
- ``open_folder`` (decode + check every image and mask) in seconds, median of ``--repeats``;
- the training loader at 512 px crops with scale augmentation (0.5-2.0) and flips, batch 8,
  with 0, 1 and 2 DataLoader workers: images/s, median of ``--repeats`` passes of 30 batches.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import foreign_suite as fs
from _common import machine

SPEC = replace(fs.ForeignSpec("voc", 20, 0, 0), sides=(500, 500), aspect=(4 / 3, 4 / 3),
               area=(0.02, 0.12), objects=(1, 4), seed=21)


def _write_one(args) -> str:
    root, i = args
    from ciss.data.imageio import voc_palette, write_mask

    image, mask = fs.make_image(SPEC, i)
    stem = f"2026_{i:06d}"
    Image.fromarray(image).save(root / "JPEGImages" / f"{stem}.jpg", quality=90)
    write_mask(root / "SegmentationClass" / f"{stem}.png", mask, voc_palette())
    return stem


def write_voc(root: Path, n: int) -> None:
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        stems = list(pool.map(_write_one, [(root, i) for i in range(n)], chunksize=64))
    n_val = n * 15 // 100
    sets = root / "ImageSets" / "Segmentation"
    (sets / "train.txt").write_text("\n".join(stems[n_val:]) + "\n")
    (sets / "val.txt").write_text("\n".join(stems[:n_val]) + "\n")


def loader_rate(folder, workers: int, batches: int = 30) -> float:
    from torch.utils.data import DataLoader

    from ciss.data.dataset import SegmentationDataset, label_lut
    from ciss.data.transforms import TrainTransform
    from ciss.updater.distributed import DistInfo
    from ciss.updater.loop import EpochSampler, LoopConfig, _loader_options

    ds = SegmentationDataset(folder, folder.train, label_lut(folder.classes, folder.classes),
                             TrainTransform(512, scale=(0.5, 2.0)), seed=0)
    sampler = EpochSampler(ds, LoopConfig(batch_size=8), DistInfo())
    loader = DataLoader(ds, batch_size=8, drop_last=True, sampler=sampler,
                        **_loader_options(workers, torch.device("cpu")))
    it = iter(loader)
    next(it)  # worker start-up and the first decode are not the steady state
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * 8 / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from ciss.data.folder import open_folder

    if not (args.out / "ImageSets").exists():
        t0 = time.perf_counter()
        write_voc(args.out, args.n)
        print(f"wrote {args.n} images in {time.perf_counter() - t0:.0f}s", flush=True)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        folder = open_folder(args.out)
        times.append(time.perf_counter() - t0)
    rates = {w: statistics.median(loader_rate(folder, w) for _ in range(args.repeats))
             for w in (0, 1, 2)}
    print(json.dumps({"machine": machine(), "images": len(folder.images),
                      "train": len(folder.train), "val": len(folder.val),
                      "cached_in_memory": folder.cached,
                      "validate_s": [round(t, 1) for t in times],
                      "validate_median_s": round(statistics.median(times), 1),
                      "loader_images_per_s": {str(k): round(v, 1) for k, v in rates.items()},
                      "pixels_checked": int(sum(np.prod(s) for s in folder.shapes.values()))}))


if __name__ == "__main__":
    main()
