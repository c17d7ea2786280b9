"""``ciss demo``."""

from __future__ import annotations

from pathlib import Path

import click

from ciss.cli.base import main


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default="demo-out", show_default=True,
              help="Folder for the demo's data, store, exports and report (rerunnable).")
@click.option("--fast", is_flag=True, help="Tiny data and few epochs (a smoke run).")
def demo(out: Path, fast: bool) -> None:
    """The whole story on synthetic data: data, split 15-5, base training, add-classes with mib
    and ft, export, retention gate, deploy, diagnosis, then serving over HTTP.

    Example: ciss demo --out demo-out
    """
    from ciss.demo import run_demo

    run_demo(out, fast=fast, echo=click.echo)
