"""The torch Dataset over a validated folder, with labels mapped into a model's class space."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ciss.data.classes import IGNORE_INDEX, ClassList
from ciss.data.folder import DatasetFolder
from ciss.data.transforms import TrainTransform


def label_lut(source: ClassList, target: ClassList, unknown: int = 0) -> np.ndarray:
    """A 256-entry lookup table mapping ``source`` ids to ``target`` ids by class name.

    Names ``target`` does not know map to ``unknown`` (background by default); 255 stays 255.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for i, name in enumerate(source.names):
        lut[i] = target.index(name) if name in target else unknown
    return lut


class SegmentationDataset(Dataset):
    """Samples of a folder split as (uint8 [3,H,W] image, int64 [H,W] mask in model ids).

    With ``keys=True`` a third item identifies the exact input (index * 2 + flipped), so
    that per-input results (the frozen trunk's outputs) can be cached across epochs.

    Augmentation randomness depends only on (seed, epoch, index), so an interrupted and
    resumed training sees exactly the samples an uninterrupted one would.
    """

    epoch_in_index = True  # the training loop's sampler sends (epoch, index) pairs

    def __init__(self, folder: DatasetFolder, stems: list[str], lut: np.ndarray,
                 transform: TrainTransform | None = None, seed: int = 0,
                 keys: bool = False) -> None:
        self.folder = folder
        self.stems = list(stems)
        self.lut = lut
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.keys = keys

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        # (epoch, index) from the training loop's sampler: DataLoader workers hold their own
        # copy of the dataset, so the epoch must travel with the index
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        image, mask = self.folder.load(self.stems[index])
        mask = self.lut[mask]
        flipped = False
        if self.transform is not None:
            rng = np.random.default_rng([self.seed, epoch, index])
            image, mask, flipped = self.transform(image, mask, rng)
        out = (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
               torch.from_numpy(mask.astype(np.int64)))
        if self.keys:
            out += (torch.tensor(index * 2 + int(flipped)),)
        return out


class JoinedDataset(Dataset):
    """Several ``SegmentationDataset`` parts read as one (a step folder and a replay memory).

    Indices run through the parts in order; a part's key (``keys=True``) is rewritten with
    the joined index, so that cached per-input results of two parts never collide.
    """

    epoch_in_index = True

    def __init__(self, parts: list[SegmentationDataset]) -> None:
        self.parts = [p for p in parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def set_epoch(self, epoch: int) -> None:
        for p in self.parts:
            p.set_epoch(epoch)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, index = index if isinstance(index, tuple) else (None, index)
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        local = index - int(self.starts[part])
        out = self.parts[part][local if epoch is None else (epoch, local)]
        if len(out) == 3:  # (image, mask, key): key = index * 2 + flipped, in joined indices
            out = out[:2] + (out[2] + 2 * int(self.starts[part]),)
        return out
