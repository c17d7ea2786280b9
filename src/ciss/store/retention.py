"""Retention sets: held-out images and masks of one step's classes, kept inside the step."""

from __future__ import annotations

import shutil
from pathlib import Path

from ciss.data.folder import DatasetFolder, open_folder
from ciss.data.imageio import write_mask
from ciss.errors import CissError


def retention_writer(folder: DatasetFolder, stems: list[str]):
    """A writer for ``Store.write_step``: copies ``stems`` as a dataset folder (all in val)."""

    def write(dest: Path) -> None:
        (dest / "images").mkdir(parents=True)
        (dest / "masks").mkdir()
        folder.classes.write(dest / "classes.txt")
        for stem in stems:
            image = folder.images[stem]
            shutil.copyfile(image, dest / "images" / (stem + image.suffix.lower()))
            if folder.mask_reader is None:  # an index PNG already: keep the file as it is
                shutil.copyfile(folder.masks[stem], dest / "masks" / f"{stem}.png")
            else:  # a tool format (COCO, colour masks...): store the decoded index mask
                write_mask(dest / "masks" / f"{stem}.png", folder.read_mask(stem))
        (dest / "val.txt").write_text("".join(s + "\n" for s in stems))
        if not folder.exif:  # the copied images keep their EXIF tags: keep the choice too
            (dest / "ciss.json").write_text('{"exif": "ignore"}\n')
        (dest / "train.txt").write_text("")

    return write


def ancestors(store, step: int) -> list[int]:
    """``step`` and every step it descends from, oldest first."""
    chain = []
    cur: int | None = step
    while cur is not None:
        chain.append(cur)
        cur = store.card(cur).parent
    return chain[::-1]


def resolve_comparison(store, step: int | None, against: int | None
                       ) -> tuple[int, int | None, list[int]]:
    """(step, reference, step's line oldest first): the reference defaults to the parent.

    The reference is None only for a step without a parent and no ``against``.

    Raises:
        CissError: unknown steps, or ``against`` that is not an ancestor of ``step``.
    """
    step = store.resolve(step)
    chain = ancestors(store, step)
    if against is None:
        return step, store.card(step).parent, chain
    against = store.resolve(against)
    if against not in chain or against == step:
        raise CissError(f"--against {against}: not an ancestor of step {step} "
                        f"(its line is {' -> '.join(map(str, chain))})")
    return step, against, chain


def retention_sets(store, step: int) -> dict[str, DatasetFolder]:
    """The retention folders of ``step`` and its ancestors, checksums verified, keyed by step."""
    sets = {}
    for s in ancestors(store, step):
        store.verify(s, ["retention"])
        sets[str(s)] = open_retention(store.step_dir(s) / "retention")
    return sets


def open_retention(path: Path) -> DatasetFolder:
    """Open a step's retention folder (its val list holds every sample)."""
    if not path.is_dir():
        raise CissError(f"{path}: retention set missing")
    return open_folder(path, require_train=False)
