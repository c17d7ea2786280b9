"""``ciss benchmark``: a CiSS scenario end to end for several methods, the literature's table.

Protocol: the source folder's train split is divided into step folders (``data split``); one
base step is trained and shared by every method; each method then learns the later steps in
order; after every step the model is scored on the source's val split with full labels
(classes not yet seen count as background). ``joint`` trains once on all classes (upper
bound). old = the base step's object classes, new = classes added later, all = every class
with ground truth, background included; hIoU = harmonic mean of old and new.

A method name ending in ``+memory`` runs that method with the replay memory
(``--memory N`` images, ``updater.memory``); the shared base step then keeps one too, which
changes nothing of its weights. ``+fuse`` adds EWF's endpoint fusion after every step.
``+pretune`` runs NeST's classifier pre-tuning before every step (NeST's share, 5/30, where
the family's recipe gives none); ``+nopretune`` turns off a default one.
Outputs: results.json (every step of every method),
results.csv, results.md, curves.png and results.html (old/new/all after each step, one line
per method, joint dashed).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ciss.analysis.metrics import harmonic_iou
from ciss.analysis.scoring import score_folder, torch_predictor
from ciss.data.classes import ClassList
from ciss.data.folder import open_folder
from ciss.data.scenarios import parse_scenario, write_split
from ciss.errors import CissError
from ciss.models.build import arch_spec
from ciss.models.recipes import NEST_SHARE
from ciss.store import Store
from ciss.tables import pct, table
from ciss.updater.add_classes import add_classes
from ciss.updater.config import StepOptions, resolve_step
from ciss.updater.method_table import BENCHMARK_METHODS as KNOWN
from ciss.updater.train import train_base


@dataclass(frozen=True)
class BenchmarkConfig:
    """What to run. Epoch counts default to the updater's defaults."""

    scenario: str = "15-5"
    setting: str = "overlap"
    methods: tuple[str, ...] = ("ft", "mib")
    arch: str = "tiny"
    weights: str | None = None
    base_epochs: int | None = None
    step_epochs: int | None = None
    control: bool = False
    freeze: str | None = None
    seed: int = 0
    device: str = "auto"
    memory: int = 100

    @property
    def model(self) -> str:
        """The base step's model as the output names it: the arch, and its weights if any."""
        return f"{self.arch}, {self.weights} weights" if self.weights else self.arch


# NAME+memory: the replay memory; NAME+fuse: EWF's fusion; NAME+pretune / NAME+nopretune:
# NeST's classifier pre-tuning on / off
ADD_ONS = ("memory", "fuse", "pretune", "nopretune")


def pretune_of(ons: set[str], recipe_share: float) -> float | None:
    """The ``UpdateConfig.pretune`` of a benchmark method's add-ons (None: the default)."""
    if "nopretune" in ons:
        return 0.0
    if "pretune" in ons:
        return recipe_share or NEST_SHARE
    return None


def method_parts(name: str) -> tuple[str, set[str]]:
    """(method, add-ons) of a benchmark method name such as ``dkd+fuse+memory``."""
    parts = name.split("+")
    ons = set()
    while len(parts) > 1 and parts[-1] in ADD_ONS:
        ons.add(parts.pop())
    return "+".join(parts), ons


@dataclass
class Row:
    method: str
    step: int
    old: float | None
    new: float | None
    all: float | None
    hiou: float | None
    train_s: float
    per_class: dict[str, float | None] = field(default_factory=dict)


