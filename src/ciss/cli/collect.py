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
