"""``ciss train``: step 0 from a labelled folder."""

from __future__ import annotations

import click

from ciss.cli.base import (
    data_option,
    echo_warnings,
    loop_options,
    main,
    open_store,
    parse_scale,
    store_option,
)
from ciss.tables import pct


@main.command()
@store_option
@data_option()
@click.option("--arch", default="tiny", show_default=True, help="An ARCHS name.")
@click.option("--weights", type=click.Choice(["imagenet"]), default=None,
              help="Pretrained backbone (downloads once; default: random init).")
@click.option("--loss", type=click.Choice(["ce", "wce", "ce+dice", "ohem"]), default=None,
              help="ce, wce (classes weighted by pixel share), ce+dice or ohem "
                   "(default: the recipe's).")
@loop_options
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
    report = train_base(open_store(store_path), data_dir, arch=arch, weights=weights, loop=loop,
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
