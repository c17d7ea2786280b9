"""``ciss evaluate`` and ``ciss steps``."""

from __future__ import annotations

import json

import click

from ciss import hints
from ciss.cli.base import (
    data_option,
    device_option,
    exif_option,
    main,
    open_store,
    pick_step,
    store_option,
)
from ciss.tables import pct, table


@main.command()
@store_option
@data_option(help="Labelled folder; its val split is used when it names one.")
@click.option("--step", type=int, default=None,
              help="Step number (default: the deployed step; the latest when none is); "
                   "-1 is the latest, -2 the one before.")
@click.option("--engine", type=click.Choice(["torch", "onnx", "int8", "tensorrt"]),
              default=None,
              help="Engine (default: the deployed one for the deployed step, else torch); "
                   "exported first when the step lacks it.")
@device_option
@exif_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def evaluate(store_path, data_dir, step, engine, device, exif, as_json) -> None:
    """Score a step on a labelled folder (classes matched by name).

    Example: ciss evaluate --data data/synthetic --json
    """
    store = open_store(store_path)
    step, engine, which = pick_step(store, step, engine)
    engine = engine or "torch"
    from ciss.analysis.evaluate import evaluate_step
    from ciss.runtime.deploy import ensure_engine

    ensure_engine(store, step, engine)
    ev = evaluate_step(store, data_dir, step=step, engine=engine, device=device, exif=exif)
    doc = ev.to_json()
    if as_json:
        click.echo(json.dumps(doc))
        return
    old, new = ev.group_ids()
    group = {i: "old" for i in old} | {i: "new" for i in new}
    rows = [[name, group.get(i, "bg" if i == 0 else ""), pct(v)]
            for i, (name, v) in enumerate(doc["per_class_iou"].items())]
    click.echo(table(["class", "group", "IoU %"], rows))
    click.echo(f"{which} on {ev.images} images (engine {engine}, device {device}): "
               f"mIoU {pct(doc['miou'])}, "
               f"old {pct(doc['old_miou'])}, new {pct(doc['new_miou'])}")
    if doc["unknown_classes"]:
        click.echo("classes unknown to the model (counted as background): "
                   + ", ".join(doc["unknown_classes"]))


@main.command()
@store_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def steps(store_path, as_json) -> None:
    """List the store's steps: parent, classes, old/new mIoU, deployed.

    Example: ciss steps --json
    """
    from ciss.store.listing import list_steps
    from ciss.store.verify import leftover_note

    store = open_store(store_path)
    rows = list_steps(store)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in rows]))
        return
    if not rows:
        click.echo(f"{store_path}: no steps yet; {hints.NO_STEPS()}")
        return
    click.echo(table(["step", "parent", "method", "classes", "new", "old mIoU", "new mIoU",
                      "not learned", "state"],
                     [[r.step, "-" if r.parent is None else r.parent, r.method,
                       len(r.classes) - 1,  # object classes, as train and report count them
                       len(r.new_classes), pct(r.old_miou), pct(r.new_miou),
                       ", ".join(w["name"] for w in r.warnings) or "-",
                       ("CARD EDITED " if r.card_state in ("edited", "bad-signature")
                        else "") + ("deployed" if r.deployed else
                                    ("pruned" if r.pruned else ""))]
                      for r in rows]))
    note = leftover_note(store)
    if note:
        click.echo(note, err=True)
