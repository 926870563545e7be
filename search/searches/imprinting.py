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
  variant    "faithful" (above) or "cost_aware": lower the layer with the least accuracy
             gain per unit of the budget's main cost saved.
  patience   stop once this many consecutive configs meet the budget without beating the best
             Acc_N among them (0 = run all N_max iterations, as in the thesis). Default 8.
  embedding  N, the target embedding length (default 256).
Only the layers downstream of the lowered one are recomputed (IncrementalRunner).

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

import torch
import torch.nn.functional as F

from ..finetune import STEFineTuner
from ..simulate import Simulator
from .base import SearchContext, SearchError


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


def imprint_accuracy(train_e: torch.Tensor, train_y: torch.Tensor, test_e: torch.Tensor, test_y: torch.Tensor,
                     num_classes: int) -> float:
    """Eqs. 2.15-2.16: class-mean imprinted weights, nearest class by dot product."""
    weights = torch.zeros(num_classes, train_e.shape[1])
    weights.index_add_(0, train_y, train_e)
    weights = F.normalize(weights, dim=1)
    return float(((test_e @ weights.T).argmax(1) == test_y).float().mean())


class LayerAccuracy:
    """acc_i for every layer under the simulator's current config, recomputing only what changed.

    `sim` defaults to the context's simulator; imprinting with fine-tuning passes one over the
    fine-tuned weights."""

    def __init__(self, ctx: SearchContext, embedding: int, sim: Simulator | None = None):
        calib = ctx.splits.calib
        if calib.labels is None:
            raise SearchError("imprinting needs a labelled calibration set")
        if ctx.model.static_batch and ctx.model.static_batch != len(calib):
            raise SearchError("imprinting needs a model exported with a dynamic batch dimension")
        half = len(calib) // 2
        self.imprint_y, self.score_y = calib.labels[:half], calib.labels[half:]
        self.half = half
        self.num_classes = int(calib.labels.max()) + 1
        self.embedding = embedding
        self.runner = (sim or ctx.sim).incremental(calib.inputs)
        self.names = ctx.layer_names
        self.acc: dict[str, float] = {}

    def update(self, changed: list[str] | None) -> list[float]:
        self.runner.run(changed)
        stale = self.names if changed is None else self.runner.affected_layers(changed)
        for name in stale:
            e = embed(self.runner.layer_output(name), self.embedding)
            self.acc[name] = imprint_accuracy(e[: self.half], self.imprint_y, e[self.half :], self.score_y,
                                              self.num_classes)
        return [self.acc[n] for n in self.names]


def imprinting_search(ctx: SearchContext) -> None:
    o = ctx.options
    variant = o.param("variant", "faithful")
    if variant not in ("faithful", "cost_aware"):
        raise SearchError(f"imprinting option variant must be 'faithful' or 'cost_aware', got {variant!r}")
    patience = o.param("patience", 8)
    validate_top = o.param("validate_top", 4)
    curve_points = o.param("curve_points", 6)
    names = ctx.layer_names
    if len(names) < 3:
        raise SearchError("imprinting needs at least 3 quantizable layers (the first and last are never lowered)")
    w_choices = o.w_bits
    a_bits = ctx.uniform_bits(max(o.a_bits))
    w_bits = ctx.uniform_bits(w_choices[-1])
    n_max = (len(w_choices) - 1) * (len(names) - 2) + 1
    embedding = o.param("embedding", 256)
    acc_model = LayerAccuracy(ctx, embedding)
    sim = ctx.sim  # the simulator the per-layer accuracies are measured on
    sim.apply(ctx.config(w_bits, a_bits))
    metric = ctx.pareto_metric
    tuner = STEFineTuner(ctx.model, ctx.sim.stats, ctx.finetune_set(), o.finetune, o.seed) \
        if o.finetune.enabled else None
    tuned_batches = 0

    trajectory = []  # (iteration, w_bits, Acc_N, fits, per-layer acc, fine-tuning meta)
    changed = None
    best_fit, since_best = -1.0, 0
    for it in range(n_max):
        if tuner is not None and changed is not None:
            # Algorithm 1: fine-tune under the lowered config, then measure on the fine-tuned weights.
            config = ctx.config(w_bits, a_bits)
            tuned_batches += tuner.fit(config, on_batch=lambda: ctx.tick(n_max, "fine-tune")).batches
            acc_model = None  # free the old runner's activations before the new one keeps its own
            sim = tuner.simulator()
            sim.apply(config)
            acc_model = LayerAccuracy(ctx, embedding, sim)
            changed = None  # every weight changed: recompute every layer
        acc = acc_model.update(changed)
        fits = ctx.fits(w_bits, a_bits)
        tuned = {}
        if tuner is not None and fits:  # the fine-tuned weights change at the next step: score them now
            tuned = {"finetuned_val_top1": sim.evaluate(ctx.config(w_bits, a_bits), ctx.val).top1,
                     "finetune_batches": tuned_batches}
        trajectory.append((it, dict(w_bits), acc[-1], fits, acc, tuned))
        if fits:
            if acc[-1] > best_fit:
                best_fit, since_best = acc[-1], 0
            else:
                since_best += 1
        ctx.report(it + 1, n_max, "imprint")
        lowerable = [i for i in range(1, len(names) - 1) if w_bits[names[i]] > w_choices[0]]
        if not lowerable or (patience and since_best >= patience):
            break
        diffs = {i: abs(acc[i] - acc[i - 1]) for i in lowerable}
        if variant == "cost_aware":
            base = getattr(ctx.cost(w_bits, a_bits), metric)

            def gain_per_cost(i):
                lowered = dict(w_bits)
                lowered[names[i]] = w_choices[w_choices.index(w_bits[names[i]]) - 1]
                saved = base - getattr(ctx.cost(lowered, a_bits), metric)
                return diffs[i] / saved if saved > 0 else math.inf

            idx = min(lowerable, key=lambda i: (gain_per_cost(i), i))
        else:
            idx = min(lowerable, key=lambda i: (diffs[i], i))
        name = names[idx]
        w_bits[name] = w_choices[w_choices.index(w_bits[name]) - 1]
        sim.set_layer(name, w_bits[name], a_bits[name], o.scheme, o.clip, o.act_calibration)
        changed = [name]

    # Score on the validation split: the best fitting configs by Acc_N, and a spread of the
    # fitting part of the path for the front (every config on the path is simulated already).
    fitting = [t for t in trajectory if t[3]]
    step = max(1, len(fitting) // max(curve_points, 1))
    for it, wb, acc_n, _, per_layer, tuned in sorted(fitting, key=lambda t: -t[2])[:validate_top] + fitting[::step]:
        ctx.add_candidate(wb, a_bits, score=acc_n, iteration=it, layer_accuracy=[round(a, 4) for a in per_layer],
                          **tuned)
    ctx.report(n_max, n_max, "validate")
