"""The opt-in replay memory: up to N class-balanced training images kept beside a step.

Off by default: the premise of class-incremental learning is that old training data is gone.
A user who may keep some asks for it with ``--memory N`` (``ciss train``, ``ciss
add-classes``). After a step is trained, its memory is chosen from the parent's memory and the
step's own training images, balanced over every class seen so far, and written into the step
as the artifact ``memory/``: a dataset folder (images, index masks in the step's class ids,
``classes.txt``, ``train.txt``) covered by the card's checksums like every artifact. The next
step replays it with its labels beside the new folder. Masks keep the labels their own step
gave them: a memory image shows its own step's classes, and its background may hide classes
of other steps, which the unbiased losses already treat as "background or old".

``--memory`` left unset continues the parent's choice (a user adding classes every week
should not have to repeat it); ``--memory 0`` stops keeping one. ``ciss memory show|clear``
reads and deletes them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ciss.data.classes import ClassList
from ciss.data.dataset import label_lut
from ciss.data.folder import DatasetFolder, open_folder
from ciss.data.imageio import read_image, write_mask
from ciss.errors import CissError
from ciss.failpoints import failpoint

MEMORY = "memory"
HOW = ("class-balanced: classes in turn, rarest first, each takes one random image showing "
       "it until the budget is spent (the parent's memory and this step's training images "
       "compete alike)")


@dataclass(frozen=True)
class Candidate:
    """One image that may enter a memory.

    Attributes:
        folder: where it is read from (a step folder, or the parent's memory).
        stem: its stem there.
        lut: its mask ids -> the new step's ids.
        name: its stem in the memory (unique across steps).
        classes: names of the object classes its mask shows, in the new step's labels.
    """

    folder: DatasetFolder
    stem: str
    lut: np.ndarray
    name: str
    classes: frozenset[str]


def candidates(folder: DatasetFolder, stems: list[str], classes: ClassList,
               prefix: str = "") -> list[Candidate]:
    """The memory candidates of ``stems`` of ``folder``, labelled in ``classes``."""
    lut = label_lut(folder.classes, classes)
    out = []
    for stem in stems:
        shown = {classes.names[lut[i]] for i in folder.presence[stem]}
        out.append(Candidate(folder, stem, lut, prefix + stem,
                             frozenset(shown - {classes.names[0]})))
    return out


def balanced(cands: list[Candidate], n: int, seed: int = 0) -> list[Candidate]:
    """Up to ``n`` candidates, balanced over the classes they show (see ``HOW``); images
    showing no object class come last."""
    rng = np.random.default_rng(seed)
    order = [cands[i] for i in rng.permutation(len(cands))]
    by_class: dict[str, list[Candidate]] = {}
    for c in order:
        for name in sorted(c.classes):
            by_class.setdefault(name, []).append(c)
    chosen: dict[str, Candidate] = {}
    queues = sorted(by_class.items(), key=lambda kv: (len(kv[1]), kv[0]))
    while len(chosen) < n and any(q for _, q in queues):
        for _, queue in queues:
            while queue and queue[0].name in chosen:
                queue.pop(0)
            if queue and len(chosen) < n:
                c = queue.pop(0)
                chosen[c.name] = c
    for c in order:  # the budget is not spent: images without any object class
        if len(chosen) >= n:
            break
        chosen.setdefault(c.name, c)
    return sorted(chosen.values(), key=lambda c: c.name)


def memory_writer(chosen: list[Candidate], classes: ClassList):
    """A writer for ``Store.write_step``: the chosen images as a dataset folder."""

    def write(dest: Path) -> None:
        (dest / "images").mkdir(parents=True)
        (dest / "masks").mkdir()
        classes.write(dest / "classes.txt")
        for c in chosen:
            src = c.folder.images[c.stem]
            if c.folder.exif:  # the file as it is: the memory is read in EXIF orientation too
                shutil.copyfile(src, dest / "images" / (c.name + src.suffix.lower()))
            else:  # pixels as stored, re-encoded, so that one orientation rule serves all
                from PIL import Image

                Image.fromarray(read_image(src, exif=False)).save(
                    dest / "images" / f"{c.name}.png")
            write_mask(dest / "masks" / f"{c.name}.png", c.lut[c.folder.read_mask(c.stem)])
        (dest / "train.txt").write_text("".join(c.name + "\n" for c in chosen))
        (dest / "val.txt").write_text("")
        (dest / "sources.json").write_text(json.dumps(
            {c.name: {"folder": str(c.folder.root), "stem": c.stem} for c in chosen},
            indent=1) + "\n")

    return write


def memory_record(chosen: list[Candidate], budget: int, parent_names: set[str]) -> dict:
    """What the card says of a memory: budget, images per class, where they came from."""
    per_class: dict[str, int] = {}
    for c in chosen:
        for name in c.classes:
            per_class[name] = per_class.get(name, 0) + 1
    kept = sum(c.name in parent_names for c in chosen)
    return {"max_images": budget, "images": len(chosen),
            "per_class": dict(sorted(per_class.items())),
            "kept_from_parent": kept, "from_this_step": len(chosen) - kept, "how": HOW}


def choose_memory(folder: DatasetFolder, parent_memory: DatasetFolder | None,
                  classes: ClassList, budget: int, seed: int) -> tuple[list[Candidate], dict]:
    """(chosen candidates, card record) of the memory a step keeps: the parent's memory and
    the folder's training images, balanced over every class."""
    kept = candidates(parent_memory, parent_memory.train, classes) if parent_memory else []
    fresh = candidates(folder, folder.train, classes, prefix=folder.fingerprint()[:8] + "-")
    chosen = balanced(kept + fresh, budget, seed)
    return chosen, memory_record(chosen, budget, {c.name for c in kept})


def open_memory(store, step: int) -> DatasetFolder | None:
    """The step's memory folder, its checksum verified; None when it keeps none."""
    card = store.card(step)
    if MEMORY not in card.artifacts:
        return None
    store.verify(step, [MEMORY])
    return open_folder(store.step_dir(step) / MEMORY)


def memory_budget(asked: int | None, parent_card) -> int:
    """``--memory``: None continues the parent's budget (0 when it keeps none).

    Raises:
        CissError: a negative budget.
    """
    if asked is None:
        return int((parent_card.memory or {}).get("max_images", 0)) if parent_card else 0
    if asked < 0:
        raise CissError(f"--memory {asked}: must be 0 (none) or a number of images")
    return asked


def clear_memory(store, step: int) -> bool:
    """Delete a step's memory. Returns whether there was one to delete.

    Recovery rule: ``Store.remove_artifacts`` records the removal as pending, the card
    forgets the memory (atomically, with its manifest), then the files go and the record
    goes. Killed after the card and before the files, the record is still there and the
    next command that takes the store lock (any write, or this one again, or ``ciss store
    verify --repair``) deletes the images: they are never orphaned for good.
    """
    with store.lock():  # finishes an interrupted clear before we look
        card = store.card(step)
        if MEMORY not in card.artifacts:
            return False

        def forget(c, removed) -> None:
            c.memory = {**c.memory, "images": 0, "cleared": True}
            failpoint("memory.clear.pending", store.step_dir(step) / MEMORY)

        store.remove_artifacts(step, [MEMORY], forget, why="ciss memory clear")
    return True
