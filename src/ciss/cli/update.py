"""``ciss add-classes`` and ``ciss benchmark`` (registered on the main group)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ciss import hints
from ciss.cli.base import (
    data_option,
    device_option,
    echo_memory,
    echo_warnings,
    loop_options,
    main,
    memory_option,
    open_store,
    parse_scale,
    store_option,
)
from ciss.store.listing import before_after_table
from ciss.updater.method_table import BENCHMARK_METHODS, METHODS


@main.command("add-classes")
@store_option
@data_option(help="Folder labelled only for the new classes (everything else background).")
@click.option("--from", "parent", type=int, default=None, help="Parent step (default: latest).")
@click.option("--method", type=click.Choice(list(METHODS)), default="mib", show_default=True,
              help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + ".")
@click.option("--pseudo", is_flag=True,
              help="mib: background pixels the parent is confident about take its label.")
@click.option("--new-dice", is_flag=True,
              help="mib: add a soft Dice over the new classes, for small new objects (more "
                   "new-class IoU for some old-class IoU; BENCHMARKS.md §2).")
@click.option("--freeze", default=None,
              help="Last frozen stage, or 'none' (default: the model family's; tiny: stem, "
                   "torchvision, SMP and SegFormer: stage3; see 'ciss recipes').")
@click.option("--init", type=click.Choice(["mib", "background", "random"]), default=None,
              help="New classifier rows (default: the method's; random, measured best for "
                   "mib, BENCHMARKS.md §2; plop: mib, as PLOP's code).")
@click.option("--kd-weight", type=float, default=None,
              help="Distillation weight (default: " + ", ".join(
                  f"{m.name} {m.kd_weight:g}" for m in METHODS.values() if m.kd_weight) + ").")
@click.option("--alpha", type=float, default=1.0, show_default=True,
              help="Teacher sharpening in distillation.")
@click.option("--cache-trunk-mb", type=click.IntRange(min=0), default=1024, show_default=True,
              help="Memory for caching the frozen trunk's outputs and the parent's logits per "
                   "training input (flip-only augmentation); 0 = off.")
@click.option("--bn-stats", type=click.Choice(["update", "frozen"]), default=None,
              help="BatchNorm running statistics of the trainable stages: keep the parent's "
                   "(frozen, the default: old classes drift less, BENCHMARKS.md §2) or follow "
                   "the new-class data (update). LayerNorm keeps no statistics: on SegFormer "
                   "and SMP's mit encoders only the decoder's BatchNorm is concerned.")
@click.option("--val", "val_dir", type=click.Path(path_type=Path), default=None,
              help="A fully labelled folder to score as well.")
@click.option("--fuse", is_flag=True,
              help="After training, average the weights with the parent's, the new ones "
                   "weighted sqrt(new / (new + old classes)) (EWF, CVPR 2023). Measured on "
                   "tiny 15-1: old classes 0.98x the base but new ones 0.11x joint's "
                   "(BENCHMARKS.md §11c); off by default.")
@click.option("--pretune", type=float, default=None, metavar="SHARE",
              help="Spend SHARE (0-1) of the step's budget first on NeST's classifier "
                   "pre-tuning (ECCV 2024): new rows generated from the old ones, every "
                   "other weight frozen. Default: the family's share for mib ('ciss "
                   "recipes': tiny 1/3, families trained elsewhere none); 0 = off. Measured "
                   "on tiny 10-1: new classes 0.60x joint's instead of 0.52x, a step 1.23x "
                   "mib's time (BENCHMARKS.md §11j). Not for dkd (sigmoid form).")
@click.option("--new-class-ok", "new_class_ok", multiple=True, metavar="NAME",
              help="Take the folder's class NAME as a new class although its name is one or "
                   "two letters from a known class's (without it, such a name is refused as a "
                   "likely typo). Names equal but for case, spaces, '-' and '_' are always "
                   "the known class. Repeatable.")
@memory_option(step=True)
@loop_options
def add_classes_cmd(store_path, data_dir, quiet, **options) -> None:
    """Learn the folder's new classes on top of a stored step without forgetting the old.

    Runs unchanged under torchrun (DDP; --batch-size is per process; rank 0 writes).

    Example: ciss add-classes --data data/15-5/step-1
    """
    from ciss.updater.add_classes import add_classes
    from ciss.updater.config import StepOptions, resolve_step

    store = open_store(store_path)
    # every option in one object, merged with the parent's family recipe once
    config = resolve_step("add-classes", StepOptions.of(
        {**options, "scale": parse_scale(options["scale"], None)}), store)
    report = add_classes(store, data_dir, config=config, progress=not quiet,
                         warn=lambda line: click.echo(line, err=True))
    if report.rank != 0:  # under torchrun only rank 0 reports
        return
    if report.written_before:
        click.echo(report.nothing_to_do())
        return
    click.echo(before_after_table(store, report.step))
    card = report.card
    click.echo(f"step {report.step} ({card.method}, parent {card.parent}): "
               f"+{len(card.new_classes)} classes ({', '.join(card.new_classes)}), frozen up to "
               f"{card.frozen[-1] if card.frozen else 'none'}, {report.fit.seconds:.0f}s training"
               + (f" + {card.timings['pretune_s']:.0f}s pre-tuning the classifier"
                  if card.extra.get("pretune") else ""))
    echo_warnings(report.warnings)
    echo_memory(card)
    click.echo(hints.AFTER_STEP(step=report.step))


@main.command()
@data_option(help="Fully labelled source folder (synthetic or VOC).")
@click.option("--scenario", required=True, help="X-Y, e.g. 15-5, 15-1.")
@click.option("--setting", type=click.Choice(["overlap", "disjoint"]), default="overlap",
              show_default=True,
              help="overlap: a step's images may show future classes (as background); "
                   "disjoint: they show only classes seen so far (the literature's two).")
@click.option("--methods", default="ft,mib", show_default=True,
              help=f"Comma list of {', '.join(BENCHMARK_METHODS)}; NAME+memory runs a method "
                   "with the replay memory (--memory), NAME+fuse with EWF's fusion (--fuse), "
                   "NAME+pretune / NAME+nopretune with NeST's classifier pre-tuning on / off "
                   "(--pretune).")
@click.option("--memory", type=click.IntRange(min=1), default=100, show_default=True,
              help="Images the +memory methods keep (the literature's VOC budget: 100).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of every training run in the benchmark.")
@click.option("--arch", default="tiny", show_default=True,
              help="Model trained for the base step (see 'ciss recipes').")
@click.option("--weights", default=None,
              help="The base step's and joint training's initial weights, as 'ciss train "
                   "--weights' ('imagenet' or an encoder state-dict file; default: random).")
@click.option("--base-epochs", type=click.IntRange(min=1), default=None,
              help="Passes over the base step's data (default: the recipe's iterations).")
@click.option("--step-epochs", type=click.IntRange(min=1), default=None,
              help="Passes over each later step's data (default: the recipe's iterations).")
@click.option("--control", is_flag=True,
              help="Also run ft with old-class pixels ignored (no background shift).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="New folder for the stores, the table and the curves.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@device_option
def benchmark(data_dir, scenario, setting, methods, memory, seed, arch, weights, base_epochs,
              step_epochs, control, out, as_json, quiet, device) -> None:
    """Run a CiSS scenario end to end for several methods; print the literature's table.

    Example: ciss benchmark --data data/synthetic --scenario 15-5 --methods ft,lwf,ilt,mib
    """
    from ciss.benchmark import BenchmarkConfig, run_benchmark

    cfg = BenchmarkConfig(scenario=scenario, setting=setting,
                          methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                          arch=arch, weights=weights, base_epochs=base_epochs,
                          step_epochs=step_epochs,
                          control=control, device=device, memory=memory, seed=seed)
    result = run_benchmark(data_dir, out, cfg, progress=not (quiet or as_json),
                           echo=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    click.echo(result.markdown())
    click.echo(f"wrote {out / 'results.html'}, {out / 'results.json'}, {out / 'results.csv'}, "
               f"{out / 'results.md'}, {out / 'curves.png'}")
