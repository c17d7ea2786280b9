"""Plain-text tables for the command line."""

from __future__ import annotations


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal, '-' when missing."""
    return "-" if value is None else f"{100 * value:.1f}"


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
