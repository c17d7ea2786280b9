"""``ciss diagnose``."""

from __future__ import annotations

from pathlib import Path

import click

from ciss.cli.base import device_option, main, open_store, store_option


@main.command()
@store_option
@click.option("--step", type=int, default=None,
              help="Step to diagnose (default: latest); -1 is the latest, -2 the one before.")
@click.option("--against", type=int, default=None,
              help="Earlier step of its line to compare with (default: its parent).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="A labelled folder (default: the retention sets, partial-label rule).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="New folder for report.html and diagnosis.json.")
@click.option("--max-images", type=int, default=300, show_default=True,
              help="Images used per set.")
@device_option
def diagnose(store_path, step, against, data, out, max_images, device) -> None:
    """Explain why a step forgot: background shift vs new-class bias, stage by stage.

    Example: ciss diagnose --step 2 --out diag-step2
    """
    from ciss.errors import CissError

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CissError(f"{out}: exists and is not empty; choose a new --out folder")
    if max_images < 1:
        raise click.UsageError("--max-images must be at least 1")
    store = open_store(store_path)
    step = store.resolve(step)  # cheap refusals before the heavy imports below
    from ciss.analysis.diagnose import diagnose as run
    from ciss.analysis.report import write_report

    result = run(store, step, against, data, max_images=max_images, device=device)
    html, js = write_report(result, out)
    store.record_event("diagnosed", step=result.step, against=result.against,
                       report=str(html.resolve()), verdict=result.verdict)
    click.echo(result.verdict)
    click.echo(f"report: {html}  numbers: {js}  ({result.images} images, {result.seconds}s)")


@main.command()
@store_option
@click.option("--out", type=click.Path(path_type=Path), default="ciss-report",
              show_default=True, help="Folder for index.html and overview.json.")
def report(store_path, out) -> None:
    """Write the store overview: steps as a timeline, per-class IoU across steps as a heat map,
    deployments (refused and forced ones too) and links to diagnosis reports.

    One self-contained index.html (plots embedded). 'ciss serve' shows the same page at /.

    Example: ciss report --out store-report && open store-report/index.html
    """
    from ciss.analysis.overview import write_overview

    page = write_overview(open_store(store_path), out)
    click.echo(f"wrote {page}")
