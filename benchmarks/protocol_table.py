"""One table per protocol from ``ciss benchmark`` outputs: methods as rows, the figures after
the last step, as ratios to the base step (old classes) and to joint training (new classes).

Usage: python benchmarks/protocol_table.py RUN_DIR [RUN_DIR ...] [--joint RUN_DIR]
Each RUN_DIR is a ``ciss benchmark --out`` folder (its results.json); runs of the same
protocol, data and seed share their base step (the benchmark trains it deterministically), so
their rows go in one table. ``--joint`` names a run whose joint row serves runs without one.
Prints markdown: method, old, old/base, new, new/joint, all, hIoU, train s per step (mean over
the incremental steps; only comparable within one run, these machines are noisy), and the
old-class curve after each step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--joint", type=Path, default=None)
    args = ap.parse_args()
    docs = [load(r) for r in args.runs]
    joint = None
    for d in docs + ([load(args.joint)] if args.joint else []):
        joint = joint or next((r for r in d["final"] if r["method"] == "joint"), None)
    c = docs[0]["config"]
    base = next(r for r in docs[0]["steps"] if r["step"] == 0)
    print(f"{c['scenario']} ({c['setting']}), {c['arch']}, benchmark seed {c['seed']}; "
          f"base old {base['old']:.3f}" + (f"; joint old {joint['old']:.3f} new "
                                             f"{joint['new']:.3f}" if joint else "") + "\n")
    print("| method | old | old / base | new | new / joint | all | hIoU | train s/step |")
    print("|---|---|---|---|---|---|---|---|")
    curves = []
    for d in docs:
        for r in d["final"]:
            if r["method"] == "joint":
                continue
            steps = [s for s in d["steps"] if s["method"] == r["method"] and s["step"] > 0]
            t = sum(s["train_s"] for s in steps) / max(1, len(steps))
            nj = (f"{r['new'] / joint['new']:.2f}x" if joint and r["new"] is not None
                  and joint["new"] else "-")
            print(f"| {r['method']} | {r['old']:.3f} | {r['old'] / base['old']:.2f}x | "
                  f"{r['new']:.3f} | {nj} | {r['all']:.3f} | {r['hiou']:.3f} | {t:.0f} |")
            curves.append((r["method"], [s["old"] for s in d["steps"]
                                         if s["method"] == r["method"]]))
    print("\nold classes after each step:")
    for name, ys in curves:
        print(f"- {name}: " + ", ".join(f"{y:.3f}" for y in ys))


if __name__ == "__main__":
    main()
