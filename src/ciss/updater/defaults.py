"""Default hyper-parameters per architecture, chosen by measurement (see BENCHMARKS.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Defaults:
    epochs: int
    lr: float


def base_defaults(arch: str) -> Defaults:
    """Step-0 defaults: tiny is sized for a few CPU minutes on the synthetic default."""
    if arch == "tiny":
        return Defaults(epochs=16, lr=4e-3)
    return Defaults(epochs=30, lr=1e-3)


@dataclass(frozen=True)
class StepDefaults:
    epochs: int
    lr: float
    kd_weight: float


def step_defaults(method: str) -> StepDefaults:
    """add-classes defaults per method (measured on the synthetic 15-5 protocol)."""
    kd = {"mib": 10.0, "lwf": 100.0, "ilt": 100.0}.get(method, 0.0)
    return StepDefaults(epochs=10, lr=3e-3, kd_weight=kd)