@dataclass
class BenchmarkResult:
    config: BenchmarkConfig
    rows: list[Row]

    def final(self) -> list[Row]:
        last: dict[str, Row] = {}
        for r in self.rows:
            last[r.method] = r
        return list(last.values())

    def to_json(self) -> dict:
        return {"config": asdict(self.config), "final": [asdict(r) for r in self.final()],
                "steps": [asdict(r) for r in self.rows]}

    def markdown(self) -> str:
        final = table(["method", "old mIoU %", "new mIoU %", "all mIoU %", "hIoU %",
                       "train s/step"],
                      [[r.method, pct(r.old), pct(r.new), pct(r.all), pct(r.hiou),
                        f"{self._mean_time(r.method):.0f}"] for r in self.final()])
        steps = table(["method", "step", "old %", "new %", "all %", "train s"],
                      [[r.method, r.step, pct(r.old), pct(r.new), pct(r.all),
                        f"{r.train_s:.0f}"] for r in self.rows])
        c = self.config
        return (f"CiSS benchmark {c.scenario} ({c.setting}), arch {c.model}\n\n"
                f"After the last step:\n{final}\n\nPer step:\n{steps}\n")

    def _mean_time(self, method: str) -> float:
        ts = [r.train_s for r in self.rows if r.method == method and (r.step > 0
                                                                       or method == "joint")]
        return sum(ts) / len(ts) if ts else 0.0


def score_step(store: Store, step: int, source, base_ids: list[int],
               device: str = "cpu") -> tuple:
    """(old, new, all mIoU, per-class IoU) of a stored step on ``source``'s full-label val.

    old = the source classes ``base_ids`` (the base step's), new = every later class.
    """
    from ciss.engines.load import torch_device

    dev = torch_device(device)
    model, card = store.load_model(step, device=str(dev))
    classes = ClassList(tuple(card.classes))
    s = score_folder(torch_predictor(model, dev), source, source.val, classes)
    names = card.classes
    old_ids = [names.index(source.classes.names[i]) for i in base_ids]
    new_ids = [i for i in range(1, len(names)) if i not in old_ids]
    old = s.miou(old_ids)
    new = s.miou(new_ids) if new_ids else None
    return old, new, s.miou(), s.per_class()


def run_benchmark(data_dir: Path, out: Path, cfg: BenchmarkConfig, *, progress: bool = True,
                  echo: Callable[[str], None] | None = print) -> BenchmarkResult:
    """Run the benchmark into ``out`` (split/, stores/, results.csv, results.md, curves.png)."""
    say = echo or (lambda _m: None)
    unknown = [m for m in cfg.methods if method_parts(m)[0] not in KNOWN
               or (method_parts(m)[0] == "joint" and method_parts(m)[1])]
    if unknown or not cfg.methods:
        raise CissError(f"--methods: unknown {', '.join(unknown) or '(none)'}; choose from "
                        f"{', '.join(KNOWN)}, each but joint also as NAME+"
                        f"{' or NAME+'.join(ADD_ONS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CissError(f"{out}: exists and is not empty; choose a new folder")
    source = open_folder(data_dir)
    scenario = parse_scenario(cfg.scenario)
    steps = write_split(source, scenario, out / "split", cfg.setting)
    base_ids = scenario.steps(len(source.classes) - 1)[0]
    wants_memory = any("memory" in method_parts(m)[1] for m in cfg.methods if m != "joint")
    # joint training starts from the same init as the base step
    base_options = StepOptions(arch=cfg.arch, weights=cfg.weights, epochs=cfg.base_epochs,
                               seed=cfg.seed, device=cfg.device)
    base_cfg = resolve_step("train", replace(base_options,
                                             memory=cfg.memory if wants_memory else 0))
    budget = (f"{cfg.base_epochs} epochs" if cfg.base_epochs
              else f"{base_cfg.loop.iterations} iterations")
    rows: list[Row] = []
    incremental = [m for m in cfg.methods if m != "joint"]
    runs = [(m, steps) for m in incremental]
    if cfg.control:
        control = write_split(source, scenario, out / "split-control", cfg.setting,
                              old_label=255)
        runs.append(("ft-control", control))
    if incremental or cfg.control:
        say(f"base step: {cfg.model}, {len(base_ids)} classes, {budget}")
        base = Store(out / "stores" / "base")
        rep = train_base(base, steps[0], config=base_cfg, progress=progress)
        old, new, all_, per = score_step(base, 0, source, base_ids, cfg.device)
        for method, step_dirs in runs:
            store = Store(out / "stores" / method)
            shutil.copytree(base.root, store.root)
            rows.append(Row(method, 0, old, None, all_, None, rep.fit.seconds, per))
            name, ons = method_parts(method)
            loss = {"ft-control": "ft", "mib+pseudo": "mib"}.get(name, name)
            options = StepOptions(
                method=loss, pseudo=name == "mib+pseudo", freeze=cfg.freeze,
                memory=cfg.memory if "memory" in ons else 0, fuse="fuse" in ons,
                pretune=pretune_of(ons, arch_spec(cfg.arch).family.step.pretune),
                epochs=cfg.step_epochs, seed=cfg.seed, device=cfg.device)
            for t, step_dir in enumerate(step_dirs[1:], start=1):
                say(f"{method}: step {t}/{len(step_dirs) - 1}")
                r = add_classes(store, step_dir, config=resolve_step("add-classes", options,
                                                                     store),
                                progress=progress)
                o, n, a, per = score_step(store, r.step, source, base_ids, cfg.device)
                # the pre-tuning is part of what the step costs
                seconds = r.fit.seconds + r.card.timings.get("pretune_s", 0.0)
                rows.append(Row(method, t, o, n, a, harmonic_iou(o, n), seconds, per))
    if "joint" in cfg.methods:
        say(f"joint: all {len(source.classes) - 1} classes at once, {budget}")
        store = Store(out / "stores" / "joint")
        rep = train_base(store, data_dir, config=resolve_step("train", base_options),
                         progress=progress)
        o, n, a, per = score_step(store, 0, source, base_ids, cfg.device)
        rows.append(Row("joint", len(steps) - 1, o, n, a, harmonic_iou(o, n), rep.fit.seconds,
                        per))
    result = BenchmarkResult(cfg, rows)
    _write_outputs(result, out)
    return result


def _write_outputs(result: BenchmarkResult, out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "step", "old_miou", "new_miou", "all_miou", "hiou", "train_s"])
        for r in result.rows:
            w.writerow([r.method, r.step, r.old, r.new, r.all, r.hiou, round(r.train_s, 2)])
    (out / "results.md").write_text(result.markdown())
    (out / "results.json").write_text(json.dumps(result.to_json(), indent=2))
    fig = curves_figure(result)
    fig.savefig(out / "curves.png", dpi=90)
    write_html(result, fig, out / "results.html")


