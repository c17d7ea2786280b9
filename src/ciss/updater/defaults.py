"""Default recipes per architecture and method, chosen by measurement (BENCHMARKS.md §1-2)."""

from __future__ import annotations

from dataclasses import dataclass

from ciss.updater.loop import LoopConfig


def _loop(iterations: int, lr: float, evals: int, warmup: float, overrides: dict) -> LoopConfig:
    given = {k: v for k, v in overrides.items() if v is not None}
    return LoopConfig(**{"iterations": iterations, "lr": lr, "evals": evals, "warmup": warmup,
                         **given})


@dataclass(frozen=True)
class Defaults:
    """The step-0 recipe.

    Attributes:
        iterations: optimiser steps (the budget; independent of the folder's size).
        lr: peak learning rate.
        loss: one of ``losses.BASE_LOSSES``.
        scale: random rescale range of the training crops.
        warmup: fraction of the budget with linear warm-up.
        evals: validation points whose best weights are kept.
    """

    iterations: int
    lr: float
    loss: str = "ce+dice"
    scale: tuple[float, float] = (1.0, 1.0)
    warmup: float = 0.03
    evals: int = 4

    def loop(self, **overrides) -> LoopConfig:
        """A LoopConfig of this recipe; overrides that are None keep the recipe's value."""
        return _loop(self.iterations, self.lr, self.evals, self.warmup, overrides)


def base_defaults(arch: str) -> Defaults:
    """Step-0 defaults: tiny is sized for a few CPU minutes on 64 px crops."""
    if arch == "tiny":
        return Defaults(iterations=1800, lr=4e-3)
    return Defaults(iterations=4000, lr=1e-3)


@dataclass(frozen=True)
class StepDefaults:
    """The add-classes recipe.

    Attributes:
        iterations: optimiser steps.
        lr: peak learning rate.
        kd_weight: lambda of the distillation term.
        evals: validation points whose best weights are kept (0: the last weights).
        warmup: fraction of the budget with linear warm-up.
        bn_stats: "frozen" (BatchNorm keeps the parent's running statistics) or "update".
        max_epochs: passes over the new-class folder that the budget does not exceed...
        min_iterations: ...unless that would be fewer optimiser steps than this.
    """

    iterations: int
    lr: float
    kd_weight: float
    evals: int = 0
    warmup: float = 0.03
    bn_stats: str = "frozen"
    max_epochs: int = 20
    min_iterations: int = 315

    def loop(self, **overrides) -> LoopConfig:
        """A LoopConfig of this recipe; overrides that are None keep the recipe's value.

        The recipe's budget is ``iterations`` steps, at most ``max_epochs`` passes, at least
        ``min_iterations`` steps; a budget given by the caller (iterations or epochs) is
        taken as it is.
        """
        given = overrides.get("iterations") is not None or overrides.get("epochs") is not None
        cap = {} if given else {"max_epochs": self.max_epochs,
                                "min_iterations": self.min_iterations}
        return _loop(self.iterations, self.lr, self.evals, self.warmup, {**overrides, **cap})


def step_defaults(method: str) -> StepDefaults:
    """add-classes defaults per method (measured on the synthetic 15-5 protocol)."""
    kd = {"mib": 10.0, "mib+pseudo": 10.0, "lwf": 100.0, "ilt": 100.0}.get(method, 0.0)
    return StepDefaults(iterations=630, lr=3e-3, kd_weight=kd)
