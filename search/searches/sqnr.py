"""SQNR bit allocation (Lin, Talathi, Annapureddy, ICML 2016; docs/methods.md#sqnr-allocation).

Quantization noise adds up at the output: 1/gamma_out = sum_i 1/gamma_i over every quantized
tensor. We measure gamma(layer, bits) for every layer's weights (and input activations when
their bits are searched) and then allocate bits two ways:

  exact     minimise sum_i 1/gamma_i(b_i) under every limit of the budget: a multiple-choice
            knapsack solved to optimality with scipy.optimize.milp (HiGHS);
  analytic  Lin et al.'s closed form with a per-tensor fit 10 log10 gamma_i = kappa_i * b + c_i:
            gamma_i* = gamma_min * (sum_j S_j / kappa_j) * kappa_i / S_i, rounded to the allowed
            bit choices, with gamma_min raised until the budget is met.

Additions to the paper, chosen by `propagation`:

  features  (default) a tensor's noise is measured where it lands, not where it starts: quantize
            that tensor alone at each width on a few calibration images and take the noise
            (1/SQNR) it causes at every layer output, averaged over the layers, plus
            `output_weight` times the noise at the network output. Each layer's own SQNR
            misjudges deep and shortcut layers at low widths; their damage downstream does not
            (the sensitivity Sony MCT's mixed precision measures).
  measured  per tensor, how much of its noise reaches the output at one reference width (a
            transfer factor) weighs 1/gamma_i.
  none      the paper's unweighted sum.

With `features`, the allocation at the budget is then re-linearised (`relinearize` rounds):
the damage is measured again with the other layers at the solution's widths rather than
unquantized (at 2-3 bits the layers' noise does not add up independently), and the program is
solved again; every round's allocation is a candidate, so validation picks between them.
Every allocation finally spends what its widths leave of the budget (widen.refill): while a layer
can be widened within the limits, the widening that removes most noise per unit of cost is taken.
Rounding (analytic) or ties (exact, where 64 images measure two widths alike) leave some.

Both modes sweep the budget's main limit from the cheapest config up to the given limit,
so one job yields a trade-off curve (a Pareto front) rather than one point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import Bounds, LinearConstraint, milp

from ..cost import LIMIT_SLACK, layer_costs, within
from ..measurement import CHUNK_WORK, DamagePass, chunk_layers
from ..quant.activation import FLOAT_ACT_BITS
from ..quant.weight import sqnr_db
from ..simulate import SuffixRunner
from .base import MethodParams, SearchContext
from .widen import refill

ADDITIVE_METRICS = ("avg_wbits", "weight_bytes", "bitops", "latency_us")
# A measurement pass (every tensor at every measured width, its suffix re-run on every image) may cost this much
# (in MACs, search.simulate.layer_work; about 25 s on 2 cores) before the defaults measure fewer images (down to
# MIN_SAMPLES) and then fewer widths. The reference 28x28 models stay well within it (64 images, every width).
MEASURE_WORK = 4e12
MIN_SAMPLES = 8
SWEEP_WORK = 1e12  # scoring one allocation below the budget (about 6 s on 2 cores), before fewer images score it
FIT_ABOVE = 4  # with fitted widths, the widths measured are those up to this and the widest


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
    tensor_db = (
        sim.weight_sqnr_db(name, w_bits, ctx.options.scheme, ctx.options.clip)
        if w_bits is not None
        else sim.activation_sqnr_db(name, a_bits, ctx.options.act_calibration)
    )
    return out_noise / 10 ** (-tensor_db / 10)


class SqnrParams(MethodParams):
    mode: Literal["exact", "analytic"] = Field(
        default="exact", description="exact: the MILP on the measured tables; analytic: the paper's closed form"
    )
    propagation: Literal["features", "measured", "none"] = Field(
        default="features",
        description="where a tensor's noise is measured: at every layer output (features), "
        "at the network output (measured), or the tensor's own SQNR (none)",
    )
    sweep_points: int = Field(default=6, ge=0, description="extra allocations below the budget, each a candidate")
    sweep_samples: int | None = Field(
        default=None,
        ge=1,
        description="validation images the allocations below the budget are scored on; default all of them, "
        f"fewer (at least 100) where one scoring would cost over {SWEEP_WORK:.0e} MACs",
    )
    relinearize: int = Field(default=2, ge=0, description="features: rounds re-measured around the allocation")
    output_weight: float = Field(default=2.0, ge=0, description="features: weight of the network output's noise")
    propagation_samples: int | None = Field(
        default=None,
        ge=1,
        description="calibration images the noise is measured on; default 256 (measured), and for features 64, "
        f"fewer (down to {MIN_SAMPLES}) where a measurement pass would cost over {MEASURE_WORK:.0e} MACs",
    )
    fitted_widths: bool | None = Field(
        default=None,
        description=f"features: measure only the widths up to {FIT_ABOVE} bits and the widest, the others "
        "scaled by the tensor's own noise; default: where a pass would still cost over the MAC budget",
    )
    measure_chunks: int | None = Field(
        default=None,
        ge=1,
        description="features: chunks of layers each measurement pass is split into (the unit spread over "
        f"workers and kept for a resume); default: chunks of about {CHUNK_WORK:.0e} MACs of work",
    )

    def samples(self) -> int:
        if self.propagation_samples is not None:
            return self.propagation_samples
        return 64 if self.propagation == "features" else 256


def _nmse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((out - ref) ** 2).sum() / (ref**2).sum().clamp_min(1e-30))


def _non_increasing(noise_by_bits: dict[int, float]) -> dict[int, float]:
    """A wider tensor is never modelled noisier than a narrower one (64 images can say otherwise)."""
    out, running = {}, 0.0
    for b in sorted(noise_by_bits, reverse=True):
        running = max(running, noise_by_bits[b])
        out[b] = running
    return out


def _widths(ctx: SearchContext, fit: bool) -> tuple[list[int], list[int]]:
    """The weight and activation widths measured; with `fit` the middle ones are left to the fit (_fill)."""
    o = ctx.options
    a = [b for b in o.a_bits if b < FLOAT_ACT_BITS] if len(o.a_bits) > 1 else []
    if not fit:
        return list(o.w_bits), a
    return [b for b in o.w_bits if b <= FIT_ABOVE or b == o.w_bits[-1]], [b for b in a if b <= FIT_ABOVE or b == a[-1]]


def measurement_plan(ctx: SearchContext, runner: SuffixRunner) -> tuple[int, bool]:
    """(images, fitted widths) for the damage measurement: the params where given, else within MEASURE_WORK."""
    params: SqnrParams = ctx.params
    suffix = runner.suffix_work()

    def cost(samples: int, fit: bool) -> float:
        w, a = _widths(ctx, fit)
        return samples * (len(w) + len(a)) * sum(suffix.values())

    available = len(ctx.splits.calib)
    if params.propagation_samples is not None:
        samples = params.propagation_samples
    else:
        samples = max(min(64, int(MEASURE_WORK // max(cost(1, False), 1))), MIN_SAMPLES)
    fit = params.fitted_widths if params.fitted_widths is not None else cost(samples, False) > MEASURE_WORK
    return min(samples, available), fit


def _fill(table: dict[int, float], own: dict[int, float]) -> dict[int, float]:
    """Damage at the widths not measured, from the nearest measured one below them. Beyond FIT_ABOVE bits a
    tensor's noise passes through the network linearly, so its damage, counted from the widest width's (the
    table's 0 after the shift), scales with the tensor's own noise counted the same way (`own`, 1/SQNR of the
    weights or input at each width)."""
    out = dict(table)
    top = max(table)
    for b in own:
        if b in table:
            continue
        ref = max((m for m in table if m < b), default=min(table))
        excess = own[ref] - own[top]
        share = max((own[b] - own[top]) / excess, 0.0) if excess > 0 else 1.0
        out[b] = table[top] + share * (table[ref] - table[top])
    return out


def damage_pass(
    ctx: SearchContext, base_w: dict[str, int | None], base_a: dict[str, int | None]
) -> tuple[DamagePass, bool]:
    """The pass that measures every tensor's damage with the others at base_w / base_a (None: float), and
    whether the widths it leaves out are to be fitted."""
    meter = ctx.damage_meter()
    samples, fit = measurement_plan(ctx, meter.runner)
    w_widths, a_widths = _widths(ctx, fit)
    params: SqnrParams = ctx.params
    work = meter.runner.suffix_work()
    total_work = sum(work.values()) * samples * (len(w_widths) + len(a_widths))
    count = params.measure_chunks or math.ceil(total_work / CHUNK_WORK)
    damage = DamagePass(
        identity=ctx.measurement_identity(),
        samples=samples,
        w_widths=w_widths,
        a_widths=a_widths,
        base_w=dict(base_w),
        base_a=dict(base_a),
        chunks=chunk_layers(ctx.layer_names, work, count),
    )
    return damage, fit


def measure_damage(
    ctx: SearchContext,
    base_w: dict[str, int | None],
    base_a: dict[str, int | None],
    progress: tuple[int, int] | None = None,
) -> NoiseModel:
    """Noise each tensor causes downstream at each width, the others at base_w / base_a (None: float).

    The damage of a config is the mean noise (1/SQNR) over every layer output plus
    `output_weight` x the noise of the network output, against the unquantized network; a
    tensor's entry is how much changing it alone changes that damage, shifted so its least is
    (nearly) 0: each layer takes one choice, so a per-layer constant does not move the allocation.

    The sums come from a measurement pass (search/measurement.py): chunks of layers, computed here or spread
    over workers, and reused wherever a pass with the same key was measured before.
    """
    names = ctx.layer_names
    output_weight = ctx.params.output_weight
    p, fit = damage_pass(ctx, base_w, base_a)

    def on_chunk(done: int, total: int) -> None:
        if progress is not None:
            ctx.report(progress[0] + done * len(names) // total, progress[1], "measure")

    results = ctx.measurements.run(p, ctx.damage_meter(), on_chunk)
    base_total = results[0]["base_total"]
    entries = {k: v for r in results for k, v in r["entries"].items()}

    def damage(n: str, kind: str, b: int) -> float:
        changed, out = entries[f"{n}|{kind}|{b}"]
        return (base_total + changed) / len(names) + output_weight * out

    w_noise, a_noise = {}, {}
    for n in names:
        w_noise[n] = {b: damage(n, "w", b) for b in p.w_widths}
        a_noise[n] = {b: damage(n, "a", b) for b in p.a_widths}
    for table, kind in ((w_noise, "w"), (a_noise, "a")):
        for n in names:
            if not table[n]:
                continue
            least = min(table[n].values())
            table[n] = {b: v - least + 1e-12 for b, v in _non_increasing(table[n]).items()}
            if fit:
                table[n] = _non_increasing(_fill(table[n], _own_noise(ctx, n, kind)))
    return NoiseModel(w_noise, a_noise)


def _own_noise(ctx: SearchContext, name: str, kind: str) -> dict[int, float]:
    """1/SQNR of a layer's weights (or input) at each allowed width: what the fit scales the damage by."""
    o, sim = ctx.options, ctx.sim
    if kind == "w":
        return {b: 10 ** (-sim.weight_sqnr_db(name, b, o.scheme, o.clip) / 10) for b in o.w_bits}
    return {b: 10 ** (-sim.activation_sqnr_db(name, b, o.act_calibration) / 10) for b in o.a_bits if b < FLOAT_ACT_BITS}


def measure_noise(ctx: SearchContext, total_steps: int | None = None) -> NoiseModel:
    o = ctx.options
    propagation = ctx.params.propagation
    if propagation == "features":
        top_a = max(o.a_bits)
        base_a = {n: None if top_a >= FLOAT_ACT_BITS else top_a for n in ctx.layer_names}
        return measure_damage(
            ctx, {n: None for n in ctx.layer_names}, base_a, (0, total_steps or len(ctx.model.layers))
        )
    x = ctx.splits.calib.inputs[: ctx.params.samples()]
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
        limit = limits[m] - (ctx.model.unquantized_bytes if m == "weight_bytes" else 0)
        rows.append(row)
        lbs.append(-np.inf)
        ubs.append(limit * (1 + LIMIT_SLACK))
    res = milp(
        c,
        constraints=LinearConstraint(np.array(rows), lbs, ubs),
        integrality=np.ones(n_vars),
        bounds=Bounds(np.zeros(n_vars), upper),
        options={"mip_rel_gap": 0.0},
    )
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
        return within(ctx.cost(*alloc), limits)

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
    params: SqnrParams = ctx.params
    mode, propagation, points = params.mode, params.propagation, params.sweep_points
    rounds = params.relinearize if propagation == "features" else 0
    sweep = sweep_limits(ctx, points)
    layers = len(ctx.model.layers)
    total = layers * (1 + rounds) + len(sweep)
    with ctx.phase("measure"):
        noise = measure_noise(ctx, total)
    ctx.sensitivity = sensitivity_tables(ctx, noise, propagation)

    def solve(model: NoiseModel, limits: dict[str, float]) -> tuple[dict, dict] | None:
        with ctx.phase("solve"):
            return (solve_exact if mode == "exact" else _solve_analytic)(ctx, model, limits)

    sweep_samples = params.sweep_samples
    if sweep_samples is None:
        sweep_samples = max(100, int(SWEEP_WORK // ctx.sim.work_per_sample))

    def allocate(model: NoiseModel, limits: dict[str, float], samples=None, **meta) -> tuple[dict, dict] | None:
        alloc = solve(model, limits)
        if alloc is None:
            return None
        noise_of = {"w": lambda n, b: model.w_noise[n][b]}
        if len(ctx.options.a_bits) > 1:
            noise_of["a"] = lambda n, b: model.a_noise[n].get(b, 0.0)
        with ctx.phase("solve"):
            alloc = refill(ctx, *alloc, {n: 1.0 for n in ctx.layer_names}, noise_of, limits)
        modelled = noise.output_sqnr_db(*alloc)  # every round scored by the same (first) model
        cand = ctx.add_candidate(
            *alloc,
            score=modelled,
            samples=samples,
            mode=mode,
            modelled_sqnr_db=modelled,
            limit=limits[ctx.pareto_metric],
            **meta,
        )
        if cand is not None and "relinearized" in meta:  # a round that reached an allocation found before
            cand.meta.setdefault("relinearized", meta["relinearized"])
        return alloc

    for step, limits in enumerate(sweep):
        alloc = allocate(noise, limits, None if step == 0 else sweep_samples)
        if step == 0:
            at_budget = alloc  # the budget itself: the allocation the rounds below re-linearise
        ctx.report(layers + step + 1, total, "allocate")
    seen = [at_budget]
    for r in range(rounds):
        if at_budget is None:
            break
        with ctx.phase("relinearize"):
            around = measure_damage(ctx, *at_budget, (layers * (1 + r) + len(sweep), total))
        at_budget = allocate(around, sweep[0], relinearized=r + 1)
        if at_budget in seen:  # a fixed point: more rounds give the same allocation
            break
        seen.append(at_budget)
    ctx.report(total, total, "allocate")


SENSITIVITY_TEXT = {
    "features": "damage: the mean noise (1/SQNR) at every layer output plus output_weight x the network "
    "output's, caused by quantizing this tensor alone at that width, less its least over the widths",
    "measured": "the tensor's own noise (1/SQNR) at that width, times how much of it reaches the output",
    "none": "the tensor's own noise (1/SQNR) at that width",
}


def sensitivity_tables(ctx: SearchContext, noise: NoiseModel, propagation: str) -> dict:
    """The first noise model as a per-layer report (search/sensitivity.py adds the widths chosen)."""
    return {
        "method": "sqnr",
        "propagation": propagation,
        "quantity": SENSITIVITY_TEXT[propagation],
        "layers": [
            {
                "name": l.name,
                "op": l.op,
                "params": l.params,
                "macs": l.macs,
                "weight": {str(b): v for b, v in noise.w_noise[l.name].items()},
                "activation": {str(b): v for b, v in noise.a_noise[l.name].items()},
            }
            for l in ctx.model.layers
        ],
    }
