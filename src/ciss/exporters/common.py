"""What every exporter shares: its result, a staging folder, the card update it records."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ciss.exporters.parity import ParityReport
from ciss.store import Store


@dataclass
class ExportResult:
    format: str
    path: Path
    parity: ParityReport | None
    note: str = ""


def staging_dir(store: Store, step: int, source: str = "weights.safetensors") -> Path:
    """A scratch folder in the store's ``.staging``, leased while this process lives (so no
    clean-up mistakes it for a dead writer's leftover); ``store.drop_staging`` removes it.
    An engine is about the size of the step's ``source`` file: a full disk says so."""
    from ciss.store.files import disk_bytes

    return store.staging_folder("export", needed=disk_bytes(store.step_dir(step) / source))


def record_engine(report: ParityReport, fmt: str):
    """A card update that stores the parity result and the engine's retention IoUs."""

    def update(card) -> None:
        card.extra.setdefault("parity", {})[fmt] = report.to_json()
        for s, scores in report.per_set.items():
            card.retention.setdefault(s, {})[report.engine] = scores[report.engine]

    return update
