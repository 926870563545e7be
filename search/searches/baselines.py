"""Baselines that share the search code path: uniform bit-widths, and random configs within the budget."""

from __future__ import annotations

import random

from pydantic import Field

from .base import MethodParams, SearchContext


class UniformParams(MethodParams):
    """Uniform takes no options of its own: the bit choices are the configs."""


class RandomParams(MethodParams):
    count: int = Field(default=20, ge=1, description="configs drawn")


def uniform(ctx: SearchContext) -> None:
    """Every layer at the same (w, a); one candidate per combination of the choices."""
    combos = [(w, a) for w in ctx.options.w_bits for a in ctx.options.a_bits]
    for step, (w, a) in enumerate(combos):
        ctx.add_candidate(ctx.uniform_bits(w), ctx.uniform_bits(a), uniform=f"W{w}A{a}")
        ctx.report(step + 1, len(combos), "uniform")


def random_configs(ctx: SearchContext) -> None:
    """`count` configs drawn per layer from the choices, then lowered at random layers until they fit."""
    count = ctx.params.count
    rng = random.Random(ctx.options.seed)
    w_choices, a_choices = ctx.options.w_bits, ctx.options.a_bits
    names = ctx.layer_names
    attempts = 0
    while len(ctx.candidates) < count and attempts < 50 * count:
        attempts += 1
        w = {n: rng.choice(w_choices) for n in names}
        a = {n: rng.choice(a_choices) for n in names}
        while not ctx.fits(w, a):
            lowerable = [(n, "w") for n in names if w[n] > w_choices[0]] + [
                (n, "a") for n in names if a[n] > a_choices[0]
            ]
            n, kind = rng.choice(lowerable)  # non-empty: the budget is feasible at the minimum
            bits, choices = (w, w_choices) if kind == "w" else (a, a_choices)
            bits[n] = choices[choices.index(bits[n]) - 1]
        ctx.add_candidate(w, a, draw=attempts)
        ctx.report(len(ctx.candidates), count, "random")
