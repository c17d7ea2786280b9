"""Store: atomic step writes, checksums, cards, the listing."""

from __future__ import annotations

import json

import pytest

from ciss.errors import CissError
from ciss.store import StepCard, Store
from ciss.store.listing import list_steps


def _card() -> StepCard:
    return StepCard(step=0, parent=None, classes=["background", "a"], new_classes=["a"],
                    arch="tiny", frozen=[], method="base", hparams={}, data={})


def test_write_and_load_round_trip(tmp_path):
    from ciss.models import build_model

    store = Store(tmp_path / "s")
    model = build_model("tiny", num_classes=2)
    assert store.write_step(_card(), model) == 0
    assert store.write_step(_card(), model) == 1
    loaded, card = store.load_model(1)
    assert card.step == 1 and set(card.artifacts) == {"weights.safetensors"}
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert (a == b).all()


def test_crash_mid_write_leaves_store_intact(store_copy):
    store = Store(store_copy)
    before = {p.name: p.read_bytes() for p in store.step_dir(0).rglob("*") if p.is_file()}
    model, card = store.load_model(0)

    def boom(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        store.write_step(card, model, {"retention": boom})
    assert store.steps() == [0]
    assert not any((store.root / ".staging").iterdir())
    after = {p.name: p.read_bytes() for p in store.step_dir(0).rglob("*") if p.is_file()}
    assert after == before
    store.load_model(0)  # still loadable


def test_tampered_weights_refused(store_copy):
    store = Store(store_copy)
    path = store.step_dir(0) / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CissError, match="weights.safetensors: checksum mismatch"):
        store.load_model(0)


def test_tampered_retention_detected(store_copy):
    store = Store(store_copy)
    mask = next((store.step_dir(0) / "retention" / "masks").iterdir())
    mask.write_bytes(mask.read_bytes() + b"x")
    with pytest.raises(CissError, match="retention: checksum mismatch"):
        store.verify(0)


def test_resolve_and_listing(store_copy):
    store = Store(store_copy)
    assert store.resolve(None) == 0
    with pytest.raises(CissError, match="step 5 is not in"):
        store.resolve(5)
    rows = list_steps(store)
    assert rows[0].step == 0 and rows[0].method == "base" and rows[0].new_miou is not None
    with pytest.raises(CissError, match="no steps yet"):
        Store(store_copy / "nothing").resolve(None)


def test_add_artifact_and_deployed(store_copy):
    store = Store(store_copy)
    store.add_artifact(0, "note.txt", lambda p: p.write_text("hello"))
    assert "note.txt" in store.verify(0).artifacts
    store.write_deployed({"step": 0, "engine": "onnx"})
    assert json.loads((store.root / "deployed.json").read_text())["step"] == 0
    assert store.deployed()["engine"] == "onnx"
