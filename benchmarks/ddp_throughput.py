"""Training throughput with 1 vs N processes under torchrun (DDP, gloo on CPU / NCCL on GPU).

Usage: python benchmarks/ddp_throughput.py [--procs 1,2] [--epochs 2] [--repeats 3]
           [--train 400] [--batch-size 8] [--device cpu|cuda]

Each run is a real ``torchrun --nproc_per_node=N -m ciss <job>`` on synthetic 64 px data:
``train`` (base step) and ``add-classes`` (mib, from a base trained once). Samples/s come from
the step card: iterations per rank x per-rank batch x world size / training seconds (startup,
evaluation and writing excluded; wall time including them is reported too). On CPU every rank
gets cores / N threads (torchrun sets OMP_NUM_THREADS=1 for N > 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from _common import machine, run_torchrun


def run(job: list[str], procs: int, store: Path, args) -> dict:
    threads = max(1, (os.cpu_count() or 1) // procs)
    res, wall = run_torchrun(procs, [*job, "--store", store, "--epochs", args.epochs,
                                     "--batch-size", args.batch_size, "--device", args.device,
                                     "--quiet"])
    if res.returncode != 0:
        raise SystemExit(f"torchrun {' '.join(map(str, job))} failed:\n{res.stdout}\n"
                         f"{res.stderr}")
    from ciss.store import Store

    s = Store(store)
    card = s.card(s.latest())
    samples = card.timings["iterations"] * args.batch_size * card.extra["world_size"]
    return {"procs": procs, "samples_per_s": samples / card.timings["train_s"],
            "train_s": card.timings["train_s"], "wall_s": wall, "threads_per_rank": threads}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from ciss.data.folder import open_folder
    from ciss.data.scenarios import parse_scenario, write_split
    from ciss.data.synthetic import SyntheticConfig, write_synthetic

    tmp = Path(tempfile.mkdtemp())
    write_synthetic(tmp / "data", SyntheticConfig(n_train=args.train, n_val=60))
    steps = write_split(open_folder(tmp / "data"), parse_scenario("15-5"), tmp / "split")
    procs = [int(p) for p in args.procs.split(",")]
    base = tmp / "base"
    run(["train", "--data", str(steps[0])], 1, base, args)
    rows = []
    for rep in range(args.repeats):
        for n in procs:
            store = tmp / f"train-{rep}-{n}"
            rows.append({"job": "train", "repeat": rep,
                         **run(["train", "--data", str(steps[0])], n, store, args)})
            store = tmp / f"add-{rep}-{n}"
            subprocess.run(["cp", "-r", str(base), str(store)], check=True)
            rows.append({"job": "add-classes mib", "repeat": rep,
                         **run(["add-classes", "--data", str(steps[1])], n, store, args)})
    print(f"machine: {machine()}; device {args.device}; {args.train} train images at 64 px, "
          f"{args.epochs} epochs, batch {args.batch_size} per rank; medians of {args.repeats}")
    print("| job | processes | threads/rank | samples/s | train s | wall s | vs 1 process |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for job in ("train", "add-classes mib"):
        one = {r["repeat"]: r["samples_per_s"] for r in rows if r["job"] == job
               and r["procs"] == procs[0]}
        for n in procs:
            sel = [r for r in rows if r["job"] == job and r["procs"] == n]
            ratio = statistics.median(r["samples_per_s"] / one[r["repeat"]] for r in sel)
            print(f"| {job} | {n} | {sel[0]['threads_per_rank']} | "
                  f"{statistics.median(r['samples_per_s'] for r in sel):.1f} | "
                  f"{statistics.median(r['train_s'] for r in sel):.1f} | "
                  f"{statistics.median(r['wall_s'] for r in sel):.1f} | {ratio:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
