"""The production loop measured end to end (#31 item 5): does scoring notice unseen classes,
do the selected images hold them, and does add-classes learn more from them than from random?

Usage: python benchmarks/production_loop.py [--seeds 0,1,2] [--budgets 25,50,100]
           [--stream 500] [--unseen-share 0.2] [--work DIR] [--out FILE.json]

Per seed (everything depends on it: the synthetic world, the base model, the stream):
1. A 15-5 synthetic world (``ciss demo``'s: 2000 + 300 images, 64 px); the base step is
   trained by ``train_base`` with the defaults (tiny) on step-0 of the 15-5 split, then
   exported to ONNX and calibrated (``runtime.scoring.calibrate_step``, as ``ciss deploy``).
   ``--setting disjoint`` (default): step-0's images show no dotted shape, so they are new to
   the model, as a kind of object that appears after deployment. ``--setting overlap``: they
   are in its images labelled background, so the model has learned them as background.
2. A stream of ``--stream`` new scenes of the same world (indices never used for training),
   ``--unseen-share`` of them holding at least one dotted shape. Each image is scored by the
   serving code itself (``Segmenter.segment_scored`` on the ONNX engine, in process: no HTTP)
   and offered to a ``Collector`` with the calibrated thresholds and the default random share
   (2 %), no rate caps (the stream is offline) and the default duplicate rule.
3. Image-level AUROC and AP of each score for "holds an unseen class".
4. From the scored stream, each selection rule (``data.select``: balanced, score) and random
   picks N images; the share holding an unseen class is reported. The ground-truth masks of
   the dotted shapes stand in for an annotator (every other pixel background, as a user's
   new-class annotation), and ``add_classes`` (defaults: mib) runs from the base on each
   picked set. Old- and new-class mIoU on the world's held-out val split (full labels; a
   dotted shape absent from a picked set scores 0).

Nothing here was tuned on these streams: the thresholds are the calibration's fixed quantiles
and the selection rule was written before this script ran. Medians over seeds are reported.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

UNSEEN_FIRST = 16  # dots-disc .. dots-cross: ids 16-20 of the 20-class world
KEYS = ("novelty", "uncertainty", "novel_share", "largest_region")


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Probability that a positive scores above a negative (ties count half)."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    greater = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return float(greater / (len(pos) * len(neg)))


def average_precision(scores: list[float], labels: list[bool]) -> float:
    """Mean precision at the rank of each positive (scores descending)."""
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    y = np.asarray(labels, bool)[order]
    hits = np.cumsum(y)
    return float((hits[y] / (np.flatnonzero(y) + 1)).mean())


def build_base(work: Path, seed: int, iterations: int | None = None,
               setting: str = "disjoint"):
    from ciss.data.folder import open_folder
    from ciss.data.scenarios import parse_scenario, write_split
    from ciss.data.synthetic import SyntheticConfig, write_synthetic
    from ciss.exporters.export import export_step
    from ciss.runtime.scoring import calibrate_step
    from ciss.store import Store
    from ciss.updater.config import StepOptions, resolve_step
    from ciss.updater.train import train_base

    data = write_synthetic(work / "data", SyntheticConfig(n_train=2000, n_val=300, seed=seed))
    steps = write_split(open_folder(data), parse_scenario("15-5"), work / "15-5", setting)
    store = Store(work / "store")
    cfg = resolve_step("train", StepOptions(arch="tiny", iterations=iterations))
    t0 = time.perf_counter()
    train_base(store, steps[0], config=cfg, progress=False)
    base_s = time.perf_counter() - t0
    export_step(store, 0, ["onnx"])
    cal = calibrate_step(store, 0, "onnx")
    return data, store, cal, base_s


def make_stream(seed: int, n: int, share: float):
    """(image, full mask) pairs from scene indices >= 100000, ``share`` holding a dotted
    shape; drawn in index order until both quotas are met."""
    from ciss.data.synthetic import make_scene

    want_pos = int(round(n * share))
    pos, neg, i = [], [], 100_000
    while len(pos) < want_pos or len(neg) < n - want_pos:
        img, mask = make_scene(seed, i)
        i += 1
        bucket = pos if (mask >= UNSEEN_FIRST).any() else neg
        if len(bucket) < (want_pos if bucket is pos else n - want_pos):
            bucket.append((img, mask))
    rng = np.random.default_rng(seed)
    stream = pos + neg
    return [stream[j] for j in rng.permutation(len(stream))]


def score_stream(store, cal, stream, folder: Path):
    import datetime as dt

    from ciss.engines.load import load_engine, ort_providers
    from ciss.runtime.collect import Collector, CollectPolicy, Scored
    from ciss.runtime.segmenter import Segmenter

    card = store.card(0)
    engine = load_engine(store, 0, "onnx", ort_providers("cpu"), device="cpu")
    seg = Segmenter(engine, list(card.classes))
    collector = Collector(CollectPolicy(folder, per_minute=10**9, per_hour=10**9,
                                        per_day=10**9, seed=0))
    metas, outcomes = [], {}
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for k, (img, mask) in enumerate(stream):
        labels, scores = seg.segment_scored(img, cal)
        item = Scored(img, labels, scores, 0, "onnx", list(card.classes), cal,
                      t0 + dt.timedelta(seconds=k))
        out = collector.consider(item)
        outcomes[out] = outcomes.get(out, 0) + 1
        metas.append({"id": str(k), "classes": list(card.classes), "scores": scores,
                      "pooled": scores["pooled"], "kept": out.startswith("kept"),
                      "unseen": bool((mask >= UNSEEN_FIRST).any())})
    return metas, outcomes


def write_new_class_folder(out: Path, picks: list[int], stream, names: list[str]) -> list[str]:
    """The picked images with only the dotted shapes labelled (an annotator's new-class
    masks); returns the unseen classes the training split shows.

    val: every 5th picked image that shows a new class (at least one), as an annotator would
    set aside (the 90/10 rule alone can leave no new class in a small val split). A dotted
    shape only the val images show cannot be learned: its pixels are ignored (255).
    """
    from ciss.data.imageio import write_mask

    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    shows = [k for k in picks if (stream[k][1] >= UNSEEN_FIRST).any()]
    val = set(shows[::5])
    present = sorted({int(c) for k in picks if k not in val for c in np.unique(stream[k][1])
                      if c >= UNSEEN_FIRST})
    lut = np.zeros(256, np.uint8)
    lut[UNSEEN_FIRST:len(names)] = 255
    for j, c in enumerate(present, start=1):
        lut[c] = j
    for k in picks:
        img, mask = stream[k]
        Image.fromarray(img).save(out / "images" / f"s{k:04d}.png")
        write_mask(out / "masks" / f"s{k:04d}.png", lut[mask])
    (out / "classes.txt").write_text("\n".join(["background"] + [names[c] for c in present])
                                     + "\n")
    (out / "val.txt").write_text("".join(f"s{k:04d}\n" for k in picks if k in val))
    (out / "train.txt").write_text("".join(f"s{k:04d}\n" for k in picks if k not in val))
    return [names[c] for c in present]


def learn(store_root: Path, work: Path, data: Path, picks, stream, tag: str,
          iterations: int | None = None) -> dict:
    from ciss.analysis.scoring import score_folder, torch_predictor
    from ciss.data.classes import ClassList
    from ciss.data.folder import open_folder
    from ciss.store import Store
    from ciss.updater.add_classes import add_classes
    from ciss.updater.config import StepOptions, resolve_step

    source = open_folder(data, require_train=False)
    names = source.classes.names
    folder = work / f"new-{tag}"
    present = write_new_class_folder(folder, picks, stream, list(names))
    root = work / f"store-{tag}"
    shutil.copytree(store_root, root)
    store = Store(root)
    if not present:
        return {"present": [], "old": None, "new": 0.0, "seconds": 0.0}
    cfg = resolve_step("add-classes", StepOptions(parent=0, iterations=iterations), store)
    t0 = time.perf_counter()
    from ciss.errors import CissError

    try:
        rep = add_classes(store, folder, config=cfg, progress=False)
    except CissError as exc:  # e.g. a val split showing no trainable class: nothing learned
        shutil.rmtree(root)
        return {"present": present, "old": None, "new": 0.0, "seconds": 0.0,
                "error": str(exc)}
    seconds = time.perf_counter() - t0
    model, card = store.load_model(rep.step, device="cpu")
    scores = score_folder(torch_predictor(model), source, source.val,
                          ClassList(tuple(card.classes))).per_class()
    old = [scores.get(n) for n in names[1:UNSEEN_FIRST]]
    new = [scores.get(n) or 0.0 for n in names[UNSEEN_FIRST:]]
    shutil.rmtree(root)
    return {"present": present, "old": statistics.mean(v for v in old if v is not None),
            "new": statistics.mean(new), "seconds": seconds}


def run_seed(seed: int, args, work: Path) -> dict:
    from ciss.data.select import select

    t0 = time.perf_counter()
    data, store, cal, base_s = build_base(work, seed, args.base_iterations, args.setting)
    stream = make_stream(seed, args.stream, args.unseen_share)
    metas, outcomes = score_stream(store, cal, stream, work / "collected")
    unseen = [m["unseen"] for m in metas]
    detect = {k: {"auroc": auroc([m["scores"][k] for m in metas], unseen),
                  "ap": average_precision([m["scores"][k] for m in metas], unseen)}
              for k in KEYS}
    kept = [m for m in metas if m["kept"]]
    res = {"seed": seed, "base_train_s": base_s, "calibration": {
        "novelty_threshold": cal.novelty_threshold,
        "uncertainty_threshold": cal.uncertainty_threshold, "images": cal.images},
        "base_rate": sum(unseen) / len(unseen), "detect": detect,
        "collector": {"outcomes": outcomes, "kept": len(kept),
                      "kept_unseen_share": (sum(m["unseen"] for m in kept) / len(kept)
                                            if kept else None)},
        "budgets": {}}
    for n in args.budgets:
        row = {}
        for rule in ("balanced", "score", "random"):
            picks = select(metas, n, rule, seed=seed)
            row[rule] = {"unseen_share": sum(unseen[i] for i in picks) / len(picks)}
            if rule in args.learn_rules:
                row[rule].update(learn(store.root, work, data, picks, stream,
                                       f"{rule}-{n}", args.step_iterations))
            print(f"seed {seed} N={n} {rule}: {json.dumps(row[rule])}", flush=True)
        res["budgets"][str(n)] = row
    res["seconds"] = time.perf_counter() - t0
    return res


def summarise(runs: list[dict], args) -> None:
    med = statistics.median
    print(f"machine: {machine()}")
    print(f"setting {args.setting}; seeds {','.join(str(r['seed']) for r in runs)}; "
          f"stream {args.stream} images, "
          f"{args.unseen_share:.0%} holding an unseen class; medians over seeds")
    print("\n| score | AUROC | AP (base rate "
          f"{med(r['base_rate'] for r in runs):.2f}) |\n|---|---:|---:|")
    for k in KEYS:
        print(f"| {k} | {med(r['detect'][k]['auroc'] for r in runs):.3f} | "
              f"{med(r['detect'][k]['ap'] for r in runs):.3f} |")
    kept = [r["collector"]["kept_unseen_share"] for r in runs
            if r["collector"]["kept_unseen_share"] is not None]
    print(f"\ncollector (calibrated thresholds, 2 % random): kept "
          f"{med(r['collector']['kept'] for r in runs)} of {args.stream}; share holding an "
          f"unseen class {med(kept):.2f}" if kept else "\ncollector kept nothing")
    print("\n| N | rule | share unseen | x random | new mIoU | x random | old mIoU | "
          "old - random |\n|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in args.budgets:
        for rule in ("balanced", "score", "random"):
            rows = [r["budgets"][str(n)][rule] for r in runs]
            rnd = [r["budgets"][str(n)]["random"] for r in runs]
            share = med(x["unseen_share"] for x in rows)
            ratio = med(x["unseen_share"] / max(y["unseen_share"], 1e-9)
                        for x, y in zip(rows, rnd))
            line = f"| {n} | {rule} | {share:.2f} | {ratio:.2f} |"
            if "new" in rows[0] and "new" in rnd[0]:
                new = med(x["new"] for x in rows)
                nr = med(x["new"] / max(y["new"], 1e-9) for x, y in zip(rows, rnd))
                olds = [(x["old"], y["old"]) for x, y in zip(rows, rnd)
                        if x["old"] is not None and y["old"] is not None]
                old = med(o for o, _ in olds) if olds else float("nan")
                dold = med(o - p for o, p in olds) if olds else float("nan")
                line += f" {new:.3f} | {nr:.2f} | {old:.3f} | {dold:+.3f} |"
            else:
                line += " - | - | - | - |"
            print(line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--setting", choices=["disjoint", "overlap"], default="disjoint",
                    help="disjoint: the base never saw a dotted shape (they are new to the "
                         "world); overlap: they were in its images, labelled background")
    ap.add_argument("--budgets", default="25,50,100")
    ap.add_argument("--stream", type=int, default=500)
    ap.add_argument("--unseen-share", type=float, default=0.2)
    ap.add_argument("--learn-rules", default="balanced,random",
                    help="rules whose picks are trained on (add-classes is the slow part)")
    ap.add_argument("--base-iterations", type=int, default=None, help="smoke runs only")
    ap.add_argument("--step-iterations", type=int, default=None, help="smoke runs only")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.budgets = [int(x) for x in args.budgets.split(",")]
    args.learn_rules = [x for x in args.learn_rules.split(",") if x]
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        work = Path(tempfile.mkdtemp(prefix=f"loop-{seed}-", dir=args.work))
        runs.append(run_seed(seed, args, work))
        if args.out:
            args.out.write_text(json.dumps({"runs": runs}, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    summarise(runs, args)


if __name__ == "__main__":
    main()
