"""Spending what an allocation leaves of the budget: widen layers while the limits allow.

One lowering (imprinting) or one rounding (sqnr) can stop short of the budget by a whole
layer's cost. Both searches then give the rest back, one width at a time, to the layer where it
removes the most (weighted) noise per unit of cost.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..cost import Cost, within
from .base import SearchContext

Noise = Callable[[str, int], float]  # noise(layer name, bits)


def limit_fraction(before: Cost, after: Cost, limits: dict[str, float], metrics) -> float:
    """How much cost goes from `before` to `after` on `metrics`, each as a fraction of its limit."""
    return sum((getattr(before, m) - getattr(after, m)) / limits[m] for m in metrics)


def refill(
    ctx: SearchContext,
    w_bits: dict[str, int],
    a_bits: dict[str, int],
    weights: dict[str, float],
    noise_of: dict[str, Noise],
    limits: dict[str, float] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Raise the layers in `weights` one width at a time while the config meets `limits` (default: the
    budget's): each time the raise whose weight x noise removed, per unit of cost added (summed over
    the limits as fractions of them), is largest; a raise that removes no noise still spends budget
    that nothing else can use. `noise_of` maps the kinds of move ("w", and "a" when activation bits
    are searched) to noise(layer, bits)."""
    o = ctx.options
    limits = limits or ctx.budget.limits()
    w_bits, a_bits = dict(w_bits), dict(a_bits)
    while True:
        current = ctx.cost(w_bits, a_bits)
        best, best_value = None, 0.0
        for name, weight in weights.items():
            for kind, noise in noise_of.items():
                bits, choices = (w_bits, o.w_bits) if kind == "w" else (a_bits, o.a_bits)
                k = choices.index(bits[name])
                if k + 1 == len(choices):
                    continue
                raised = dict(bits)
                raised[name] = choices[k + 1]
                wb, ab = (raised, a_bits) if kind == "w" else (w_bits, raised)
                cost = ctx.cost(wb, ab)
                if not within(cost, limits):
                    continue
                added = limit_fraction(cost, current, limits, limits)
                gain = weight * (noise(name, bits[name]) - noise(name, raised[name]))
                value = gain / added if added > 0 else math.inf
                if best is None or value > best_value:
                    best, best_value = (wb, ab), value
        if best is None:
            return w_bits, a_bits
        w_bits, a_bits = best
