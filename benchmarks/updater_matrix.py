"""add-classes on one step for several configurations, from one trained base store.

Usage: python benchmarks/updater_matrix.py --base STORE --step-data DIR [--step-data DIR ...]
           --full-data DIR "mib" "ft,method=ft" "mib-none,freeze=none,cache=0" ...
Each spec is TAG[,key=value...] with keys method, freeze, init, iterations (or epochs), lr,
kd, cache, pseudo (0/1), pod / podl (PLOP's Local POD factors: encoder stages / logits),
loss_at (input/logits), dice (0/1: new-class Dice), bn (update/frozen:
BatchNorm statistics), memory (replay budget; unset: the parent's), fuse (0/1: EWF's fusion),
pretune (share of the step for NeST's classifier pre-tuning; unset: the default; 0: off),
threads (torch threads for this run; default 2), seed (the step loop's seed, as ``ciss benchmark
--seed``; default 0).
Several --step-data folders are learned in order (a 15-1 sequence, say), each step on the last.
Prints one JSON line per run: old/new mIoU on the full-label val split after the last step (old
= the base's classes; with several steps, also old/new after each), training seconds (summed
over steps), per-epoch seconds, trunk-cache statistics.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from ciss.benchmark import score_step
from ciss.data.folder import open_folder
from ciss.store import Store
from ciss.updater.add_classes import add_classes
from ciss.updater.config import StepOptions, resolve_step


def run(spec: str, base: Path, step_data: list[Path], source, base_ids: list[int]) -> dict:
    tag, *pairs = spec.split(",")
    kw = dict(p.split("=", 1) for p in pairs)
    method = kw.get("method", "mib")
    per_step, train_s, epochs = [], 0.0, []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "store"
        shutil.copytree(base, root)
        store = Store(root)
        for data in step_data:
            config = resolve_step("add-classes", StepOptions(
                method=method, kd_weight=float(kw["kd"]) if "kd" in kw else None,
                pseudo=kw.get("pseudo", "0") == "1", new_dice=kw.get("dice", "0") == "1",
                freeze=kw.get("freeze"), init=kw.get("init"),
                cache_trunk_mb=int(kw.get("cache", 1024)), bn_stats=kw.get("bn"),
                memory=int(kw["memory"]) if "memory" in kw else None,
                fuse=kw.get("fuse", "0") == "1",
                pretune=float(kw["pretune"]) if "pretune" in kw else None,
                iterations=int(kw["iterations"]) if "iterations" in kw else None,
                epochs=int(kw["epochs"]) if "epochs" in kw else None,
                lr=float(kw["lr"]) if "lr" in kw else None, seed=int(kw.get("seed", 0))), store)
            # the research knobs no command-line option sets
            config = replace(config, method=replace(
                config.method, loss_at=kw.get("loss_at", "input"),
                pod_weight=float(kw.get("pod", 0.01)),
                pod_logits_weight=float(kw.get("podl", 0.0005))))
            r = add_classes(store, data, config=config, progress=False)
            old, new, all_, _ = score_step(store, r.step, source, base_ids)
            per_step.append({"old": round(old, 3), "new": round(new, 3)})
            train_s += r.fit.seconds + r.card.timings.get("pretune_s", 0.0)
            epochs += [h["seconds"] for h in r.fit.history]
    out = {"tag": tag, **kw, "old": round(old, 3), "new": round(new, 3),
           "all": round(all_, 3), "train_s": round(train_s, 1),
           "iterations": r.fit.iterations,
           "median_epoch_s": sorted(epochs)[len(epochs) // 2],
           "frozen": r.card.frozen[-1] if r.card.frozen else "none",
           "trunk_cache": r.card.extra["trunk_cache"]}
    if len(step_data) > 1:
        out["steps"] = per_step
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True, help="store with a trained step 0")
    ap.add_argument("--step-data", type=Path, action="append", required=True,
                    help="a new-class folder; repeat for a sequence of steps")
    ap.add_argument("--full-data", type=Path, required=True)
    ap.add_argument("specs", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(2)
    source = open_folder(args.full_data)
    base_card = Store(args.base).card(0)
    base_ids = [source.classes.index(c) for c in base_card.classes[1:]]
    old, _, _, _ = score_step(Store(args.base), 0, source, base_ids)
    print(json.dumps({"tag": "base", "old": round(old, 3)}), flush=True)
    for spec in args.specs:
        threads = dict(p.split("=", 1) for p in spec.split(",")[1:]).get("threads")
        torch.set_num_threads(int(threads or 2))
        print(json.dumps(run(spec, args.base, args.step_data, source, base_ids)), flush=True)


if __name__ == "__main__":
    main()
