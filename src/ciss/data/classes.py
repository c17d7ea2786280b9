"""Ordered class lists: names <-> ids, 0 = background, 255 = ignore."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ciss.errors import CissError

BACKGROUND = "background"
IGNORE_INDEX = 255
MAX_CLASSES = 255  # ids must fit a uint8 mask next to the ignore value


@dataclass(frozen=True)
class ClassList:
    """An ordered list of class names; the position of a name is its id.

    Attributes:
        names: class names, ``names[0] == "background"``.
    """

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        errors = validate_names(self.names)
        if errors:
            raise CissError(f"invalid class list: {errors[0]}")

    @classmethod
    def from_file(cls, path: Path) -> ClassList:
        """Read ``classes.txt`` (one name per line, first line ``background``)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CissError(f"{path}: cannot read class list ({exc})") from exc
        names = [line.strip() for line in text.splitlines()]
        while names and names[-1] == "":
            names.pop()
        errors = validate_names(names)
        if errors:
            raise CissError(f"{path}: {errors[0]}")
        return cls(tuple(names))

    def write(self, path: Path) -> None:
        Path(path).write_text("\n".join(self.names) + "\n", encoding="utf-8")

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        return self.names.index(name)

    @property
    def objects(self) -> tuple[str, ...]:
        """Every class but background."""
        return self.names[1:]

    def extended(self, new: list[str] | tuple[str, ...]) -> ClassList:
        """This list with ``new`` names appended (names already present are skipped)."""
        return ClassList(self.names + tuple(n for n in new if n not in self.names))


def validate_names(names: list[str] | tuple[str, ...]) -> list[str]:
    """Problems with a list of class names, as sentences; empty when the list is valid."""
    problems = []
    if not names:
        return ["the class list is empty"]
    if names[0] != BACKGROUND:
        problems.append(f"the first class must be '{BACKGROUND}', found '{names[0]}'")
    if len(names) > MAX_CLASSES:
        problems.append(f"{len(names)} classes; at most {MAX_CLASSES} fit an 8-bit mask")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not name:
            problems.append(f"line {i + 1} is an empty class name")
        elif name in seen:
            problems.append(f"duplicate class name '{name}' on lines {seen[name] + 1} and {i + 1}")
        seen.setdefault(name, i)
    return problems
