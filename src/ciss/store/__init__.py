"""The model store: versioned steps, cards, checksums, the deploy pointer."""

from ciss.store.card import StepCard
from ciss.store.store import Store, default_store_path

__all__ = ["Store", "StepCard", "default_store_path"]
