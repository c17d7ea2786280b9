"""The docs a user reads: the site builds with ``mkdocs build --strict`` (a broken link, a missing
page or anchor fails), the README stays short, and every ``ciss <command> --option`` written in
the README or a docs page exists on that command (click's own tables say so)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest

from ciss.cli import main

ROOT = Path(__file__).resolve().parents[1]
README_MAX_WORDS = 1200
FENCE = re.compile(r"^ *```[^\n]*\n(.*?)^ *```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# a command ends at a shell operator; its options are only the words before it
STOP = {"|", "||", "&&", ";", ">", ">>", "<", "&", "2>", "2>&1"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "BENCHMARKS.md"]


def words(line: str) -> list[str]:
    try:
        lex = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
        lex.whitespace_split = True
        lex.commenters = "#"
        return list(lex)
    except ValueError:  # an apostrophe in prose: plain words are good enough
        return line.split("#", 1)[0].split()


def command_lines(text: str) -> list[str]:
    """Every shell line of the fenced blocks (continuations joined) and every inline code span
    that starts with ``ciss `` or with a command and an option (`check --step 1`)."""
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    for span in INLINE.findall(text):
        first, _, rest = span.partition(" ")
        if first == "ciss":
            lines.append(span)
        elif first in main.commands and rest.startswith("--"):
            lines.append("ciss " + span)  # `deploy --force`: an option of that command
    return lines


def invocations(line: str) -> list[tuple[list[str], list[tuple[str, str]]]]:
    """(command path, [(option, the word after it)]) for each ``ciss`` (or ``-m ciss``) in one
    line."""
    toks = [t.strip("[]") for t in words(line)]
    out = []
    for i, tok in enumerate(toks):
        if tok != "ciss":
            continue
        cmd: click.Command = main
        path: list[str] = []
        j = i + 1
        while isinstance(cmd, click.Group) and j < len(toks) and toks[j] in cmd.commands:
            cmd = cmd.commands[toks[j]]
            path.append(toks[j])
            j += 1
        opts = []
        rest = toks[j:]
        for k, t in enumerate(rest):
            if t in STOP or t == "ciss":
                break
            if t.startswith("--") and len(t) > 2:
                name, eq, value = t.partition("=")
                if not eq:
                    value = rest[k + 1] if k + 1 < len(rest) else ""
                    value = "" if value in STOP or value.startswith("-") else value
                opts.append((name, value))
        nxt = toks[j] if j < len(toks) else ""
        at_start = i == 0 or toks[i - 1] in STOP or toks[i - 1] in ("-m", "$")
        if isinstance(cmd, click.Group) and re.fullmatch(r"[a-z][a-z-]+", nxt):
            if not at_start:
                continue  # "ciss wrote it": prose or output, not a command
            path.append(nxt)  # an unknown subcommand: reported as such
        out.append((path, opts))
    return out


def check_invocation(path: list[str], opts: list[tuple[str, str]]) -> str | None:
    """Why the command, an option or a literal choice value does not exist, or None."""
    cmd: click.Command = main
    for word in path:
        if not isinstance(cmd, click.Group) or word not in cmd.commands:
            return f"no command 'ciss {' '.join(path)}'"
        cmd = cmd.commands[word]
    params = {o: p for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    bad = [o for o, _ in opts if o not in params and o != "--help"]
    if bad:
        return f"'ciss {' '.join(path)}' has no option {', '.join(bad)}"
    for o, value in opts:
        p = params.get(o)
        # a literal value of a choice (placeholders such as NAME or DIR are upper case)
        if (p is not None and isinstance(p.type, click.Choice) and not getattr(p, "is_flag", 0)
                and re.fullmatch(r"[a-z0-9][a-z0-9_.+-]*", value)
                and value not in p.type.choices):
            return f"'ciss {' '.join(path)} {o}' takes {'|'.join(p.type.choices)}, not {value}"
    return None


def test_every_documented_option_exists():
    problems, seen = [], 0
    for f in doc_files():
        for line in command_lines(f.read_text()):
            for path, opts in invocations(line):
                seen += 1
                why = check_invocation(path, opts)
                if why:
                    problems.append(f"{f.relative_to(ROOT)}: {why}: {line.strip()}")
    assert seen > 30, "the scan found almost no ciss commands: the parser broke"
    assert not problems, "\n".join(problems)


def test_the_option_check_catches_a_wrong_option():
    # the README once named --parent where add-classes takes --from
    (path, opts), = invocations("ciss add-classes --data new/ --parent 2  # a comment --x")
    assert path == ["add-classes"] and opts == [("--data", "new/"), ("--parent", "2")]
    assert "no option --parent" in check_invocation(path, opts)
    (path, opts), = invocations("ciss data chek DIR")
    assert "no command 'ciss data chek'" in check_invocation(path, opts)
    (path, opts), = invocations("torchrun --nproc_per_node=2 -m ciss train --data d | tee --x")
    assert path == ["train"] and check_invocation(path, opts) is None
    (path, opts), = invocations("ciss check --engine onxx --step N")
    assert "takes torch|onnx" in check_invocation(path, opts)
    (path, opts), = invocations("ciss add-classes --method=NAME --exif ignore")
    assert check_invocation(path, opts) is None


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().split())
    assert n <= README_MAX_WORDS, f"README.md has {n} words (at most {README_MAX_WORDS})"


def test_readme_links_resolve():
    # mkdocs checks the site; the README lives outside it, so its relative links are checked here
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}: not in the repo"


def test_site_builds_strict(tmp_path):
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install 'ciss[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                        "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    page = (tmp_path / "site" / "benchmarks.html").read_text()
    assert "Base step" in page, "docs/benchmarks.md no longer includes BENCHMARKS.md"
    # a page another change added but nobody linked in the nav yet: said, not failed
    in_nav = set(re.findall(r":\s*(\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    orphans = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")
                     if str(p.relative_to(ROOT / "docs")) not in in_nav)
    if orphans:
        warnings.warn(f"docs pages not in mkdocs.yml's nav: {', '.join(orphans)}", stacklevel=1)
