"""The ``ciss`` command line: each command parses options, makes one library call, prints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ciss.errors import CheckFailed, CissError
from ciss.tables import pct, table


class CissGroup(click.Group):
    """Maps CissError to exit 2 and CheckFailed to exit 1, one line each, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CissError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except CheckFailed as exc:
            click.echo(f"check failed: {exc}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume", err=True)
            sys.exit(130)


def store_option(f):
    return click.option("--store", "store_path", type=click.Path(path_type=Path),
                        envvar="CISS_STORE", default="ciss-store", show_default=True,
                        help="Model store folder (env CISS_STORE).")(f)


def data_option(required: bool = True, help: str = "Dataset folder (ciss or VOC layout)."):
    return click.option("--data", "data_dir", type=click.Path(path_type=Path),
                        required=required, help=help)


def _store(path: Path):
    from ciss.store import Store

    return Store(path)


def parse_scale(text: str | None, default: tuple[float, float] = (1.0, 1.0)
                ) -> tuple[float, float]:
    if text is None:
        return default
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise click.BadParameter("expected MIN,MAX such as 0.5,2.0") from exc
    if not 0 < lo <= hi:
        raise click.BadParameter("need 0 < MIN <= MAX")
    return lo, hi


def _loop_options(f):
    opts = [
        click.option("--iterations", type=click.IntRange(min=1), default=None,
                     help="Training budget in optimiser steps (default: the recipe's, "
                          "whatever the folder's size)."),
        click.option("--epochs", type=click.IntRange(min=1), default=None,
                     help="Passes over the training split instead of --iterations."),
        click.option("--batch-size", type=click.IntRange(min=2), default=16, show_default=True),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Peak learning rate."),
        click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw",
                     show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", default="auto", show_default=True,
                     help="auto, cpu, cuda or cuda:N."),
        click.option("--crop-size", type=click.IntRange(min=16), default=None,
                     help="Training crop side (default: median image side, at most 512)."),
        click.option("--scale", default=None,
                     help="Random rescale range MIN,MAX (default: the recipe's; photos: "
                          "0.5,2.0 as in the literature)."),
        click.option("--workers", type=click.IntRange(min=0), default=None,
                     help="DataLoader workers (default: 0 for folders held in memory, "
                          "else up to 4)."),
        click.option("--min-iou", "floor", type=click.FloatRange(min=0, max=100),
                     default=5.0, show_default=True,
                     help="Warn about every trained class whose val IoU ends below this "
                          "(points)."),
        click.option("--sync-bn", is_flag=True,
                     help="Under torchrun on GPUs: BatchNorm statistics over all ranks."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.group(cls=CissGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ciss")
def main() -> None:
    """ciss: learn new segmentation classes without forgetting old ones, and ship each step
    as a checked, compiled engine.

    \b
    Start here:
      ciss demo --out demo-out            # the whole story on synthetic data
      ciss data synthetic --out data/     # make a dataset folder
      ciss train --data data/step-0       # step 0
      ciss add-classes --data new/        # learn new classes, keep the old
    """


# -- data ------------------------------------------------------------------------------------
@main.group()
def data() -> None:
    """Make and split dataset folders."""


@data.command("synthetic")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--size", type=click.IntRange(min=32), default=64, show_default=True)
@click.option("--train", "n_train", type=click.IntRange(min=1), default=2000, show_default=True)
@click.option("--val", "n_val", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def data_synthetic(out: Path, size: int, n_train: int, n_val: int, seed: int) -> None:
    """Write the embedded synthetic dataset (20 classes, full labels, train/val lists).

    Example: ciss data synthetic --out data/synthetic
    """
    from ciss.data.synthetic import SyntheticConfig, write_synthetic

    write_synthetic(out, SyntheticConfig(size=size, n_train=n_train, n_val=n_val, seed=seed))
    click.echo(f"wrote {n_train} train + {n_val} val images ({size}x{size}, 20 classes) to "
               f"{out}\nnext: ciss data split --data {out} --scenario 15-5 --out {out}-15-5")


@data.command("split")
@data_option()
@click.option("--scenario", required=True, help="X-Y, e.g. 19-1, 15-5, 15-1, 10-1, 5-3.")
@click.option("--setting", type=click.Choice(["overlap", "disjoint"]), default="overlap",
              show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def data_split(data_dir: Path, scenario: str, setting: str, out: Path) -> None:
    """Split a fully labelled folder into CiSS step folders (step-0/, step-1/, ...).

    Example: ciss data split --data data/synthetic --scenario 15-5 --out data/15-5
    """
    from ciss.data.folder import open_folder
    from ciss.data.scenarios import parse_scenario, write_split

    sc = parse_scenario(scenario)
    steps = write_split(open_folder(data_dir), sc, out, setting)
    meta = json.loads((out / "scenario.json").read_text())
    click.echo(table(["step", "classes", "train", "val"],
                     [[s["dir"], len(s["classes"]), s["train"], s["val"]]
                      for s in meta["steps"]]))
    click.echo(f"next: ciss train --data {steps[0]}")


# -- training --------------------------------------------------------------------------------
@main.command()
@store_option
@data_option()
@click.option("--arch", default="tiny", show_default=True, help="An ARCHS name.")
@click.option("--weights", type=click.Choice(["imagenet"]), default=None,
              help="Pretrained backbone (downloads once; default: random init).")
@click.option("--loss", type=click.Choice(["ce", "wce", "ce+dice", "ohem"]), default=None,
              help="ce, wce (classes weighted by pixel share), ce+dice or ohem "
                   "(default: the recipe's).")
@_loop_options
def train(store_path, data_dir, arch, weights, loss, iterations, epochs, batch_size, lr,
          optimizer, seed, device, crop_size, scale, workers, floor, sync_bn, quiet) -> None:
    """Train step 0 on a dataset folder and write it to the store.

    An interrupted run resumes from its last epoch when the same command is repeated.
    Runs unchanged under torchrun (DDP; --batch-size is per process; rank 0 writes).

    The budget is a number of optimiser steps (--iterations), so a small folder still gets
    enough updates; the val split is scored along the way and the best weights are kept.
    Every class that ends below --min-iou on the val split is named in a warning.

    Example: ciss train --data data/15-5/step-0 --iterations 2000
    """
    from ciss.updater.defaults import base_defaults
    from ciss.updater.train import DataConfig, train_base

    d = base_defaults(arch)
    loop = d.loop(iterations=iterations, epochs=epochs, batch_size=batch_size, lr=lr,
                  optimizer=optimizer, seed=seed, device=device, sync_bn=sync_bn)
    report = train_base(_store(store_path), data_dir, arch=arch, weights=weights, loop=loop,
                        data=DataConfig(crop_size=crop_size, scale=parse_scale(scale, d.scale),
                                        workers=workers),
                        loss=loss or d.loss, floor=floor, progress=not quiet)
    if report.rank != 0:  # under torchrun only rank 0 reports
        return
    s = report.scores
    ids = list(range(1, len(report.card.classes)))
    click.echo(f"step {report.step}: {arch}, {len(ids)} classes, mIoU {pct(s.miou(ids))} "
               f"(objects, retention set), background {pct(s.iou[0])}, "
               f"{report.fit.seconds:.0f}s training ({report.fit.iterations} iterations)"
               + (f" (resumed at epoch {report.fit.resumed_from + 1})"
                  if report.fit.resumed_from is not None else ""))
    echo_warnings(report.warnings)
    click.echo(f"next: ciss evaluate --data {data_dir}   or   ciss add-classes --data NEW_FOLDER")


def echo_warnings(warnings) -> None:
    """One ``warning:`` line per class the step did not learn (on stderr and stdout alike)."""
    for w in warnings:
        click.echo(w.line(), err=True)


# -- inspection ------------------------------------------------------------------------------
@main.command()
@store_option
@data_option(help="Labelled folder; its val split is used when it names one.")
@click.option("--step", type=int, default=None, help="Step number (default: latest).")
@click.option("--engine", type=click.Choice(["torch", "onnx", "int8", "tensorrt"]),
              default="torch", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def evaluate(store_path, data_dir, step, engine, as_json) -> None:
    """Score a step on a labelled folder (classes matched by name).

    Example: ciss evaluate --data data/synthetic --json
    """
    from ciss.analysis.evaluate import evaluate_step

    ev = evaluate_step(_store(store_path), data_dir, step=step, engine=engine)
    doc = ev.to_json()
    if as_json:
        click.echo(json.dumps(doc))
        return
    old, new = ev.group_ids()
    group = {i: "old" for i in old} | {i: "new" for i in new}
    rows = [[name, group.get(i, "bg" if i == 0 else ""), pct(v)]
            for i, (name, v) in enumerate(doc["per_class_iou"].items())]
    click.echo(table(["class", "group", "IoU %"], rows))
    click.echo(f"step {ev.step} on {ev.images} images ({engine}): mIoU {pct(doc['miou'])}, "
               f"old {pct(doc['old_miou'])}, new {pct(doc['new_miou'])}")
    if doc["unknown_classes"]:
        click.echo("classes unknown to the model (counted as background): "
                   + ", ".join(doc["unknown_classes"]))


@main.command()
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def steps(store_path, as_json) -> None:
    """List the store's steps: parent, classes, old/new mIoU, deployed."""
    from ciss.store.listing import list_steps

    rows = list_steps(_store(store_path))
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows]))
        return
    if not rows:
        click.echo(f"{store_path}: no steps yet; next: ciss train --data DIR")
        return
    click.echo(table(["step", "parent", "method", "classes", "new", "old mIoU", "new mIoU",
                      "not learned", "deployed"],
                     [[r.step, "-" if r.parent is None else r.parent, r.method, len(r.classes),
                       len(r.new_classes), pct(r.old_miou), pct(r.new_miou),
                       ", ".join(w["name"] for w in r.warnings) or "-",
                       "*" if r.deployed else ""] for r in rows]))


# -- the demo --------------------------------------------------------------------------------
@main.command()
@click.option("--out", type=click.Path(path_type=Path), default="demo-out", show_default=True)
@click.option("--fast", is_flag=True, help="Tiny data and few epochs (a smoke run).")
def demo(out: Path, fast: bool) -> None:
    """The whole story on synthetic data: data, split 15-5, base training, add-classes with mib
    and ft, export, retention gate, deploy, diagnosis, then serving over HTTP."""
    from ciss.demo import run_demo

    run_demo(out, fast=fast, echo=click.echo)


# Commands defined in their own modules register themselves on ``main`` when imported.
from ciss import cli_analysis, cli_deploy, cli_runtime, cli_update  # noqa: E402,F401
