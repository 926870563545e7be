"""SQNR bit allocation (Lin, Talathi, Annapureddy, ICML 2016; REFERENCE.md section 4).

Quantization noise adds up at the output: 1/gamma_out = sum_i 1/gamma_i over every quantized
tensor. We measure gamma(layer, bits) for every layer's weights (and input activations when
their bits are searched) and then allocate bits two ways:

  exact     minimise sum_i 1/gamma_i(b_i) under every limit of the budget: a multiple-choice
            knapsack solved to optimality with scipy.optimize.milp (HiGHS);
  analytic  Lin et al.'s closed form with a per-tensor fit 10 log10 gamma_i = kappa_i * b + c_i:
            gamma_i* = gamma_min * (sum_j S_j / kappa_j) * kappa_i / S_i, rounded to the allowed
            bit choices, with gamma_min raised until the budget is met.

One addition to the paper: a tensor's noise does not reach the output unchanged. We measure,
per tensor, how much of it does (quantize that tensor alone at a reference width on a few
calibration images and compare output noise with tensor noise) and weigh 1/gamma_i by that
transfer factor. `propagation: "none"` gives the paper's unweighted sum.

Both modes sweep the budget's main limit from the cheapest config up to the given limit,
so one job yields a trade-off curve (a Pareto front) rather than one point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from ..cost import layer_costs, unquantized_bytes
from ..quant.activation import FLOAT_ACT_BITS
from ..quant.weight import sqnr_db
from .base import SearchContext, SearchError

ADDITIVE_METRICS = ("avg_wbits", "weight_bytes", "bitops", "latency_us")


@dataclass
class NoiseModel:
    """Relative output noise 1/gamma contributed by each layer's weights and input at each width."""

    w_noise: dict[str, dict[int, float]]
    a_noise: dict[str, dict[int, float]]

    def noise(self, layer: str, w_bits: int, a_bits: int) -> float:
        return self.w_noise[layer][w_bits] + self.a_noise[layer].get(a_bits, 0.0)

    def output_sqnr_db(self, w_bits: dict[str, int], a_bits: dict[str, int]) -> float:
        total = sum(self.noise(n, w_bits[n], a_bits[n]) for n in w_bits)
        return math.inf if total == 0 else -10 * math.log10(total)


def _transfer(ctx: SearchContext, x: torch.Tensor, ref: torch.Tensor, name: str, w_bits, a_bits) -> float:
    """Output noise per unit of tensor noise for one tensor quantized alone."""
    sim = ctx.sim
    sim.set_float()
    sim.set_layer(name, w_bits, a_bits, ctx.options.scheme, ctx.options.clip, ctx.options.act_calibration)
    out = sim.forward(x)
    sim.set_float()
    out_noise = 10 ** (-sqnr_db(ref, out) / 10)
    tensor_db = (sim.weight_sqnr_db(name, w_bits, ctx.options.scheme, ctx.options.clip) if w_bits is not None
                 else sim.activation_sqnr_db(name, a_bits, ctx.options.act_calibration))
    return out_noise / 10 ** (-tensor_db / 10)


def measure_noise(ctx: SearchContext, total_steps: int | None = None) -> NoiseModel:
    o = ctx.options
    propagation = o.param("propagation", "measured")
    if propagation not in ("measured", "none"):
        raise SearchError(f"sqnr option propagation must be 'measured' or 'none', got {propagation!r}")
    samples = o.param("propagation_samples", 256)
    x = ctx.splits.calib.inputs[:samples]
    ref = ctx.sim.float_logits(x)
    search_act = len(o.a_bits) > 1
    w_ref = min(o.w_bits, key=lambda b: abs(b - 4))
    a_ref = min((b for b in o.a_bits if b < FLOAT_ACT_BITS), key=lambda b: abs(b - 6), default=None)
    w_noise, a_noise = {}, {}
    for step, layer in enumerate(ctx.model.layers):
        name = layer.name
        w_db = {b: ctx.sim.weight_sqnr_db(name, b, o.scheme, o.clip) for b in o.w_bits}
        t_w = _transfer(ctx, x, ref, name, w_ref, None) if propagation == "measured" else 1.0
        w_noise[name] = {b: t_w * 10 ** (-db / 10) for b, db in w_db.items()}
        a_noise[name] = {}
        if search_act and a_ref is not None:
            t_a = _transfer(ctx, x, ref, name, None, a_ref) if propagation == "measured" else 1.0
            for b in o.a_bits:
                if b < FLOAT_ACT_BITS:
                    a_noise[name][b] = t_a * 10 ** (-ctx.sim.activation_sqnr_db(name, b, o.act_calibration) / 10)
        ctx.report(step + 1, total_steps or len(ctx.model.layers), "measure")
    return NoiseModel(w_noise, a_noise)


