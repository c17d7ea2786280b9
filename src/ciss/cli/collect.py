"""``ciss collect show``: what ``ciss serve --collect DIR`` kept (docs/production-loop.md)."""

from __future__ import annotations

import json

import click

from ciss.cli.base import main


@main.group()
def collect() -> None:
    """Images kept from live traffic by 'ciss serve --collect DIR'."""


def _bar(count: int, most: int, width: int = 30) -> str:
    return "#" * (round(width * count / most) if most else 0)


@collect.command()
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def show(folder, as_json) -> None:
    """Counts by reason and step, the predicted classes, and score histograms.

    Example: ciss collect show collected/
    """
    from ciss.data.collection import summarise

    doc = summarise(folder)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    span = f", {doc['first']} .. {doc['last']}" if doc["items"] else ""
    click.echo(f"{doc['folder']}: {doc['items']} image(s), {doc['bytes'] / 1e6:.1f} MB{span}")
    click.echo("reasons: " + (", ".join(f"{k} {v}" for k, v in sorted(doc["reasons"].items()))
                              or "none"))
    click.echo("served by step: " + (", ".join(f"{k}: {v}" for k, v in doc["steps"].items())
                                     or "none"))
    if doc["predicted_classes"]:
        click.echo("images per predicted class (>= 1 % of the image): " + ", ".join(
            f"{k} {v}" for k, v in list(doc["predicted_classes"].items())[:12]))
    for name, h in doc["histograms"].items():
        if not sum(h["counts"]):
            continue
        click.echo(f"{name}:")
        most = max(h["counts"])
        for lo, hi, c in zip(h["edges"], h["edges"][1:], h["counts"]):
            click.echo(f"  {lo:6.2f} - {hi:6.2f} {c:5d} {_bar(c, most)}")
    for line in doc["unreadable"]:
        click.echo(f"warning: unreadable item {line}", err=True)


@collect.command("export")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--budget", type=click.IntRange(min=1), required=True,
              help="How many images to hand to the annotators.")
@click.option("--format", "fmt", type=click.Choice(["label-studio", "cvat", "coco"]),
              required=True, help="The annotation tool's import format.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="New folder to write the tasks into (written whole or not at all).")
@click.option("--new-class", "new_classes", multiple=True,
              help="A class the annotators will paint (repeatable); added to the label set "
                   "beside the served step's classes.")
@click.option("--rule", type=click.Choice(["balanced", "score", "random"]),
              default="balanced", show_default=True,
              help="How images are picked: balanced (unusual first, spread over what the "
                   "model sees, no one predicted class twice before the others), score "
                   "(unusual first) or random (a seeded baseline).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --rule random.")
@click.option("--url-prefix", default="/data/local-files/?d=images/", show_default=True,
              help="Label Studio: the image URL prefix (local files served from OUT/).")
@click.option("--store", "store_path", type=click.Path(file_okay=False), default=None,
              envvar="CISS_STORE",
              help="Record the export in this store's event log (when it exists).")
def export_cmd(folder, budget, fmt, out, new_classes, rule, seed, url_prefix,
               store_path) -> None:
    """Pick images from a collection and write them as pre-labelled annotation tasks.

    The served step's predictions go in as pre-annotations (read-only in Label Studio); the
    --new-class names join the label set. After annotating, export from the tool and run
    'ciss add-classes --data EXPORT/'.

    Example: ciss collect export collected/ --budget 50 --format label-studio --new-class
    forklift --out tasks/
    """
    from pathlib import Path

    from ciss.data.collection import is_collection, items, read_meta
    from ciss.data.select import select
    from ciss.data.tasks import load_tasks, write_tasks
    from ciss.errors import CissError

    if not is_collection(Path(folder)):
        raise CissError(f"{folder}: not a collection; 'ciss serve --collect {folder}' makes one")
    held = items(Path(folder))
    if not held:
        raise CissError(f"{folder}: the collection holds no image yet")
    metas = []
    for p in held:
        try:
            metas.append(read_meta(p))
        except (OSError, ValueError) as exc:
            raise CissError(f"{p / 'meta.json'}: unreadable ({exc})") from exc
    picks = select(metas, budget, rule, seed)
    result = write_tasks(Path(out), load_tasks([held[i] for i in picks]), fmt,
                         list(new_classes), url_prefix)
    click.echo(f"wrote {result.tasks} task(s) of {len(held)} held ({rule}) as {fmt} into "
               f"{result.out}: {', '.join(result.files)}")
    click.echo(f"labels: {', '.join(result.labels)}" + (
        "" if new_classes else " (no --new-class: annotators can only correct old classes)"))
    _record_export(store_path, folder, result, rule, [metas[i]["id"] for i in picks])
    from ciss import hints

    hint = {"label-studio": hints.EXPORTED_LABEL_STUDIO, "cvat": hints.EXPORTED_CVAT,
            "coco": hints.EXPORTED_COCO}[fmt]
    click.echo(hint(out=result.out))


def _record_export(store_path, folder, result, rule: str, ids: list[str]) -> None:
    """The export is one hop of the loop: an event in the store's log, when a store is
    there (never created here)."""
    from pathlib import Path

    from ciss.store import Store

    root = Path(store_path or "ciss-store")
    if not (root / "steps").is_dir():
        return
    try:
        Store(root).record_event("exported", by="ciss collect export",
                                 folder=str(Path(folder).resolve()),
                                 out=str(result.out.resolve()), format=result.format,
                                 rule=rule, tasks=result.tasks, labels=result.labels,
                                 ids=ids)
    except OSError as exc:
        click.echo(f"warning: the export is not in {root}'s event log ({exc})", err=True)
