"""CiSS scenarios: split a fully labelled folder into step folders (X-Y tasks).

Each step folder is exactly what a user would hand to ``ciss add-classes``: its own
``classes.txt`` (background + the step's classes) and masks where every other class, old or
future, is background (255 stays ignore).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ciss.data.classes import IGNORE_INDEX, ClassList
from ciss.data.folder import DatasetFolder
from ciss.data.imageio import write_mask
from ciss.errors import CissError

NAMED = ("19-1", "15-5", "15-1", "10-1", "5-3", "100-50", "100-10", "50-50")
SETTINGS = ("overlap", "disjoint")


@dataclass(frozen=True)
class Scenario:
    """A task ``base-increment``: step 0 learns classes 1..base, then ``increment`` per step."""

    base: int
    increment: int

    @property
    def name(self) -> str:
        return f"{self.base}-{self.increment}"

    def steps(self, n_objects: int) -> list[list[int]]:
        """Source class ids per step (background excluded)."""
        if self.base < 1 or self.increment < 1:
            raise CissError(f"scenario {self.name}: both numbers must be at least 1")
        if self.base >= n_objects:
            raise CissError(f"scenario {self.name}: needs more than {self.base} object classes, "
                            f"the dataset has {n_objects}")
        rest = n_objects - self.base
        if rest % self.increment:
            raise CissError(f"scenario {self.name}: the {rest} classes after the base step do "
                            f"not divide into steps of {self.increment}")
        ids = list(range(1, n_objects + 1))
        out = [ids[: self.base]]
        for i in range(self.base, n_objects, self.increment):
            out.append(ids[i: i + self.increment])
        return out


def parse_scenario(text: str) -> Scenario:
    m = re.fullmatch(r"(\d+)-(\d+)", text.strip())
    if not m:
        raise CissError(f"--scenario {text}: expected X-Y such as {', '.join(NAMED)}")
    return Scenario(int(m.group(1)), int(m.group(2)))


def select(folder: DatasetFolder, stems: list[str], step_ids: list[int], old_ids: list[int],
           setting: str) -> list[str]:
    """Stems showing a step class; ``disjoint`` also drops those showing a future class."""
    now, allowed = set(step_ids), set(step_ids) | set(old_ids) | {0}
    keep = [s for s in stems if folder.presence[s] & now]
    if setting == "disjoint":
        keep = [s for s in keep if folder.presence[s] <= allowed]
    return keep


def write_split(folder: DatasetFolder, scenario: Scenario, out: Path,
                setting: str = "overlap", old_label: int = 0) -> list[Path]:
    """Write ``out/step-0``, ``out/step-1``, ... and ``out/scenario.json``; returns the steps.

    ``old_label`` is what earlier steps' classes become in a step's masks: 0 (background,
    the CiSS protocol) or 255 (ignored: the benchmark's control without background shift).

    Raises:
        CissError: unknown setting, a scenario that does not fit the classes, a step with no
            training or validation image, or an ``out`` folder that is not empty.
    """
    if setting not in SETTINGS:
        raise CissError(f"--setting {setting}: choose overlap or disjoint")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CissError(f"{out}: exists and is not empty; choose a new folder")
    plan = scenario.steps(len(folder.classes) - 1)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    try:
        steps = []
        for t, ids in enumerate(plan):
            old = [c for prev in plan[:t] for c in prev]
            names = [folder.classes.names[c] for c in ids]
            train = select(folder, folder.train, ids, old, setting)
            val = select(folder, folder.val, ids, old, setting)
            for split, stems in (("training", train), ("validation", val)):
                if not stems:
                    raise CissError(f"scenario {scenario.name} ({setting}), step {t}: no "
                                    f"{split} image shows {', '.join(names)}")
            _write_step(folder, tmp / f"step-{t}", ids, old, train, val, old_label)
            steps.append({"dir": f"step-{t}", "classes": names, "train": len(train),
                          "val": len(val)})
        meta = {"scenario": scenario.name, "setting": setting, "old_label": old_label,
                "source": str(folder.root.resolve()), "test": "source val split, full labels",
                "steps": steps}
        (tmp / "scenario.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / s["dir"] for s in steps]


def _write_step(folder: DatasetFolder, dest: Path, ids: list[int], old: list[int],
                train: list[str], val: list[str], old_label: int) -> None:
    (dest / "images").mkdir(parents=True)
    (dest / "masks").mkdir()
    ClassList(("background",) + tuple(folder.classes.names[c] for c in ids)).write(
        dest / "classes.txt")
    lut = np.zeros(256, dtype=np.uint8)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    lut[old] = old_label
    for j, c in enumerate(ids):
        lut[c] = j + 1
    for stem in train + val:
        src = folder.images[stem]
        target = dest / "images" / (stem + src.suffix.lower())
        try:
            os.link(src, target)  # images are immutable inputs: share them when possible
        except OSError:
            shutil.copyfile(src, target)
        write_mask(dest / "masks" / f"{stem}.png", lut[folder.read_mask(stem)])
    (dest / "train.txt").write_text("".join(s + "\n" for s in train))
    (dest / "val.txt").write_text("".join(s + "\n" for s in val))