def _choices(ctx: SearchContext) -> list[tuple[int, int]]:
    return [(w, a) for w in ctx.options.w_bits for a in ctx.options.a_bits]


def solve_exact(ctx: SearchContext, noise: NoiseModel, limits: dict[str, float]) -> tuple[dict, dict] | None:
    """argmin sum 1/gamma subject to the limits; None when no config meets them."""
    layers = ctx.model.layers
    pairs = _choices(ctx)
    n_vars = len(layers) * len(pairs)
    c = np.zeros(n_vars)
    upper = np.ones(n_vars)
    rows, lbs, ubs = [], [], []
    metric_rows = {m: np.zeros(n_vars) for m in ADDITIVE_METRICS if m in limits}
    latency = ctx.latency if "latency_us" in limits else None
    for i, layer in enumerate(layers):
        one_hot = np.zeros(n_vars)
        for k, (w, a) in enumerate(pairs):
            j = i * len(pairs) + k
            c[j] = noise.noise(layer.name, w, a)
            one_hot[j] = 1
            share = layer_costs(ctx.model, layer, w, a, ctx.options.scheme, latency)
            for m, row in metric_rows.items():
                row[j] = share[m]
            if "act_bytes" in limits and share["act_bytes"] > limits["act_bytes"]:
                upper[j] = 0
        rows.append(one_hot)
        lbs.append(1)
        ubs.append(1)
    for m, row in metric_rows.items():
        limit = limits[m] - (unquantized_bytes(ctx.model) if m == "weight_bytes" else 0)
        rows.append(row)
        lbs.append(-np.inf)
        ubs.append(limit * (1 + 1e-9))
    res = milp(c, constraints=LinearConstraint(np.array(rows), lbs, ubs), integrality=np.ones(n_vars),
               bounds=Bounds(np.zeros(n_vars), upper), options={"mip_rel_gap": 0.0})
    if res.x is None:
        return None
    w_bits, a_bits = {}, {}
    for i, layer in enumerate(layers):
        k = int(np.argmax(res.x[i * len(pairs) : (i + 1) * len(pairs)]))
        w_bits[layer.name], a_bits[layer.name] = pairs[k]
    return w_bits, a_bits


@dataclass
class _Fit:
    kappa: float  # dB per bit
    c: float  # dB at zero bits, output-referred (transfer factor included)


def _fit(noise_by_bits: dict[int, float]) -> _Fit:
    bits = [b for b in noise_by_bits if b >= 3] or list(noise_by_bits)
    if len(bits) < 2:
        return _Fit(6.02, -10 * math.log10(noise_by_bits[bits[0]]) - 6.02 * bits[0])
    y = [-10 * math.log10(noise_by_bits[b]) for b in bits]
    kappa, c = np.polyfit(bits, y, 1)
    return _Fit(max(float(kappa), 0.5), float(c))


def _cost_per_bit(ctx: SearchContext, layer, metric: str, kind: str) -> float:
    """S_i: how much the main metric grows per bit of this tensor (from layer_costs, at the top widths)."""
    w_hi, a_hi = ctx.options.w_bits[-1], max(ctx.options.a_bits)
    latency = ctx.latency if metric == "latency_us" else None
    if kind == "w":
        lo_w = ctx.options.w_bits[0]
        if lo_w == w_hi:
            return 0.0
        hi = layer_costs(ctx.model, layer, w_hi, a_hi, ctx.options.scheme, latency)[metric]
        lo = layer_costs(ctx.model, layer, lo_w, a_hi, ctx.options.scheme, latency)[metric]
        return max((hi - lo) / (w_hi - lo_w), 0.0)
    a_choices = [b for b in ctx.options.a_bits if b < FLOAT_ACT_BITS]
    if len(a_choices) < 2:
        return 0.0
    hi = layer_costs(ctx.model, layer, w_hi, max(a_choices), ctx.options.scheme, latency)[metric]
    lo = layer_costs(ctx.model, layer, w_hi, min(a_choices), ctx.options.scheme, latency)[metric]
    return max((hi - lo) / (max(a_choices) - min(a_choices)), 0.0)


