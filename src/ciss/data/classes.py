"""Ordered class lists: names <-> ids, 0 = background, 255 = ignore."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ciss import hints
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


def normalise_name(name: str) -> str:
    """A class name as people mean it: case, spaces, ``-`` and ``_`` do not tell classes apart
    (``Checker Disc``, ``checker_disc`` and ``checker-disc`` are one class)."""
    return re.sub(r"[\s_-]+", "-", name.strip().lower()).strip("-")


def _edits(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions)."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def near_miss(name: str, known: str) -> bool:
    """Whether ``name`` looks like a typo of ``known`` (normalised): one edit apart, or two
    when both are 10 characters or longer. Distinct classes of one family (``dots-ring`` and
    ``dots-star``) are further apart than that."""
    a, b = normalise_name(name), normalise_name(known)
    limit = 2 if min(len(a), len(b)) >= 10 else 1
    return min(len(a), len(b)) >= 4 and _edits(a, b) <= limit


@dataclass(frozen=True)
class NameMatch:
    """How a folder's class names meet the classes a step knows.

    Attributes:
        renames: folder name -> the known class it is (same name after ``normalise_name``).
        new: names that are new classes, in the folder's order.
    """

    renames: dict[str, str]
    new: tuple[str, ...]

    def notes(self) -> list[str]:
        """One line per folder name taken as a known class."""
        return [hints.CLASS_IS_KNOWN(name=a, known=b) for a, b in self.renames.items()]


def match_names(names: tuple[str, ...] | list[str], known: tuple[str, ...] | list[str], *,
                new_ok: tuple[str, ...] | list[str] = (), where: str = "the folder"
                ) -> NameMatch:
    """Match a folder's object class names to ``known`` ones.

    An exact match, or a match after ``normalise_name``, is the known class; a name that is a
    near miss of a known one (``near_miss``) is refused unless it is in ``new_ok``; the rest
    are new classes.

    Raises:
        CissError: a near miss, naming the known class and --new-class-ok; or two folder names that
            are one known class.
    """
    by_norm = {normalise_name(k): k for k in known}
    renames: dict[str, str] = {}
    new: list[str] = []
    for name in names:
        if name in known:
            continue
        same = by_norm.get(normalise_name(name))
        if same is not None:
            if same in names or same in renames.values():
                raise CissError(f"{where}: classes '{name}' and '{same}' are one class (names "
                                "match ignoring case, spaces, '-' and '_'); merge them")
            renames[name] = same
            continue
        close = [k for k in known if k != BACKGROUND and near_miss(name, k)]
        if close and name not in new_ok:
            raise CissError(hints.CLASS_NEAR_MISS(where=where, name=name, known=close[0]))
        new.append(name)
    return NameMatch(renames, tuple(new))
