"""Peak memory of ``ciss evaluate`` and ``ciss check`` on a folder of 12-megapixel photos.

Usage: python benchmarks/photo_memory.py --out /tmp/photos [--n 6] [--side 4000x3000]

Writes a ciss folder of ``--n`` JPEG photos (photo crops upscaled, objects pasted) with their
masks, trains tiny for a few iterations on it (512 px crops) to get a store whose retention set
is those photos, then runs ``ciss evaluate`` and ``ciss check --engine onnx`` (export
included) as subprocesses and reports each one's peak RSS (ru_maxrss of the child).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from _common import machine


def write_photos(root: Path, n: int, w: int, h: int) -> None:
    from skimage import data

    from ciss.data.imageio import write_mask

    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nthing\nother\n")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(data.astronaut())
    for i in range(n):
        img = np.asarray(photo.resize((w, h), Image.BILINEAR)).copy()
        mask = np.zeros((h, w), np.uint8)
        for k in (1, 2):
            y, x = rng.integers(0, h - h // 4), rng.integers(0, w - w // 4)
            mask[y:y + h // 4, x:x + w // 4] = k
            img[y:y + h // 4, x:x + w // 4] = (200, 40 * k, 30)
        Image.fromarray(img).save(root / "images" / f"p{i}.jpg", quality=90)
        write_mask(root / "masks" / f"p{i}.png", mask)
    stems = [f"p{i}" for i in range(n)]
    (root / "train.txt").write_text("\n".join(stems[: n // 2]) + "\n")
    (root / "val.txt").write_text("\n".join(stems[n // 2:]) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--side", default="4000x3000")
    args = ap.parse_args()
    w, h = (int(v) for v in args.side.split("x"))
    data, store = args.out / "photos", args.out / "store"
    if not data.exists():
        write_photos(data, args.n, w, h)
    ciss = [sys.executable, "-m", "ciss"]
    if not store.exists():
        subprocess.run(ciss + ["train", "--store", str(store), "--data", str(data),
                               "--iterations", "4", "--batch-size", "2", "--quiet"], check=True)
    rows = {}
    for name, cmd in (("evaluate", ["evaluate", "--store", str(store), "--data", str(data),
                                    "--json", "--device", "cpu"]),
                      ("check", ["check", "--store", str(store), "--engine", "onnx",
                                 "--min-new-iou", "0", "--json", "--device", "cpu"])):
        probe = (f"import resource, subprocess, sys; p = subprocess.run({ciss + cmd!r}, "
                 "capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN)"
                 ".ru_maxrss, p.returncode)")
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             check=True).stdout.split()
        rows[name] = {"peak_rss_gib": round(int(out[0]) / 2**20, 2), "exit": int(out[1]),
                      "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"machine": machine(), "photos": f"{args.n} x {w}x{h}", **rows}))


if __name__ == "__main__":
    main()
