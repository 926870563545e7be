"""The Pareto front of (cost, quality) points, the one definition the searches and the leaderboard share."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TypeVar

__all__ = ["pareto_front"]

T = TypeVar("T")


def pareto_front(items: Iterable[T], cost: Callable[[T], float], quality: Callable[[T], float | None]) -> list[T]:
    """The items more accurate than every cheaper one. Sorted by cost, ties broken by quality (best first), so of
    equal-cost items only the best can be on the front; an item without a quality never is."""
    ranked = sorted(items, key=lambda it: (cost(it), -(quality(it) if quality(it) is not None else -math.inf)))
    front, best = [], -math.inf
    for it in ranked:
        q = quality(it)
        if q is not None and q > best:
            front.append(it)
            best = q
    return front
