"""The opt-in replay memory: chosen class-balanced, stored atomically with checksums, replayed
by the next step, continued by default, shown and cleared from the command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ciss.cli import main
from ciss.data.classes import ClassList
from ciss.data.dataset import JoinedDataset, SegmentationDataset, label_lut
from ciss.data.folder import open_folder
from ciss.errors import CissError
from ciss.store import Store
from ciss.updater.add_classes import UpdateConfig, add_classes
from ciss.updater.loop import LoopConfig
from ciss.updater.memory import MEMORY, Candidate, balanced, open_memory
from ciss.updater.train import train_base
from tests.conftest import make_folder

FAST = LoopConfig(epochs=1, batch_size=4, evals=0)


def _cand(name, classes):
    return Candidate(None, name, None, name, frozenset(classes))


def test_balanced_gives_every_class_its_share_rarest_first():
    # 'rare' shows in 2 images of 40, 'common' in 38: a random pick of 6 would likely miss rare
    cands = [_cand(f"c{i}", {"common"}) for i in range(38)]
    cands += [_cand("r0", {"rare"}), _cand("r1", {"rare", "common"}), _cand("none", set())]
    chosen = balanced(cands, 6, seed=3)
    names = [c.name for c in chosen]
    assert len(names) == 6 == len(set(names))
    assert {"r0", "r1"} <= set(names)  # the rare class gets every image it has
    assert "none" not in names  # images without an object come only after the classes'
    assert balanced(cands, 6, seed=3) == chosen  # the seed decides, nothing else
    assert len(balanced(cands, 100)) == len(cands)  # a budget above the pool takes it all


def test_joined_dataset_keys_never_collide(split_dir):
    folder = open_folder(split_dir / "step-1")
    lut = label_lut(folder.classes, folder.classes)
    a = SegmentationDataset(folder, folder.train[:3], lut, keys=True)
    b = SegmentationDataset(folder, folder.train[3:5], lut, keys=True)
    joined = JoinedDataset([a, b])
    keys = [int(joined[(0, i)][2]) for i in range(len(joined))]
    assert len(joined) == 5 and keys == [0, 2, 4, 6, 8]
    assert torch.equal(joined[(0, 3)][0], b[(0, 0)][0])


def test_memory_is_kept_replayed_continued_and_cleared(store_copy, split_dir, tmp_path):
    store = Store(store_copy)
    rep = add_classes(store, split_dir / "step-1", update=UpdateConfig(parent=0, memory=6),
                      loop=FAST, progress=False)
    card = rep.card
    assert MEMORY in card.artifacts and card.memory["images"] == 6
    assert card.memory["max_images"] == 6 and card.memory["kept_from_parent"] == 0
    assert set(card.memory["per_class"]) <= set(card.new_classes)
    assert "replayed_images" not in card.data  # the parent kept none: nothing to replay
    mem = open_memory(store, rep.step)
    assert len(mem.train) == 6 and list(mem.classes.names) == card.classes
    # masks are in the step's ids: the new classes' ids, not the folder's
    seen = set().union(*(mem.presence[s] for s in mem.train)) - {0}
    assert seen and min(seen) >= len(store.card(0).classes)

    # the next step, --memory unset: the parent's budget continues and its memory is replayed
    extra = make_folder(tmp_path / "zebra", ["background", "zebra"], n=6, size=(32, 32))
    (extra / "val.txt").write_text("s4\ns5\n")
    (extra / "train.txt").write_text("s0\ns1\ns2\ns3\n")
    nxt = add_classes(store, extra, update=UpdateConfig(parent=rep.step), loop=FAST,
                      progress=False)
    c2 = nxt.card
    assert c2.data["replayed_images"] == 6
    assert c2.memory["max_images"] == 6 and c2.memory["images"] == 6
    assert c2.memory["kept_from_parent"] + c2.memory["from_this_step"] == 6
    assert "zebra" in c2.memory["per_class"]  # the new class has its share
    store.verify(nxt.step)

    # --memory 0: neither replayed nor kept
    off = add_classes(store, extra, update=UpdateConfig(parent=rep.step, memory=0), loop=FAST,
                      progress=False)
    assert MEMORY not in off.card.artifacts and not off.card.memory
    assert "replayed_images" not in off.card.data

    runner = CliRunner()
    res = runner.invoke(main, ["memory", "show", "--store", str(store_copy)])
    assert res.exit_code == 0, res.output
    assert f"step {rep.step}: 6 images of at most 6" in res.output and "checksum ok" in res.output
    res = runner.invoke(main, ["memory", "clear", "--store", str(store_copy), "--step",
                               str(rep.step), "--yes"])
    assert res.exit_code == 0, res.output
    assert not (store.step_dir(rep.step) / MEMORY).exists()
    assert MEMORY not in store.card(rep.step).artifacts
    store.verify(rep.step)  # the card names no missing artifact
    assert "cleared" in runner.invoke(main, ["memory", "show", "--store",
                                             str(store_copy)]).output


def test_a_tampered_memory_is_refused_and_nothing_is_written(store_copy, split_dir, tmp_path):
    store = Store(store_copy)
    rep = add_classes(store, split_dir / "step-1", update=UpdateConfig(parent=0, memory=4),
                      loop=FAST, progress=False)
    mask = sorted((store.step_dir(rep.step) / MEMORY / "masks").iterdir())[0]
    data = bytearray(mask.read_bytes())
    data[-20] ^= 0xFF
    mask.write_bytes(bytes(data))
    extra = make_folder(tmp_path / "zebra", ["background", "zebra"], n=6, size=(32, 32))
    before = store.steps()
    with pytest.raises(CissError, match="memory: checksum mismatch"):
        add_classes(store, extra, update=UpdateConfig(parent=rep.step), loop=FAST,
                    progress=False)
    assert store.steps() == before


def test_train_keeps_a_memory_of_the_base_data(split_dir, tmp_path):
    store = Store(tmp_path / "s")
    rep = train_base(store, split_dir / "step-0", loop=LoopConfig(iterations=2, batch_size=4,
                                                                  evals=0),
                     loss="ce", progress=False, memory=15)
    m = rep.card.memory
    assert m["images"] == 15 and m["from_this_step"] == 15
    # 15 images over 15 classes: balanced means (nearly) every class is shown
    assert len(m["per_class"]) >= 12
    mem = open_memory(store, 0)
    assert ClassList(tuple(mem.classes.names)).names == tuple(rep.card.classes)
    img, mask = mem.load(mem.train[0])
    assert img.ndim == 3 and mask.dtype == np.uint8
    with pytest.raises(CissError, match="--memory -1"):
        train_base(Store(tmp_path / "t"), split_dir / "step-0", memory=-1, progress=False)
