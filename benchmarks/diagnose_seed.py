"""The seed paper's findings, reproduced with ``ciss diagnose`` on the synthetic 15-5 protocol.

Usage: python benchmarks/diagnose_seed.py --store DEMO/store --split DEMO/15-5 [--out FILE]

Takes a store with a step 0 (the demo's also holds 1 mib, 2 ft, early stages frozen; any step
after 0 is diagnosed too, named by its method and freeze point), adds ft and mib steps with
``--freeze none`` from step 0 (so early stages are free to drift), and diagnoses all four:
where the lost old-class pixels went, per-stage CKA (parent vs child) and stage transplant.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _common import machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from ciss.analysis.diagnose import diagnose
    from ciss.store import Store
    from ciss.updater.add_classes import add_classes
    from ciss.updater.config import StepOptions, resolve_step

    root = Path(tempfile.mkdtemp()) / "store"
    shutil.copytree(args.store, root)
    store = Store(root)
    # the steps already in the store, named by method and the stage they froze up to
    runs = {(store.card(s).method, (store.card(s).frozen or ["none"])[-1]): s
            for s in store.steps() if s > 0}
    for method in ("ft", "mib"):
        config = resolve_step("add-classes", StepOptions(method=method, parent=0,
                                                         freeze="none"), store)
        rep = add_classes(store, args.split / "step-1", config=config, progress=False)
        runs[(method, "none")] = rep.step
    results = {}
    for (method, frozen), step in sorted(runs.items()):
        diag = diagnose(store, step)
        results[f"{method}/freeze {frozen}"] = diag.to_json()
    print(f"machine: {machine()}")
    stages = list(next(iter(results.values()))["cka"])
    print("| step | old mIoU before -> after | lost px -> background | -> new | -> other old |"
          " diagnosis s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, d in results.items():
        lost = d["lost"]
        print(f"| {name} | {100 * d['old_miou_before']:.1f} -> {100 * d['old_miou_after']:.1f} | "
              f"{100 * (lost['to_background'] or 0):.1f}% | {100 * (lost['to_new'] or 0):.1f}% | "
              f"{100 * (lost['to_old'] or 0):.1f}% | {d['seconds']} |")
    print("\nlinear CKA parent vs child, per stage:")
    print("| step | " + " | ".join(stages) + " |")
    print("|---|" + "---:|" * len(stages))
    for name, d in results.items():
        print(f"| {name} | " + " | ".join("-" if d["cka"][s] is None else f"{d['cka'][s]:.3f}"
                                        for s in stages) + " |")
    print("\nold-class mIoU gained by putting back the parent's stage (points; '=' frozen):")
    print("| step | " + " | ".join(stages) + " |")
    print("|---|" + "---:|" * len(stages))
    for name, d in results.items():
        g = d["transplant_gain"]
        print(f"| {name} | " + " | ".join("=" if g[s] is None else f"{g[s]:+.1f}"
                                        for s in stages) + " |")
    print("\nverdicts:")
    for name, d in results.items():
        print(f"- {name}: {d['verdict']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
