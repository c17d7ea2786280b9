"""The default recipe on the foreign-data suite and the synthetic world, against 8x its budget.

Usage:
  python benchmarks/foreign_suite.py --out DATA          # once: the suite's folders + splits
  python benchmarks/foreign_bench.py --data DATA --out OUT [--only small few] [--no-long]
      [--synthetic SYN0,SYN7,SYN13]

For each dataset: ``ciss train`` with the defaults, then ``ciss add-classes`` (defaults) on the
overlap split, each scored on the dataset's full-label val split; and the same base training
with 8x the iterations (the reference the default must reach 0.9x of). Synthetic folders
(``ciss data synthetic`` + ``data split --scenario 15-5``, given as SYN and SYN-split) get the
default base + add-classes only. One JSON line per run in OUT/results.jsonl; a markdown table at
the end. Datasets named in foreign_suite.TUNE were used to choose the recipe; the others are
held out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import foreign_suite as fs
from _common import machine
from ciss.updater.defaults import base_defaults
from recipe_sweep import run_one


def table(rows: list[dict]) -> str:
    out = ["| data | tuned on | base old (default) | base old (8x) | ratio | base s | "
           "after add: old | kept | new | add s | warned classes |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault(r["data"], {})[r["run"]] = r
    for data, runs in by.items():
        d, x = runs.get("default"), runs.get("x8")
        if d is None:
            continue
        ratio = f"{d['base_old'] / x['base_old']:.2f}" if x and x["base_old"] else "-"
        kept = f"{d['old'] / d['base_old']:.2f}" if d.get("old") is not None else "-"
        out.append(f"| {data} | {'yes' if d['tuned'] else 'no'} | {d['base_old']:.3f} | "
                   f"{x['base_old']:.3f} | {ratio} | {d['base_s']:.0f} | "
                   f"{d.get('old', float('nan')):.3f} | {kept} | {d.get('new', float('nan')):.3f}"
                   f" | {d.get('step_s', 0):.0f} | {', '.join(d['warned']) or '-'} |"
                   if x else
                   f"| {data} | {'yes' if d['tuned'] else 'no'} | {d['base_old']:.3f} | - | - | "
                   f"{d['base_s']:.0f} | {d.get('old', float('nan')):.3f} | {kept} | "
                   f"{d.get('new', float('nan')):.3f} | {d.get('step_s', 0):.0f} | "
                   f"{', '.join(d['warned']) or '-'} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", default=list(fs.SUITE))
    ap.add_argument("--no-long", action="store_true", help="skip the 8x references")
    ap.add_argument("--long-for", nargs="*", default=None,
                    help="run the 8x reference only for these datasets")
    ap.add_argument("--synthetic", default="", help="comma list of synthetic folders")
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    rows = []
    print(json.dumps({"machine": machine()}), flush=True)
    long_its = 8 * base_defaults("tiny").iterations
    jobs = [(name, args.data / f"{name}-split", args.data / name, name in fs.TUNE)
            for name in args.only]
    jobs += [(Path(p).name, Path(f"{p}-split"), Path(p), Path(p).name == "syn0")
             for p in args.synthetic.split(",") if p]
    for name, split, full, tuned in jobs:
        runs = [("default", {}, True)]
        if (not args.no_long and not name.startswith("syn")
                and (args.long_for is None or name in args.long_for)):
            runs.append(("x8", {"iterations": str(long_its)}, False))
        for run, kw, add in runs:
            row = run_one(f"{name}-{run}", kw, split, full, args.out, add)
            warned = []
            for card_path in sorted((args.out / f"{name}-{run}" / "steps").glob("*/card.json")):
                card = json.loads(card_path.read_text())
                warned += [w["name"] for w in card["extra"]["learning"]["warnings"]]
            row.update(data=name, run=run, tuned=tuned, warned=warned)
            rows.append(row)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
