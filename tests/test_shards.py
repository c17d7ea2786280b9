"""Under torchrun each rank decodes and keeps only its shard of the train split, and the
training sampler gives it exactly that shard, every epoch in a new order."""

from __future__ import annotations

import numpy as np
import pytest

from ciss.data.folder import open_folder
from ciss.errors import CissError
from ciss.updater.distributed import DistInfo
from ciss.updater.loop import EpochSampler, LoopConfig
from tests.conftest import make_folder


def _folder(tmp_path, n=9):
    root = make_folder(tmp_path / "f", ["background", "a", "b"], n=n, size=(24, 20),
                       suffix=".jpg")
    (root / "train.txt").write_text("".join(f"s{i}\n" for i in range(n - 2)))
    (root / "val.txt").write_text(f"s{n - 2}\ns{n - 1}\n")
    return root


def test_a_rank_decodes_its_shard_and_knows_the_whole_folder(tmp_path):
    root = _folder(tmp_path)
    full = open_folder(root)
    rank1 = open_folder(root, shard=(1, 2))
    assert set(full._cache) == set(full.images)  # rank 0 / no torchrun: everything
    assert set(rank1._cache) == set(full.train[1::2])  # rank 1: its shard only
    assert rank1.presence == full.presence and rank1.shapes == full.shapes
    assert rank1.fingerprint() == full.fingerprint()
    assert all(np.array_equal(rank1.pixels[s], full.pixels[s]) for s in full.pixels)
    img, _ = rank1.load(full.train[0])  # another rank's image still loads (from disk)
    assert np.array_equal(img, full.load(full.train[0])[0])
    # a corrupt image in rank 0's shard: rank 1 only read its header, rank 0 refuses it
    bad = root / "images" / f"{full.train[0]}.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) - 40])  # the header intact, pixels missing
    with pytest.raises(CissError, match="s0.jpg: truncated or corrupt"):
        open_folder(root, shard=(0, 2))
    assert open_folder(root, shard=(1, 2)).shapes == full.shapes
    bad.write_bytes(b"not an image")
    with pytest.raises(CissError, match="not a readable image"):
        open_folder(root, shard=(1, 2))  # the header is checked on every rank


def test_the_sampler_gives_each_rank_its_fixed_shard_in_a_new_order_each_epoch():
    data = list(range(11))
    cfg = LoopConfig(seed=3)
    seen = {}
    for rank in (0, 1, 2):
        s = EpochSampler(data, cfg, DistInfo(rank=rank, world_size=3))
        epochs = []
        for e in range(3):
            s.set_epoch(e)
            epochs.append(list(s))
        assert all(sorted(ep) == list(range(rank, 11, 3))[:3] for ep in epochs)
        assert len({tuple(ep) for ep in epochs}) > 1  # reshuffled within the shard
        assert len(s) == 3
        seen[rank] = set(epochs[0])
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])
