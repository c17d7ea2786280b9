"""``ciss demo``: the product's story end to end on the embedded synthetic data."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ciss.errors import CissError
from ciss.tables import pct, table


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets of one demo run."""

    n_train: int
    n_val: int
    base_epochs: int
    step_epochs: int


FULL = DemoPlan(n_train=2000, n_val=300, base_epochs=16, step_epochs=6)
FAST = DemoPlan(n_train=160, n_val=60, base_epochs=2, step_epochs=1)


def run_demo(out: Path, *, fast: bool = False, echo: Callable[[str], None] = print) -> dict:
    """Synthetic data -> split 15-5 -> base training -> evaluation (and later steps).

    Returns a dict of the headline numbers (tests and benchmarks read it).
    """
    from ciss.analysis.evaluate import evaluate_step
    from ciss.data.folder import open_folder
    from ciss.data.scenarios import parse_scenario, write_split
    from ciss.data.synthetic import SyntheticConfig, write_synthetic
    from ciss.store import Store
    from ciss.updater.loop import LoopConfig
    from ciss.updater.train import train_base

    plan = FAST if fast else FULL
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CissError(f"{out}: exists and is not empty; remove it or pass another --out")
    t0 = time.perf_counter()
    data_dir, split_dir, store = out / "data", out / "15-5", Store(out / "store")
    echo(f"[1/4] synthetic data: {plan.n_train} train + {plan.n_val} val images -> {data_dir}")
    write_synthetic(data_dir, SyntheticConfig(n_train=plan.n_train, n_val=plan.n_val))
    echo("[2/4] split 15-5 (overlap): step-0 learns 15 classes, step-1 adds 5 dotted shapes")
    steps = write_split(open_folder(data_dir), parse_scenario("15-5"), split_dir)
    echo(f"[3/4] base training of tiny on {steps[0]} ({plan.base_epochs} epochs)")
    base = train_base(store, steps[0], loop=LoopConfig(epochs=plan.base_epochs, lr=4e-3),
                      progress=not fast)
    echo(f"      step {base.step} written in {base.fit.seconds:.0f}s of training")
    echo(f"[4/4] evaluation of step {base.step} on the full-label val split")
    ev = evaluate_step(store, data_dir, step=base.step)
    doc = ev.to_json()
    rows = [[name, pct(v)] for name, v in doc["per_class_iou"].items() if v is not None]
    echo(table(["class", "IoU %"], rows))
    summary = {"base_step": base.step, "base_miou": doc["new_miou"],
               "seconds": round(time.perf_counter() - t0, 1)}
    echo(f"base mIoU over its 15 classes: {pct(doc['new_miou'])}; "
         f"store: {store.root}; total {summary['seconds']}s")
    echo(f"next: ciss steps --store {store.root}")
    return summary
