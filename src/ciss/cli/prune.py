"""``ciss prune``: strip old steps to their card and retention set to bound the store."""

from __future__ import annotations

import json

import click

from ciss.cli.base import main, open_store, store_option


@main.command()
@store_option
@click.option("--keep-last", type=click.IntRange(min=1), default=3, show_default=True,
              help="The latest steps kept whole.")
@click.option("--keep-rollbacks", type=click.IntRange(min=0), default=3, show_default=True,
              help="Recent distinct steps of the deployment history kept whole (so that many "
                   "'ciss rollback' calls still work).")
@click.option("--dry-run", is_flag=True, help="Say what would go; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def prune(store_path, keep_last, keep_rollbacks, dry_run, yes, as_json) -> None:
    """Delete old steps' weights, engines and memories; keep their cards and retention sets.

    Every later step's gate still scores the retention sets of its whole line, so those stay.
    Always kept whole: the latest --keep-last steps, the deployed step, the last
    --keep-rollbacks rollback targets, any step a running job needs (its lease), and the
    parent of each (its gate's reference). Leftovers of interrupted commands are not steps:
    'ciss store verify --repair' removes them (prune mentions them above 50 MB).
    Example: ciss prune --keep-last 4 --dry-run
    """
    from ciss.store.prune import plan_prune
    from ciss.store.prune import prune as run_prune
    from ciss.store.verify import leftover_note

    store = open_store(store_path)
    note = leftover_note(store)  # prune frees steps; leftovers of killed commands are apart
    if note and not as_json:
        click.echo(note)
    plan = plan_prune(store, keep_last, keep_rollbacks)
    if as_json and (dry_run or not plan.prune):
        click.echo(json.dumps({**plan.to_json(), "done": False}))
        return
    if not as_json:
        for s, why in sorted(plan.keep.items()):
            click.echo(f"step {s}: kept whole ({why})")
        for s in plan.prune:
            click.echo(f"step {s}: {', '.join(plan.artifacts[s])} "
                       f"({plan.bytes[s] / 2**20:.1f} MiB)")
        if not plan.prune:
            click.echo("nothing to prune")
            return
        click.echo(f"{plan.total_bytes / 2**20:.1f} MiB in {len(plan.prune)} step(s)"
                   + (f"; {plan.history_dropped} rollback entr(ies) pointing at them go too"
                      if plan.history_dropped else ""))
        if dry_run:
            click.echo("dry run: nothing changed")
            return
        if not yes:
            click.confirm("delete them?", abort=True)
    done = run_prune(store, plan)
    if as_json:
        click.echo(json.dumps({**done.to_json(), "done": True}))
        return
    left = [s for s in plan.prune if s not in done.prune]
    click.echo(f"pruned step(s) {', '.join(map(str, done.prune)) or '-'}: "
               f"{done.total_bytes / 2**20:.1f} MiB freed"
               + (f"; left whole (deployed or kept since the plan): {left}" if left else ""))
