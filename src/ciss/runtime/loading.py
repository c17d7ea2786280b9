"""Build a Segmenter for a stored step on a named engine."""

from __future__ import annotations

from ciss.engines.load import load_engine
from ciss.runtime.segmenter import Segmenter
from ciss.store import Store


def load_segmenter(store: Store, step: int | None, engine: str) -> Segmenter:
    """The step's engine (checksums verified) behind the serving pre/post-processing."""
    step = store.resolve(step)
    store.require_signed(step)  # with CISS_STORE_KEY set: refuse an unsigned or re-signed card
    card = store.card(step)  # checked against its manifest
    return Segmenter(load_engine(store, step, engine), card.classes)
