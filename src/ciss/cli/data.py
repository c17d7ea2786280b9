"""``ciss data``: make and split dataset folders."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ciss import hints
from ciss.cli.base import data_option, exif_option, main
from ciss.tables import table


@main.group()
def data() -> None:
    """Make and split dataset folders."""


@data.command("synthetic")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="New folder for the dataset (images/, masks/, classes.txt, split lists).")
@click.option("--size", type=click.IntRange(min=32), default=64, show_default=True,
              help="Image side in pixels.")
@click.option("--train", "n_train", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Training images.")
@click.option("--val", "n_val", type=click.IntRange(min=1), default=300, show_default=True,
              help="Validation images.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the generated world (another seed: other images, same classes).")
def data_synthetic(out: Path, size: int, n_train: int, n_val: int, seed: int) -> None:
    """Write the embedded synthetic dataset (20 classes, full labels, train/val lists).

    Example: ciss data synthetic --out data/synthetic
    """
    from ciss.data.synthetic import SyntheticConfig, write_synthetic

    write_synthetic(out, SyntheticConfig(size=size, n_train=n_train, n_val=n_val, seed=seed))
    click.echo(f"wrote {n_train} train + {n_val} val images ({size}x{size}, 20 classes) to "
               f"{out}\n{hints.DATA_SYNTHETIC(out=out)}")


@data.command("split")
@data_option()
@click.option("--scenario", required=True, help="X-Y, e.g. 19-1, 15-5, 15-1, 10-1, 5-3.")
@click.option("--setting", type=click.Choice(["overlap", "disjoint"]), default="overlap",
              show_default=True,
              help="overlap: a step's images may show future classes (as background); "
                   "disjoint: they show only classes seen so far (the literature's two).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="New folder for the step folders (step-0/, step-1/, ...).")
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
    click.echo(hints.DATA_SPLIT(step0=steps[0]))


def _folder(positional: Path | None, data_dir: Path | None) -> Path:
    """The folder given as ``--data DIR`` or, as before, as the bare argument."""
    from ciss.errors import CissError

    if positional is not None and data_dir is not None and positional != data_dir:
        raise CissError(f"two folders: {positional} and --data {data_dir}; give one")
    folder = data_dir or positional
    if folder is None:
        raise click.UsageError("give the folder: --data DIR")
    return folder


@data.command("check")
@click.argument("folder", type=click.Path(path_type=Path), required=False)
@data_option(required=False, help="The dataset folder (any supported layout); the bare "
                                  "folder as argument works too.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@exif_option
@click.option("--store", "store_path", type=click.Path(path_type=Path), envvar="CISS_STORE",
              default="ciss-store", show_default=True,
              help="Model store (env CISS_STORE) whose latest step's classes the folder's class "
                   "names are matched against, as add-classes will; skipped when the default "
                   "store does not exist.")
@click.option("--new-class-ok", "new_class_ok", multiple=True, metavar="NAME",
              help="Take the folder's class NAME as a new class although its name is one or "
                   "two letters from a known class's (as add-classes --new-class-ok). "
                   "Repeatable.")
def data_check(folder: Path | None, data_dir: Path | None, as_json: bool, exif,
               store_path: Path, new_class_ok: tuple[str, ...]) -> None:
    """Read a dataset folder without training: the layout found (ciss, VOC, COCO, CVAT,
    Roboflow, Cityscapes), classes, images per split, pixel share per class and every problem
    (identical problems of many files on one line). With a store, its class names are matched
    against the store's as add-classes will match them (a name equal but for case, spaces, '-'
    and '_' is the known class; a near miss is a problem). Exits 1 when there is a problem.

    Example: ciss data check --data exports/cvat-task-12
    """
    import sys
    from dataclasses import asdict

    from ciss.data.inspect import check_folder

    folder = _folder(folder, data_dir)
    known = _known_classes(store_path)  # before reading images: a wrong --store says so at once
    report = check_folder(folder, exif)
    notes = _match_store(report, known, new_class_ok, folder)
    if as_json:
        click.echo(json.dumps(asdict(report)))
        for line in notes:
            click.echo(line, err=True)
    else:
        if report.layout:
            click.echo(f"{folder}: {report.layout} layout, "
                       f"{sum(n != 'background' for n in report.classes)} classes + background, "
                       f"{report.split['train']} train + {report.split['val']} val images")
            for line in notes:
                click.echo(line)
            click.echo(table(["class", "images", "pixels %"],
                             [[n, report.images_with[n], f"{100 * report.pixel_share[n]:.2f}"]
                              for n in report.classes]))
        for p in report.problems:
            click.echo(f"problem: {p}")
        click.echo(f"{len(report.problems)} problem(s)" if report.problems else
                   hints.DATA_OK(folder=folder))
    if report.problems:
        sys.exit(1)


def _known_classes(store_path: Path) -> list[str] | None:
    """The latest step's classes of the store at ``store_path``; None when there is no step
    there. A store named on the command line must exist; the default may be absent (a folder
    is often checked before any training), and nothing is created either way."""
    from ciss.cli.base import open_store

    source = click.get_current_context().get_parameter_source("store_path")
    if source == click.core.ParameterSource.DEFAULT and not Path(store_path).is_dir():
        return None
    store = open_store(store_path)
    latest = store.latest()
    return None if latest is None else list(store.card(latest, verify=False).classes)


def _match_store(report, known: list[str] | None, new_ok: tuple[str, ...],
                 folder: Path) -> list[str]:
    """Match the folder's class names to ``known`` as add-classes will: a near miss becomes a
    problem of ``report``; returns one line per folder name taken as a known class."""
    from ciss.data.classes import BACKGROUND, match_names
    from ciss.errors import CissError

    if not known or not report.layout:
        return []
    try:
        match = match_names([n for n in report.classes if n != BACKGROUND], known,
                            new_ok=new_ok, where=str(folder))
    except CissError as exc:
        report.problems.append(str(exc))
        return []
    return match.notes()


@data.command("convert")
@click.argument("folder", type=click.Path(path_type=Path), required=False)
@data_option(required=False, help="The folder to convert (any supported layout); the bare "
                                  "folder as argument works too.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="New folder for the ciss-layout copy.")
@exif_option
def data_convert(folder: Path | None, data_dir: Path | None, out: Path, exif) -> None:
    """Write any supported layout (VOC, COCO, CVAT, Roboflow, Cityscapes) in the ciss layout:
    classes.txt, images/, index masks/, train.txt, val.txt.

    Example: ciss data convert --data exports/coco --out data/new-classes
    """
    from ciss.data.inspect import convert_folder

    dest = convert_folder(_folder(folder, data_dir), out, exif)
    click.echo(f"wrote {dest}\n{hints.DATA_CONVERTED(dest=dest)}")