KEYS = (("old", "old classes mIoU %"), ("new", "new classes mIoU %"),
        ("all", "all classes mIoU %"))


def curves_figure(result: BenchmarkResult):
    """Old, new and all-class mIoU after each step: one line per method, joint (trained once
    on every class) as a dashed horizontal reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    methods = list(dict.fromkeys(r.method for r in result.rows))
    for m in methods:
        rs = [r for r in result.rows if r.method == m]
        for ax, (key, _) in zip(axes, KEYS):
            if m == "joint":
                value = getattr(rs[-1], key)
                if value is not None:
                    ax.axhline(100 * value, linestyle="--", color="k", linewidth=1,
                               label="joint")
                continue
            pts = [(r.step, 100 * getattr(r, key)) for r in rs if getattr(r, key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=m)
    for ax, (_, title) in zip(axes, KEYS):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result.config.scenario} {result.config.setting}, {result.config.arch}")
    fig.tight_layout()
    return fig


def write_html(result: BenchmarkResult, fig, path: Path) -> None:
    """One self-contained page: the curves (embedded PNG) and both tables."""
    import html as html_lib

    import matplotlib.pyplot as plt

    from ciss.analysis.report import png_base64

    image = png_base64(fig)
    plt.close(fig)
    c = result.config
    page = (f"<!doctype html><meta charset='utf-8'><title>ciss benchmark {c.scenario}</title>"
            "<body style='font-family:sans-serif;max-width:1100px;margin:auto'>"
            f"<h1>CiSS benchmark {html_lib.escape(c.scenario)} ({c.setting}), "
            f"{html_lib.escape(c.arch)}, seed {c.seed}</h1>"
            f"<img alt='curves' style='width:100%' src='data:image/png;base64,{image}'>"
            f"<pre>{html_lib.escape(result.markdown())}</pre></body>")
    path.write_text(page, encoding="utf-8")
