"""``ciss store verify|accept``: check the store like ``git fsck``; accept a deliberate edit."""

from __future__ import annotations

import json
import sys

import click

from ciss.cli.base import main, open_store, store_option


@main.group("store")
def store_group() -> None:
    """The store's own health: verify every file, repair leftovers, accept edited cards."""


@store_group.command()
@store_option
@click.option("--repair", is_flag=True,
              help="Finish interrupted changes and delete what no command can still need "
                   "(under the store lock; running jobs are left alone).")
@click.option("--discard-work", is_flag=True,
              help="With --repair: also delete the checkpoints of interrupted jobs (they "
                   "are kept by default: rerunning the command resumes from them).")
@click.option("--quick", is_flag=True, help="Skip the artifacts' checksums.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def verify(store_path, repair, discard_work, quick, as_json) -> None:
    """Walk every step, card, manifest, the deploy pointer, the event log, pending changes,
    leases and leftovers; one line per problem with the bytes it holds. Exit 1 while a
    problem is left.

    \b
    Example: ciss store verify            # read-only
             ciss store verify --repair   # then fix what is safe to fix
    """
    from ciss.errors import CissError
    from ciss.store.verify import verify_store

    store = open_store(store_path)
    if not store.root.is_dir():
        raise CissError(f"{store.root}: no store here (--store or CISS_STORE)")
    report = verify_store(store, hashes=not quick, repair=repair, discard_work=discard_work)
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        for p in report.problems:
            click.echo(p.line())
        for k in report.known:  # folders ciss serve --collect writes: known, not orphaned
            click.echo(f"{k['path']}: a 'ciss serve --collect' collection, {k['items']} "
                       f"item(s), {k['bytes'] / 2**20:.1f} MB (see 'ciss collect show "
                       f"{k['path']}')")
        left = report.left
        fixable = [p for p in left if p.repair]
        click.echo(f"{store.root}: {report.steps} step(s), "
                   + ("no problem" if not report.problems else
                      f"{len(report.problems)} problem(s), {len(left)} left")
                   + (f"; run 'ciss store verify --repair' to fix {len(fixable)}"
                      if fixable and not repair else ""))
    if report.left:
        sys.exit(1)


@store_group.command()
@store_option
@click.argument("step", type=int)
def accept(store_path, step) -> None:
    """Accept STEP's card as it is now: after a deliberate hand edit, or to give a step
    written before manifests its first one (signed when CISS_STORE_KEY is set). Recorded in
    the event log.

    Example: ciss store accept 3
    """
    store = open_store(store_path)
    state = store.accept(step)
    was = {"ok": "already matched", "legacy": "had no manifest", "edited": "was edited",
           "pending": "was mid-rewrite", "unsigned": "was not signed",
           "bad-signature": "had a bad signature"}.get(state.status, state.status)
    click.echo(f"step {step}: card accepted ({was}); recorded in {store.root / 'events.json'}")