def _snap(value: float, choices: list[int]) -> int:
    return min(choices, key=lambda b: (abs(b - value), -b))


def analytic_allocation(ctx: SearchContext, noise: NoiseModel, gamma_min_db: float) -> tuple[dict, dict]:
    """Lin et al.'s closed form for one target output SQNR, rounded to the allowed widths."""
    metric = ctx.pareto_metric if ctx.pareto_metric != "act_bytes" else "avg_wbits"
    tensors = []  # (layer name, kind, fit, S)
    for layer in ctx.model.layers:
        tensors.append((layer.name, "w", _fit(noise.w_noise[layer.name]), _cost_per_bit(ctx, layer, metric, "w")))
        if noise.a_noise[layer.name]:
            tensors.append((layer.name, "a", _fit(noise.a_noise[layer.name]), _cost_per_bit(ctx, layer, metric, "a")))
    paid = [t for t in tensors if t[3] > 0]
    total = sum(s / f.kappa for _, _, f, s in paid)
    w_bits = {l.name: ctx.options.w_bits[-1] for l in ctx.model.layers}
    a_bits = {l.name: max(ctx.options.a_bits) for l in ctx.model.layers}
    for name, kind, fit, s in paid:
        gamma_db = gamma_min_db + 10 * math.log10(total * fit.kappa / s)
        bits = (gamma_db - fit.c) / fit.kappa
        if kind == "w":
            w_bits[name] = _snap(bits, ctx.options.w_bits)
        else:
            a_bits[name] = _snap(bits, [b for b in ctx.options.a_bits if b < FLOAT_ACT_BITS])
    return w_bits, a_bits


def _solve_analytic(ctx: SearchContext, noise: NoiseModel, limits: dict[str, float]) -> tuple[dict, dict] | None:
    """The largest target output SQNR whose rounded allocation meets the limits (bisection)."""
    def fits(alloc):
        cost = ctx.cost(*alloc)
        return all(getattr(cost, m) is None or getattr(cost, m) <= v * (1 + 1e-9) for m, v in limits.items())

    lo, hi = -40.0, 120.0
    if not fits(analytic_allocation(ctx, noise, lo)):
        return None
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(analytic_allocation(ctx, noise, mid)) else (lo, mid)
    return analytic_allocation(ctx, noise, lo)


def sweep_limits(ctx: SearchContext, points: int) -> list[dict[str, float]]:
    """The budget itself plus `points` looser-to-tighter values of its main limit down to the cheapest config."""
    limits = ctx.budget.limits()
    metric = ctx.pareto_metric
    o = ctx.options
    cheapest = getattr(ctx.cost(ctx.uniform_bits(o.w_bits[0]), ctx.uniform_bits(min(o.a_bits))), metric)
    top = limits[metric]
    values = [cheapest + (top - cheapest) * k / points for k in range(points)]
    return [limits] + [{**limits, metric: v} for v in values if v < top]


def sqnr_search(ctx: SearchContext) -> None:
    mode = ctx.options.param("mode", "exact")
    if mode not in ("exact", "analytic"):
        raise SearchError(f"sqnr option mode must be 'exact' or 'analytic', got {mode!r}")
    points = ctx.options.param("sweep_points", 6)
    sweep = sweep_limits(ctx, points)
    total = len(ctx.model.layers) + len(sweep)
    noise = measure_noise(ctx, total)
    solve = solve_exact if mode == "exact" else _solve_analytic
    for step, limits in enumerate(sweep, start=len(ctx.model.layers)):
        alloc = solve(ctx, noise, limits)
        if alloc is not None:
            ctx.add_candidate(*alloc, score=noise.output_sqnr_db(*alloc), mode=mode,
                              modelled_sqnr_db=noise.output_sqnr_db(*alloc), limit=limits[ctx.pareto_metric])
        ctx.report(step + 1, total, "allocate")
