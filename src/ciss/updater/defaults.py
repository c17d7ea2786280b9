"""Default recipes per model family and method, merged with the user's options into the one
``LoopConfig`` a run uses (the recipes themselves: ``models.recipes``, one per family row)."""

from __future__ import annotations

from dataclasses import dataclass

from ciss.models.build import arch_spec
from ciss.models.recipes import BaseRecipe, StepRecipe
from ciss.updater.loop import LoopConfig
from ciss.updater.method_table import method_row


def _loop(r: BaseRecipe | StepRecipe, overrides: dict) -> LoopConfig:
    """The recipe's loop settings, with every override that is not None on top."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return LoopConfig(**{"iterations": r.iterations, "lr": r.lr, "evals": r.evals,
                         "warmup": r.warmup, "optimizer": r.optimizer,
                         "encoder_lr": r.encoder_lr, **given})


@dataclass(frozen=True)
class Defaults:
    """The step-0 recipe of a family (``recipe``), as ``ciss train`` applies it."""

    recipe: BaseRecipe

    @property
    def loss(self) -> str:
        return self.recipe.loss

    @property
    def scale(self) -> tuple[float, float]:
        return self.recipe.scale

    @property
    def iterations(self) -> int:
        return self.recipe.iterations

    @property
    def lr(self) -> float:
        return self.recipe.lr

    def loop(self, **overrides) -> LoopConfig:
        """A LoopConfig of this recipe; overrides that are None keep the recipe's value."""
        return _loop(self.recipe, overrides)


@dataclass(frozen=True)
class StepDefaults:
    """The add-classes recipe of a family (``recipe``) with the method's kd weight."""

    recipe: StepRecipe
    kd_weight: float

    @property
    def bn_stats(self) -> str:
        return self.recipe.bn_stats

    @property
    def iterations(self) -> int:
        return self.recipe.iterations

    @property
    def scale(self) -> tuple[float, float]:
        return self.recipe.scale

    def loop(self, **overrides) -> LoopConfig:
        """A LoopConfig of this recipe; overrides that are None keep the recipe's value.

        The recipe's budget is ``iterations`` steps, at most ``max_epochs`` passes, at least
        ``min_iterations`` steps; a budget given by the caller (iterations or epochs) is
        taken as it is.
        """
        r = self.recipe
        given = overrides.get("iterations") is not None or overrides.get("epochs") is not None
        cap = {} if given else {"max_epochs": r.max_epochs, "min_iterations": r.min_iterations}
        return _loop(r, {**overrides, **cap})


def base_defaults(arch: str) -> Defaults:
    """Step-0 defaults of ``arch``'s family (tiny: sized for a few CPU minutes)."""
    return Defaults(arch_spec(arch).family.base)


def step_defaults(method: str, arch: str = "tiny") -> StepDefaults:
    """add-classes defaults of ``arch``'s family for ``method`` (its row's kd weight).

    Raises:
        CissError: unknown method.
    """
    return StepDefaults(arch_spec(arch).family.step, method_row(method).kd_weight)


def recipe_of(arch: str, kind: str) -> dict:
    """The family recipe (``kind``: base or step) a run of ``arch`` started from, for its card."""
    family = arch_spec(arch).family
    recipe = family.base if kind == "base" else family.step
    return {"family": family.name, "kind": kind, "source": recipe.source}
