"""``ciss memory show|clear``: the replay memories kept beside steps (``--memory N``)."""

from __future__ import annotations

import json

import click

from ciss.cli.base import main, open_store, store_option


@main.group()
def memory() -> None:
    """The opt-in replay memory: what each step keeps, and deleting it."""


@memory.command()
@store_option
@click.option("--step", type=int, default=None, help="One step (default: every step).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def show(store_path, step, as_json) -> None:
    """Images kept per step and per class, the budget, and where they came from.

    Example: ciss memory show
    """
    from ciss.store.prune import disk_bytes
    from ciss.store.store import digest
    from ciss.updater.memory import MEMORY

    store = open_store(store_path)
    steps = [store.resolve(step)] if step is not None else store.steps()
    out = {}
    for s in steps:
        card = store.card(s)
        if not card.memory:
            continue
        path = store.step_dir(s) / MEMORY
        recorded = MEMORY in card.artifacts  # not after 'memory clear'
        present = recorded and path.is_dir()
        size = disk_bytes(path) if present else 0
        out[str(s)] = {**card.memory, "bytes": size, "path": str(path) if size else None,
                       "checksum_ok": (present and digest(path) == card.artifacts[MEMORY])
                       if recorded else None}
    if as_json:
        click.echo(json.dumps(out))
        return
    if not out:
        click.echo(f"{store.root}: no step keeps a memory (opt in with --memory N on "
                   "'ciss train' or 'ciss add-classes')")
        return
    for s, m in out.items():
        if m.get("cleared"):
            click.echo(f"step {s}: cleared (was a budget of {m['max_images']} images)")
            continue
        state = "checksum ok" if m["checksum_ok"] else "CHECKSUM MISMATCH: modified after writing"
        click.echo(f"step {s}: {m['images']} images of at most {m['max_images']} "
                   f"({m['kept_from_parent']} kept from the parent's memory, "
                   f"{m['from_this_step']} from this step's data), {m['bytes'] / 2**20:.1f} MiB, "
                   f"{state}\n  {m['path']}\n  per class: "
                   + ", ".join(f"{k} {v}" for k, v in m["per_class"].items())
                   + f"\n  chosen: {m['how']}")


@memory.command()
@store_option
@click.option("--step", type=int, default=None, help="One step's memory.")
@click.option("--all", "every", is_flag=True, help="Every step's memory.")
@click.option("--yes", is_flag=True, help="Do not ask.")
def clear(store_path, step, every, yes) -> None:
    """Delete stored memories (the images and masks; the card keeps a line saying so).

    The next add-classes from a cleared step replays nothing and keeps a new memory only if
    asked (--memory N). Example: ciss memory clear --all --yes
    """
    from ciss.errors import CissError
    from ciss.updater.memory import MEMORY, clear_memory

    if (step is None) == (not every):
        raise CissError("memory clear: give --step N or --all")
    store = open_store(store_path)
    steps = store.steps() if every else [store.resolve(step)]
    with store.lock():  # finishes a clear a kill interrupted: its images go now
        held = [s for s in steps if MEMORY in store.card(s).artifacts]
    if not held:
        click.echo("no memory to clear")
        return
    if not yes:
        click.confirm(f"delete the memory of step(s) {', '.join(map(str, held))}?", abort=True)
    for s in held:
        clear_memory(store, s)
        click.echo(f"step {s}: memory cleared")
