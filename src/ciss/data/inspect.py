"""``ciss data check`` and ``ciss data convert``: look at a folder of any supported layout
without training, and write it out in the ciss layout."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ciss.data.folder import open_folder
from ciss.data.imageio import write_mask
from ciss.errors import CissError


@dataclass
class FolderReport:
    """What ``ciss data check`` found.

    Attributes:
        root: the folder.
        layout: ciss, voc, coco, cvat, roboflow or cityscapes (None if it could not be read).
        classes: class names, background first.
        split: images per split ({"train": n, "val": n}) among the samples without problems.
        pixel_share: class -> share of the labelled pixels (train + val; 255 excluded).
        images_with: class -> images showing it.
        problems: every problem found, one sentence each, naming the file.
    """

    root: str
    layout: str | None = None
    classes: list[str] = field(default_factory=list)
    split: dict[str, int] = field(default_factory=dict)
    pixel_share: dict[str, float] = field(default_factory=dict)
    images_with: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def check_folder(path: Path, exif: str | None = None) -> FolderReport:
    """Read and validate every sample of ``path``; collect the problems instead of stopping
    at the first."""
    report = FolderReport(str(path))
    try:
        folder = open_folder(path, cache=False, require_train=False, problems=report.problems,
                             exif=exif)
    except CissError as exc:
        report.problems.insert(0, str(exc))
        return report
    report.layout = folder.layout
    report.classes = list(folder.classes.names)
    report.split = {"train": len(folder.train), "val": len(folder.val)}
    stems = folder.train + folder.val
    counts = folder.class_pixels(stems)
    total = max(1, int(counts.sum()))
    report.pixel_share = {n: int(c) / total for n, c in zip(folder.classes.names, counts)}
    report.images_with = folder.class_counts(stems)
    left_out = bool(report.problems)  # samples with problems were left out of the counts
    report.problems = group_problems(report.problems)
    if left_out:  # empty classes and splits would be knock-on problems of those
        return report
    for name, n in report.images_with.items():
        if n == 0 and name != "background":
            report.problems.append(f"class '{name}' has no pixel in any image")
    if not folder.train:
        report.problems.append(f"{path}: the train split is empty")
    return report


def group_problems(problems: list[str]) -> list[str]:
    """One line per cause: problems that differ only in the file they name ("<file>: what")
    become "N files: what (e.g. <first file>)"."""
    groups: dict[str, list[str]] = {}
    for p in problems:
        where, sep, what = p.partition(": ")
        key = what if sep else p
        groups.setdefault(key, []).append(where if sep else "")
    out = []
    for what, files in groups.items():
        if len(files) == 1:
            out.append(f"{files[0]}: {what}" if files[0] else what)
        else:
            out.append(f"{len(files)} files: {what} (e.g. {files[0]})")
    return out


def convert_folder(path: Path, out: Path, exif: str | None = None) -> Path:
    """Write ``path`` (any supported layout) as a ciss-layout folder at ``out``.

    The folder is fully validated first; the result is assembled beside ``out`` and renamed
    into place, so an error leaves nothing behind.

    Raises:
        CissError: a problem in the source, or ``out`` exists and is not empty.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CissError(f"{out}: exists and is not empty; choose a new --out")
    folder = open_folder(path, cache=False, require_train=False, exif=exif)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    try:
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        folder.classes.write(tmp / "classes.txt")
        for stem in sorted(folder.images):
            src = folder.images[stem]
            shutil.copyfile(src, tmp / "images" / f"{stem}{src.suffix.lower()}")
            write_mask(tmp / "masks" / f"{stem}.png", folder.read_mask(stem))
        (tmp / "train.txt").write_text("".join(s + "\n" for s in folder.train))
        (tmp / "val.txt").write_text("".join(s + "\n" for s in folder.val))
        if not folder.exif:  # the copied images keep their EXIF tags
            (tmp / "ciss.json").write_text('{"exif": "ignore"}\n')
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
