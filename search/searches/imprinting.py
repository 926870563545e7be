"""Layer importance by imprinting (Liu, Elkerdawy, Ray, Elhoushi, CVPRW 2021; seed 002 Algorithm 2).

After every quantizable layer i we estimate how accurate the network would be if it ended
there: embed the layer's output (AdaptiveAvgPool to d x d with d = round(sqrt(N / C_i)),
flattened and L2-normalised; eq. 2.17), imprint one weight column per class as the
normalised mean embedding of that class on one half of the labelled calibration set
(eq. 2.15) and predict the other half by the largest dot product (eq. 2.16).

Algorithm 2: start with every layer at its highest width; each iteration measures acc_1..K,
takes diff_i = |acc_i - acc_{i-1}| for the layers between the first and the last, records the
current config with Acc_N = acc_K, and lowers the layer with the smallest diff by one width.
The recommended config is the one with the highest Acc_N that meets the budget.

Variants and speed-ups (options in `params`):
  variant    "noise_aware" (the default), "faithful" (Algorithm 2 as above) or "cost_aware".
             faithful lowers the layer that adds least; cost_aware the one with the least
             accuracy gain per unit of the budget's main cost saved. Neither asks what lowering a
             layer does to it, so on post-training quantization both drive the layers that add
             little straight to the lowest width (the thesis fine-tunes for hundreds of epochs
             afterwards). noise_aware lowers the layer with the least expected damage per unit
             cost saved, damage = importance x growth of the noise it puts on the output:
                 max(diff_i, 1/n_score) * t_i * (1/gamma_i(b - 1) - 1/gamma_i(b)) / cost saved,
             the cost saved summed over the budget's limits that are still broken, each as a
             fraction of its limit (all limits once the config fits),
             with diff_i from the imprinting curve and gamma_i the weight SQNR (cached per
             layer and width) and t_i the layer's transfer (see `pricing`): the network
             output's noise with the layer alone lowered to about 4 bits, over its weight
             noise growth (measured once;
             weight SQNR alone is flat across MobileNetV2's layers while their damage at the
             output differs 20x). A layer's next step costs about 4x its last, so the bits
             spread over the layers by importance instead of piling up. When activation bits
             are searched (more than one a_bits choice), lowering a layer's input activation
             is a move too, priced the same way with the activation's SQNR; the other variants
             keep every activation at the widest choice. The best configs that fit are then
             refilled: one lowering can overshoot the budget by a whole layer's cost, so inner
             layers are raised again, most profitable first, while the config still fits
             (`refill`), and the refilled configs are measured and validated too, as is the
             widest uniform config that fits (the recommendation never falls below it on the
             validation split).
  pricing    noise_aware: "both" (default), "own" or "transfer". "own" prices a weight move by the
             layer's own weight noise (t_i = 1), "transfer" by that noise times t_i, and "both"
             walks one path with each (the own-noise one first, then the transfer one) and
             validates the candidates of both: the own-noise path is the better one on
             resnet20-fmnist (0.25-0.32 points at 2-3 bits), the transfer path on depthwise
             mobilenetv2-fmnist (44% against 13% at 2.5 bits), and validation picks per model
             and budget (docs/methods.md#imprinting-noise-aware). With fine-tuning only one
             path is walked ("both" walks the own-noise one).
  refills    how many of the best fitting configs (by Acc_N) noise_aware refills. Default 2.
  remeasure  measure the per-layer curve every this many steps while the config is above the
             budget (configs that fit are always measured: they are the candidates). Default 1
             (every step, as in the thesis) for faithful and cost_aware, 0 (only the first,
             full-precision curve) for noise_aware: the path above the budget then needs no
             forward pass, which makes the search about 3x faster and, on resnet20-fmnist, more
             accurate (the importance of a layer is read off the unquantized network).
  patience   stop once this many consecutive configs meet the budget without beating the best
             Acc_N among them (0 = run all N_max iterations, as in the thesis). Default 8.
  se_floor   noise_aware: floor each importance at the standard error of the imprinting gain
             (off by default: it helps mobilenetv2-fmnist at 2.5 bits, costs resnet20-fmnist
             1.5 points there; docs/methods.md#imprinting-noise-aware).
  embedding  N, the target embedding length (default 256).
Only the layers downstream of the lowered one are recomputed (IncrementalRunner) while the
calibration set's intermediates fit in KEEP_ACTIVATIONS_BYTES; otherwise the images are streamed
and only the per-layer embeddings are kept.

Algorithm 1 fine-tuning (`SearchOptions.finetune`, off by default; the thesis uses 4 epochs):
after every bit lowering the quantized network is fine-tuned with the straight-through
estimator (search/finetune.py) on the training split, under the lowered config, before that
step's per-layer accuracies are measured. The full-precision shadow weights carry over from
step to step (step k's network has been fine-tuned k times, along the search's own path, each
time under the config of that step); the first config (every layer at its widest) is measured
on the original weights. The caller's model and the context's simulator are never modified.
Each step then recomputes every layer (all weights changed). Algorithm 1's "choose the model
with the best performance" among the fine-tune epochs is not done: the last epoch's weights go on.

What a candidate's numbers refer to, with fine-tuning on:
  val_top1, val_sqnr_db   the config applied to the CALLER's weights (post-training quantization),
                          like every other method, so configs, Pareto front, recommendation, pack
                          and validate all mean the same thing; the fine-tuned weights are not
                          part of the result.
  score                   Acc_N, the imprinted last-layer accuracy of the fine-tuned network.
  meta.finetuned_val_top1 the config's simulated top-1 on the validation images with the shadow
                          weights fine-tuned up to that step (what Algorithm 1 would report);
  meta.finetune_batches   the minibatches of fine-tuning those weights have had in total.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import fx

from ..finetune import STEFineTuner
from ..quant.activation import FLOAT_ACT_BITS
from ..simulate import Simulator
from .base import MethodParams, SearchContext, SearchError
from .widen import limit_fraction, refill


def embed(features: torch.Tensor, target_length: int) -> torch.Tensor:
    """Eq. 2.17: pool a [B, C, ...] feature map to about `target_length` values per sample, L2-normalised."""
    if features.dim() == 4:
        d = max(1, round(math.sqrt(target_length / features.shape[1])))
        e = F.adaptive_avg_pool2d(features, d).flatten(1)
    elif features.dim() == 3 and features.shape[1] * features.shape[2] > target_length:
        # conv1d maps and token sequences: pool the longer axis
        c = features.shape[1]
        e = F.adaptive_avg_pool1d(features, max(1, target_length // c)).flatten(1)
    else:
        e = features.flatten(1)
    return F.normalize(e, dim=1)


def imprint_accuracy(
    train_e: torch.Tensor, train_y: torch.Tensor, test_e: torch.Tensor, test_y: torch.Tensor, num_classes: int
) -> float:
    """Eqs. 2.15-2.16: class-mean imprinted weights, nearest class by dot product."""
    weights = torch.zeros(num_classes, train_e.shape[1])
    weights.index_add_(0, train_y, train_e)
    weights = F.normalize(weights, dim=1)
    return float(((test_e @ weights.T).argmax(1) == test_y).float().mean())


# Every intermediate tensor of the calibration images is kept between measurements (IncrementalRunner) only
# while they fit in this; beyond it (ImageNet-size inputs) the images are streamed in chunks, each layer's
# output embedded as it is computed and dropped, and every measurement is a full forward.
KEEP_ACTIVATIONS_BYTES = 3 << 30
STREAM_CHUNK_BYTES = 256 << 20  # intermediates of one streamed chunk, about


@torch.no_grad()
def sample_bytes(sim: Simulator, x: torch.Tensor) -> int:
    """Bytes of every intermediate tensor one sample of `x` creates in the simulated graph."""
    runner = sim.incremental(x[:1] if not sim.static_batch else x[: sim.static_batch])
    runner.run(None)
    total = sum(v.numel() * v.element_size() for v in runner.env.values() if isinstance(v, torch.Tensor))
    total -= sum(
        v.numel() * v.element_size()
        for n, v in runner.env.items()
        if n.op == "get_attr" and isinstance(v, torch.Tensor)
    )
    return total // len(runner.x)


class _LayerTap(fx.Interpreter):
    """Runs the graph freeing each value after its last use, handing every layer output to `sink`."""

    def __init__(self, gm: fx.GraphModule, layer_of: dict[fx.Node, str], sink):
        super().__init__(gm, garbage_collect_values=True)
        self.layer_of, self.sink = layer_of, sink

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.layer_of:
            self.sink(self.layer_of[n], out)
        return out


class StreamedLayers:
    """The per-layer embeddings and the network output of `x` under the simulator's current config,
    computed chunk by chunk: memory is the embeddings plus one chunk's working set, whatever N."""

    def __init__(self, sim: Simulator, x: torch.Tensor, embedding: int, per_sample: int):
        self.sim, self.x, self.embedding = sim, x, embedding
        nodes = {n.name: n for n in sim.gm.graph.nodes}
        self.layer_of = {nodes[node.name]: name for name, node in sim.model.layer_nodes.items()}
        self.chunk = sim.static_batch or max(1, min(len(x), STREAM_CHUNK_BYTES // max(per_sample, 1)))
        self.embeddings: dict[str, torch.Tensor] = {}
        self.out: torch.Tensor | None = None

    @torch.no_grad()
    def run(self) -> None:
        n_total = len(self.x)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self.layer_of.values()}
        outs = []
        for i in range(0, n_total, self.chunk):
            chunk = self.x[i : i + self.chunk]
            n = len(chunk)
            if self.sim.static_batch and n < self.chunk:
                chunk = torch.cat([chunk, chunk.new_zeros((self.chunk - n, *chunk.shape[1:]))])

            def keep(name: str, value: torch.Tensor, n: int = n) -> None:
                parts[name].append(embed(value, self.embedding)[:n])

            out = _LayerTap(self.sim.gm, self.layer_of, keep).run(chunk)
            outs.append((out[0] if isinstance(out, (tuple, list)) else out)[:n])
        self.embeddings = {name: torch.cat(p) for name, p in parts.items()}
        self.out = torch.cat(outs)


class LayerAccuracy:
    """acc_i for every layer under the simulator's current config, recomputing only what changed.

    `sim` defaults to the context's simulator; imprinting with fine-tuning passes one over the
    fine-tuned weights. While the calibration set's intermediate tensors fit in
    KEEP_ACTIVATIONS_BYTES they are kept and only the layers downstream of a change are rerun;
    otherwise (large inputs, or a graph that only runs at its export's fixed batch) the images are
    streamed and each measurement runs the whole graph, keeping only the embeddings."""

    def __init__(self, ctx: SearchContext, embedding: int, sim: Simulator | None = None):
        calib = ctx.splits.calib
        if calib.labels is None:
            raise SearchError("imprinting needs a labelled calibration set")
        sim = sim or ctx.sim
        half = len(calib) // 2
        self.imprint_y, self.score_y = calib.labels[:half], calib.labels[half:]
        self.half = half
        self.num_classes = int(calib.labels.max()) + 1
        self.embedding = embedding
        self.names = ctx.layer_names
        self.acc: dict[str, float] = {}
        per_sample = sample_bytes(sim, calib.inputs)
        static = bool(sim.static_batch) and sim.static_batch != len(calib)
        if static or per_sample * len(calib) > KEEP_ACTIVATIONS_BYTES:
            self.runner = None
            self.stream = StreamedLayers(sim, calib.inputs, embedding, per_sample)
        else:
            self.runner = sim.incremental(calib.inputs)
            self.stream = None

    def update(self, changed: list[str] | None) -> list[float]:
        if self.stream is not None:
            self.stream.run()
            stale, get = self.names, self.stream.embeddings.__getitem__
        else:
            self.runner.run(changed)
            stale = self.names if changed is None else self.runner.affected_layers(changed)
            get = lambda name: embed(self.runner.layer_output(name), self.embedding)  # noqa: E731
        for name in stale:
            e = get(name)
            self.acc[name] = imprint_accuracy(
                e[: self.half], self.imprint_y, e[self.half :], self.score_y, self.num_classes
            )
        return [self.acc[n] for n in self.names]


TRANSFER_SAMPLES = 64  # calibration images the output noise of each layer's quantization is measured on
TRANSFER_BITS = 4  # the weight width it is measured at (the nearest allowed one below the widest)


@torch.no_grad()
def output_transfer(
    ctx: SearchContext,
    sim: Simulator,
    layers: list[str],
    w_bits: dict[str, int],
    a_bits: dict[str, int],
    own_noise,
) -> dict[str, float]:
    """Per layer: the network output's noise (NMSE against the config `w_bits`/`a_bits`) when that
    layer alone is lowered to about TRANSFER_BITS, divided by the growth of its own weight noise.

    A layer's weight SQNR is nearly the same for every layer at a width (on mobilenetv2-fmnist 6-10 dB
    at 2 bits), but what the same weight noise does at the network output differs by more than 10x
    between layers (docs/methods.md#imprinting-noise-aware); this factor carries that difference."""
    o = ctx.options
    choices = [b for b in o.w_bits if b < o.w_bits[-1]]
    if not choices:
        return {}
    bits = min(choices, key=lambda b: (abs(b - TRANSFER_BITS), -b))
    x = ctx.splits.calib.inputs[:TRANSFER_SAMPLES]
    sim.apply(ctx.config(w_bits, a_bits))
    ref = sim.forward(x)
    power = float(ref.pow(2).mean())
    out = {}
    for name in layers:
        sim.set_layer(name, bits, a_bits[name], o.scheme, o.clip, o.act_calibration)
        noise = float((sim.forward(x) - ref).pow(2).mean()) / max(power, 1e-30)
        sim.set_layer(name, w_bits[name], a_bits[name], o.scheme, o.clip, o.act_calibration)
        growth = own_noise(name, bits) - own_noise(name, w_bits[name])
        out[name] = noise / growth if growth > 0 else math.nan
    # Relative factors (geometric mean 1), so weight moves stay on the scale of activation moves,
    # which are priced by the activation's own SQNR.
    logs = [math.log(t) for t in out.values() if t > 0]
    mean = math.exp(sum(logs) / len(logs)) if logs else 1.0
    return {n: t / mean if t > 0 else 1.0 for n, t in out.items()}


class ImprintingParams(MethodParams):
    variant: Literal["noise_aware", "faithful", "cost_aware"] = Field(
        default="noise_aware",
        description="noise_aware: importance x noise growth per unit of cost saved; "
        "faithful: Algorithm 2 as published; cost_aware: importance per unit of cost saved",
    )
    pricing: Literal["both", "own", "transfer"] = Field(
        default="both",
        description="noise_aware: a weight move's noise is the layer's own weight noise ('own'), that noise "
        "times the layer's measured transfer to the output ('transfer'), or one path with each ('both')",
    )
    patience: int = Field(default=8, ge=1, description="lowering steps without a better candidate before stopping")
    validate_top: int = Field(default=4, ge=0, description="fitting configs with the best estimate that are validated")
    curve_points: int = Field(default=6, ge=0, description="configs along the path that are validated")
    refills: int = Field(default=2, ge=0, description="best fitting configs widened with the leftover budget")
    embedding: int = Field(default=256, ge=1, description="features kept per layer for imprinting")
    se_floor: bool = Field(
        default=False,
        description="noise_aware: floor each layer's importance at the standard error of its imprinting gain",
    )
    remeasure: int | None = Field(
        default=None,
        ge=0,
        description="lowering steps between re-measured curves; default 0 (noise_aware: the float curve only) or 1",
    )


def imprinting_search(ctx: SearchContext) -> None:
    o = ctx.options
    params: ImprintingParams = ctx.params
    variant, patience, validate_top = params.variant, params.patience, params.validate_top
    curve_points, refills = params.curve_points, params.refills
    names = ctx.layer_names
    if len(names) < 3:
        raise SearchError("imprinting needs at least 3 quantizable layers (the first and last are never lowered)")
    w_choices = o.w_bits
    a_choices = o.a_bits  # searched by noise_aware only; the other variants keep the widest
    a_bits0 = ctx.uniform_bits(a_choices[-1])
    w_bits0 = ctx.uniform_bits(w_choices[-1])
    a_steps = len(a_choices) - 1 if variant == "noise_aware" else 0
    n_max = (len(w_choices) - 1 + a_steps) * (len(names) - 2) + 1
    embedding = params.embedding
    acc_model = LayerAccuracy(ctx, embedding)
    sim = ctx.sim  # the simulator the per-layer accuracies are measured on
    metric = ctx.pareto_metric
    tuner = (
        STEFineTuner(ctx.model, ctx.sim.stats, ctx.finetune_set(), o.finetune, o.seed) if o.finetune.enabled else None
    )
    tuned_batches = 0
    noise_aware = variant == "noise_aware" and tuner is None  # the variant with its refill and uniform candidate
    pricings = ["own"]
    if variant == "noise_aware":
        pricings = ["own", "transfer"] if params.pricing == "both" else [params.pricing]
        # With fine-tuning every step costs a fine-tune: one path, 'both' walking the own-noise one.
        pricings = pricings[:1] if tuner is not None else pricings

    @cache
    def own_weight_noise(name: str, bits: int) -> float:
        return 10 ** (-ctx.sim.weight_sqnr_db(name, bits, o.scheme, o.clip) / 10)

    @cache
    def act_noise(name: str, bits: int) -> float:
        return (
            0.0 if bits >= FLOAT_ACT_BITS else 10 ** (-ctx.sim.activation_sqnr_db(name, bits, o.act_calibration) / 10)
        )

    n_score = len(acc_model.score_y)

    def importance(curve: list[float], i: int) -> float:
        """|acc_i - acc_(i-1)|, never below one scored image and, with se_floor, never below the
        standard error of that difference on the scored half."""
        p, q = curve[i], curve[i - 1]
        se = math.sqrt((p * (1 - p) + q * (1 - q)) / n_score) if params.se_floor else 0.0
        return max(abs(p - q), se, 1.0 / n_score)

    inner = range(1, len(names) - 1)  # the layers Algorithm 2 may change
    remeasure = params.remeasure if params.remeasure is not None else (0 if variant == "noise_aware" else 1)
    steps_done = 0  # progress over every path

    def walk(noise_of: dict) -> tuple[list, tuple[dict, dict]]:
        """Algorithm 2's path from the widest config, moves priced by `noise_of` (noise_aware).
        Returns the trajectory (iteration, w_bits, a_bits, Acc_N, fits, per-layer acc, fine-tuning
        meta; its first curve is the full-precision one) and the config the path ended at."""
        nonlocal acc_model, sim, tuned_batches, steps_done
        w_bits, a_bits = w_bits0, a_bits0
        sim.apply(ctx.config(w_bits, a_bits))
        trajectory = []
        changed = None
        pending: list[str] = []  # layers lowered since the curve was last measured
        best_fit, since_best = -1.0, 0
        for it in range(n_max):
            fits = ctx.fits(w_bits, a_bits)
            if changed is not None and tuner is None and not fits and (remeasure == 0 or it % remeasure):
                pending += changed  # above the budget and not due: go on with the last curve
            else:
                if tuner is not None and changed is not None:
                    # Algorithm 1: fine-tune under the lowered config, then measure on the fine-tuned weights.
                    config = ctx.config(w_bits, a_bits)
                    tuned_batches += tuner.fit(config, on_batch=lambda: ctx.tick(n_max, "fine-tune")).batches
                    acc_model = None  # free the old runner's activations before the new one keeps its own
                    sim = tuner.simulator()
                    sim.apply(config)
                    acc_model = LayerAccuracy(ctx, embedding, sim)
                    changed = None  # every weight changed: recompute every layer
                acc = acc_model.update(None if changed is None else pending + changed)
                pending = []
                tuned = {}
                if tuner is not None and fits:  # the fine-tuned weights change at the next step: score them now
                    tuned = {
                        "finetuned_val_top1": sim.evaluate(ctx.config(w_bits, a_bits), ctx.val).top1,
                        "finetune_batches": tuned_batches,
                    }
                trajectory.append((it, w_bits, a_bits, acc[-1], fits, acc, tuned))
                if fits:
                    if acc[-1] > best_fit:
                        best_fit, since_best = acc[-1], 0
                    else:
                        since_best += 1
            steps_done += 1
            ctx.report(min(steps_done, n_max * len(pricings)), n_max * len(pricings), "imprint")
            moves = [(i, "w") for i in inner if w_bits[names[i]] > w_choices[0]]
            if "a" in noise_of:
                moves += [(i, "a") for i in inner if a_bits[names[i]] > a_choices[0]]
            if not moves or (patience and since_best >= patience):
                break
            diffs = {i: abs(acc[i] - acc[i - 1]) for i, _ in moves}
            weights = {i: importance(acc, i) for i, _ in moves}

            def lowered(move, w_bits=w_bits, a_bits=a_bits):
                """(w_bits, a_bits) with the move made."""
                i, kind = move
                bits, choices = (w_bits, w_choices) if kind == "w" else (a_bits, a_choices)
                new = dict(bits)
                new[names[i]] = choices[choices.index(bits[names[i]]) - 1]
                return (new, a_bits) if kind == "w" else (w_bits, new)

            current = ctx.cost(w_bits, a_bits)
            if variant == "noise_aware":
                # The saving on every limit still broken (all of them once the config fits): with bitops
                # and avg_wbits limits, lowering an activation pays for itself only while BitOPs are over.
                limits = ctx.budget.limits()
                over = [m for m, v in limits.items() if getattr(current, m) > v] or list(limits)

                def damage_per_cost(move, w_bits=w_bits, a_bits=a_bits, weights=weights, current=current):
                    i, kind = move
                    wb, ab = lowered(move)
                    new_bits, old_bits = (wb, w_bits) if kind == "w" else (ab, a_bits)
                    name = names[i]
                    growth = noise_of[kind](name, new_bits[name]) - noise_of[kind](name, old_bits[name])
                    cost_saved = limit_fraction(current, ctx.cost(wb, ab), limits, over)
                    return weights[i] * growth / cost_saved if cost_saved > 0 else math.inf

                move = min(moves, key=lambda m: (damage_per_cost(m), m))
            elif variant == "cost_aware":

                def gain_per_cost(move, current=current, diffs=diffs):
                    saved = getattr(current, metric) - getattr(ctx.cost(*lowered(move)), metric)
                    return diffs[move[0]] / saved if saved > 0 else math.inf

                move = min(moves, key=lambda m: (gain_per_cost(m), m))
            else:
                move = min(moves, key=lambda m: (diffs[m[0]], m))
            w_bits, a_bits = lowered(move)
            name = names[move[0]]
            sim.set_layer(name, w_bits[name], a_bits[name], o.scheme, o.clip, o.act_calibration)
            changed = [name]
        return trajectory, (w_bits, a_bits)

    to_score = []  # (iteration, w_bits, a_bits, Acc_N, fits, per-layer acc, meta), in the order they are scored
    for pricing in pricings:
        weight_noise = own_weight_noise
        if pricing == "transfer":
            transfer = output_transfer(ctx, sim, [names[i] for i in inner], w_bits0, a_bits0, own_weight_noise)

            def weight_noise(name: str, bits: int, transfer=transfer) -> float:
                return transfer.get(name, 1.0) * own_weight_noise(name, bits)

        noise_of = {"w": weight_noise, "a": act_noise} if a_steps else {"w": weight_noise}  # the kinds of move
        trajectory, at = walk(noise_of)
        curve0 = trajectory[0][5]
        fitting = [t for t in trajectory if t[4]]
        best = sorted(fitting, key=lambda t: -t[3])[:validate_top]
        if noise_aware:
            # One lowering can overshoot the budget by a whole layer's cost: give what is left back to
            # the layers that profit most, then measure the refilled configs like the path's.
            layer_weight = {names[i]: importance(curve0, i) for i in inner}
            for t in best[:refills]:
                wb, ab = refill(ctx, t[1], t[2], layer_weight, noise_of)
                if (wb, ab) == (t[1], t[2]):
                    continue
                diff = [n for n in names if (wb[n], ab[n]) != (at[0][n], at[1][n])]
                for n in diff:
                    sim.set_layer(n, wb[n], ab[n], o.scheme, o.clip, o.act_calibration)
                acc = acc_model.update(diff)
                at = (wb, ab)
                best.append((t[0], wb, ab, acc[-1], True, acc, {"refilled": True, "pricing": pricing}))
        # The best fitting configs by Acc_N (and their refills), and a spread of the fitting part of the
        # path for the front (every config on the path is simulated).
        step = max(1, len(fitting) // max(curve_points, 1))
        meta = {"pricing": pricing} if variant == "noise_aware" else {}
        to_score += [(*t[:6], {**meta, **t[6]}) for t in best] + [(*t[:6], {**meta, **t[6]}) for t in fitting[::step]]

    if noise_aware:
        # The widest uniform config that fits is measured and validated too: the path's importances
        # are read off imprinted class means, which can rank layers by noise (docs/methods.md,
        # #imprinting-noise-aware), and a recommendation worse than uniform is of no use to anyone.
        for b in reversed(w_choices):
            wb = ctx.uniform_bits(b)
            if ctx.fits(wb, a_bits0):
                sim.apply(ctx.config(wb, a_bits0))
                acc = acc_model.update(None)
                to_score.append((None, wb, a_bits0, acc[-1], True, acc, {"uniform": True}))
                break

    # Scored on the validation split; the recommendation is the best there, whichever path found it.
    for it, wb, ab, acc_n, _, per_layer, meta in to_score:
        ctx.add_candidate(wb, ab, score=acc_n, iteration=it, layer_accuracy=[round(a, 4) for a in per_layer], **meta)
    ctx.report(n_max * len(pricings), n_max * len(pricings), "validate")
