"""Wall time of the whole ``ciss add-classes`` command, default against other settings.

Usage: python benchmarks/add_speed.py --base STORE --data STEP_DIR [--repeats 3] \
           [--variant "none=--freeze none" ...] [--out results.json]

Each repeat runs every variant once, in turn, as a fresh process on a fresh copy of the base
store (start-up, loading, training, retention scoring and writing: what a user waits for), so
that a slow spell of a shared machine hits every variant alike. Prints the median wall time per
variant, its ratio to the default's median (same run), and where the time went (training and
scoring from the step's card; the rest is start-up, loading and writing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine
from ciss.store import Store


def run_once(base: Path, data: Path, args: list[str], tmp: Path) -> dict:
    store = tmp / "store"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(base, store)
    cmd = [sys.executable, "-m", "ciss", "add-classes", "--store", str(store),
           "--data", str(data), "--quiet", *args]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    card = Store(store).card(-1)
    t = card.timings
    return {"wall_s": wall, "train_s": t["train_s"], "eval_s": t["eval_s"],
            "other_s": wall - t["train_s"] - t["eval_s"],
            "frozen": card.frozen[-1] if card.frozen else "none",
            "trunk_cache": card.extra["trunk_cache"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True, help="store holding the parent step")
    ap.add_argument("--data", type=Path, required=True, help="the new classes' folder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[],
                    help='NAME=ARGS, e.g. "none=--freeze none" (the default always runs)')
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    variants = {"default": []}
    for v in args.variant or ["none=--freeze none"]:
        name, _, rest = v.partition("=")
        variants[name] = rest.split()
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, extra in variants.items():
                res = run_once(args.base, args.data, extra, Path(tmp))
                runs[name].append(res)
                print(f"repeat {r + 1} {name}: {res['wall_s']:.1f} s "
                      f"(train {res['train_s']:.1f})", file=sys.stderr, flush=True)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("wall_s", "train_s", "eval_s",
                                                                  "other_s")}
           for k, v in runs.items()}
    print(f"machine: {machine()}; {args.repeats} repeats, medians")
    print("| settings | frozen | whole command s | training s | scoring s | start-up, "
          "loading, writing s | default is faster by |")
    print("|---|---|---|---|---|---|---|")
    for k, m in med.items():
        ratio = m["wall_s"] / med["default"]["wall_s"]
        print(f"| {k} {' '.join(variants[k])} | {runs[k][0]['frozen']} | {m['wall_s']:.1f} | "
              f"{m['train_s']:.1f} | {m['eval_s']:.1f} | {m['other_s']:.1f} | {ratio:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps({"runs": runs, "medians": med}, indent=2))


if __name__ == "__main__":
    main()
