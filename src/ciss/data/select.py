"""Which collected images go to the annotators (``ciss collect export --budget N``).

Rules (``RULES``), each over the items' ``meta.json`` (``data.collection``):

- ``balanced`` (the default): greedy. An item's *priority* is the mean of its percentile
  ranks, within the collection, of novelty and of uncertainty (uncertainty alone when the
  step was not calibrated). Each pick takes the item with the highest
  ``priority x spread x balance``, where *spread* is its distance to the nearest item
  already picked in the space of the model's own pooled class shares (``pooled``: the mean
  softmax per class over the image), divided by the largest such distance among the
  candidates (1 for the first pick), and *balance* is ``1 / (1 + picked)`` with *picked*
  the number of picked items sharing its dominant predicted class (the largest non-
  background pooled share). So the budget goes first to unusual images, is spread across
  what the images look like to the model, and is not spent on one predicted class.
- ``score``: the ``budget`` highest priorities (no spread, no balance).
- ``random``: a seeded uniform draw (the baseline a selection rule must beat).

``benchmarks/production_loop.py`` measures them against each other on streams where some
images hold classes the step does not know.
"""

from __future__ import annotations

import random

import numpy as np

RULES = ("balanced", "score", "random")


def _ranks(values: list[float | None]) -> np.ndarray:
    """Percentile rank in [0, 1] of each value (ties share a rank); None ranks 0."""
    x = np.array([-np.inf if v is None else float(v) for v in values])
    if len(x) < 2:
        return np.ones(len(x))
    order = x.argsort(kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    for v in np.unique(x):  # ties: their mean rank
        ranks[x == v] = ranks[x == v].mean()
    out = ranks / (len(x) - 1)
    out[np.isneginf(x)] = 0.0
    return out


def priority(metas: list[dict]) -> np.ndarray:
    """The ``score`` rule's priority of each item (module docstring)."""
    scores = [m.get("scores") or {} for m in metas]
    unc = _ranks([s.get("uncertainty") for s in scores])
    novelty = [s.get("novelty") for s in scores]
    if all(v is None for v in novelty):
        return unc
    return (unc + _ranks(novelty)) / 2


def _pooled(metas: list[dict]) -> np.ndarray:
    """The pooled class shares, aligned by class name across items served by other steps."""
    names: list[str] = []
    for m in metas:
        names += [n for n in m.get("classes") or [] if n not in names]
    out = np.zeros((len(metas), max(1, len(names))), np.float64)
    for i, m in enumerate(metas):
        for n, v in zip(m.get("classes") or [], m.get("pooled") or []):
            out[i, names.index(n)] = float(v)
    return out


def _dominant(pooled: np.ndarray) -> np.ndarray:
    """The dominant non-background class of each item (column 0 is background)."""
    if pooled.shape[1] < 2:
        return np.zeros(len(pooled), int)
    return pooled[:, 1:].argmax(axis=1) + 1


def select(metas: list[dict], budget: int, rule: str = "balanced", seed: int = 0) -> list[int]:
    """Indices of the ``budget`` items to annotate, in pick order (module docstring).

    Raises:
        ValueError: an unknown rule or a budget below 1.
    """
    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: choose {', '.join(RULES)}")
    if budget < 1:
        raise ValueError(f"budget {budget}: give at least 1")
    n = len(metas)
    if budget >= n:
        budget = n
    if rule == "random":
        return sorted(random.Random(seed).sample(range(n), budget))
    prio = priority(metas)
    if rule == "score":
        return [int(i) for i in np.argsort(-prio, kind="stable")[:budget]]
    pooled = _pooled(metas)
    dominant = _dominant(pooled)
    nearest = np.full(n, np.inf)
    taken = np.zeros(n, bool)
    per_class: dict[int, int] = {}
    picks: list[int] = []
    for _ in range(budget):
        free = ~taken
        spread = nearest / max(float(nearest[free].max()), 1e-12) if picks else np.ones(n)
        balance = np.array([1.0 / (1 + per_class.get(int(c), 0)) for c in dominant])
        # a small floor keeps zero-priority items orderable once the rest are taken
        value = np.where(free, (prio + 1e-6) * spread * balance, -np.inf)
        i = int(np.argmax(value))
        picks.append(i)
        taken[i] = True
        per_class[int(dominant[i])] = per_class.get(int(dominant[i]), 0) + 1
        nearest = np.minimum(nearest, np.linalg.norm(pooled - pooled[i], axis=1))
    return picks
