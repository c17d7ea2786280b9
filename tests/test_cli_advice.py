"""Every message a next step that runs: each option any advice names exists on the command it
is meant for (click's own tables say so), and advice lives in ``ciss.hints`` only."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from ciss.cli import main
from ciss.hints import HINTS, Hint

SRC = Path(__file__).resolve().parents[1] / "src" / "ciss"
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# "ciss <words>": a command to run ('pip install ciss[gpu]' is not one)
COMMAND = re.compile(r"(?<![\w\[])ciss((?: [a-z][a-z-]*)+)")


def command(path: str) -> click.Command:
    cmd: click.Command = main
    for word in path.split():
        assert isinstance(cmd, click.Group) and word in cmd.commands, f"no command '{path}'"
        cmd = cmd.commands[word]
    return cmd


def options(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in p.opts}


def resolve(words: str) -> tuple[str, click.Command]:
    """The longest command path at the start of ``words`` (the rest is arguments)."""
    cmd: click.Command = main
    path = []
    for word in words.split():
        if not isinstance(cmd, click.Group) or word not in cmd.commands:
            break
        cmd = cmd.commands[word]
        path.append(word)
    assert path, f"'ciss{words}' names no command"
    return " ".join(path), cmd


def named_options(hint: Hint) -> list[tuple[str, str]]:
    """(command path, option) for every option the hint names."""
    text = hint.text
    parts = list(COMMAND.finditer(text))
    out = []
    lead = text[: parts[0].start()] if parts else text
    for o in OPTION.findall(lead):  # bare options belong to the commands that print them
        out += [(p, o) for p in hint.printed_by]
    for i, m in enumerate(parts):
        end = parts[i + 1].start() if i + 1 < len(parts) else len(text)
        path, _ = resolve(m.group(1))
        out += [(path, o) for o in OPTION.findall(text[m.start(): end])]
    return out


@pytest.mark.parametrize("name", sorted(HINTS))
def test_every_option_a_hint_names_exists_on_its_command(name):
    hint = HINTS[name]
    assert hint.printed_by, name
    for path in hint.printed_by:
        command(path)  # the commands that print it exist
    for path, opt in named_options(hint):
        assert opt in options(command(path)), f"{name}: 'ciss {path}' has no {opt}"


@pytest.mark.parametrize("name", sorted(HINTS))
def test_commands_a_hint_says_to_run_get_their_required_options(name):
    text = HINTS[name].text
    parts = list(COMMAND.finditer(text))
    for i, m in enumerate(parts):
        end = parts[i + 1].start() if i + 1 < len(parts) else len(text)
        path, cmd = resolve(m.group(1))
        named = set(OPTION.findall(text[m.start(): end]))
        for p in cmd.params:
            if isinstance(p, click.Option) and p.required:
                assert set(p.opts) & named, f"{name}: 'ciss {path}' needs {p.opts[0]}"


def test_the_walker_catches_an_option_a_command_lacks():
    bad = Hint("retry with --loss wce", ("add-classes",))  # what add-classes used to say
    assert ("add-classes", "--loss") in named_options(bad)
    assert "--loss" not in options(command("add-classes"))
    run = Hint("next: ciss serve --accept-forced   or   ciss diagnose --step 2", ("deploy",))
    assert named_options(run) == [("serve", "--accept-forced"), ("diagnose", "--step")]


def test_next_lines_come_from_hints_only():
    """A ``next:`` written inline would escape the walk above."""
    stray = []
    for path in SRC.rglob("*.py"):
        if path.name == "hints.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"""["']next: ciss""", line):
                stray.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not stray, "\n".join(stray)


def test_every_option_has_help_and_every_command_an_example():
    """#30: options without help (--out, --batch-size, --seed, --port, ...) and commands
    without an example (rollback, steps, demo)."""
    import click

    from ciss.cli import main as root

    ctx = click.Context(root)
    bare, no_example = [], []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), [*path, name])
            return
        if "Example" not in (cmd.help or ""):
            no_example.append(" ".join(path))
        bare.extend(f"{' '.join(path)} {p.opts[0]}" for p in cmd.params
                    if isinstance(p, click.Option) and not p.help and p.name != "help")

    walk(root, [])
    assert not bare, bare
    assert not no_example, no_example


def test_a_negative_step_is_documented_wherever_a_step_is_chosen(tmp_path):
    """#30: '--step -1' silently meant the latest; every --step that picks one says so, and the
    store counts back from the latest exactly that way."""
    import click

    from ciss.cli import main as root
    from ciss.errors import CissError
    from ciss.store import Store

    ctx = click.Context(root)
    undocumented = []

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                walk(cmd.get_command(ctx, name), [*path, name])
            return
        for p in cmd.params:
            if (isinstance(p, click.Option) and p.opts[0] == "--step"
                    and isinstance(p.type, click.types.IntParamType) and not p.multiple
                    and "latest" in (p.help or "") and "-1 is the latest" not in p.help):
                undocumented.append(" ".join(path))

    walk(root, [])
    assert not undocumented, undocumented
    store = Store(tmp_path / "s")
    store.steps = lambda: [0, 1, 3]  # the listing is all resolve reads
    assert (store.resolve(-1), store.resolve(-2), store.resolve(None)) == (3, 1, 3)
    with pytest.raises(CissError, match="step -1 is not in|not in"):
        store.resolve(-4)


def test_the_command_list_is_in_workflow_order_with_whole_one_liners():
    """#30: the list was alphabetical and its descriptions cut with '...'."""
    from click.testing import CliRunner

    from ciss.cli import main as root

    out = CliRunner().invoke(root, ["--help"]).output
    listed = [ln.split()[0] for ln in out.split("Commands:")[1].splitlines()
              if ln.startswith("  ") and not ln.startswith("   ")]
    first = ["demo", "data", "train", "import", "add-classes"]
    assert listed[:5] == first and listed.index("check") < listed.index("deploy")
    assert "..." not in out.split("Commands:")[1]
