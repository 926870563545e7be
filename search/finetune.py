"""Quantization-aware fine-tuning with the straight-through estimator (docs/methods.md#ste-fine-tuning).

The searches that fine-tune (imprinting's Algorithm 1, HAQ's per-episode fine-tune) share this
one implementation:

- The trainable tensors are full-precision *shadow* copies of every quantizable layer's weight
  and bias (BatchNorm is already folded into them). Every other tensor of the graph stays fixed.
  The caller's `LoadedModel` is never modified: the shadow tensors are clones, and training runs
  on a Simulator's private copy of the graph.
- Forward: exactly the simulation of the current config. Weights are quantized from the shadow
  weights with `quantize_weight` (same bits, scheme and clipping, the scale re-derived at every
  step), the bias gets the same empirical bias correction the Simulator applies, and every
  layer input goes through its activation quantizer. Activation ranges and bias-correction
  means are the search's own calibration (of the caller's float model: `Simulator.stats`) and
  stay fixed: only the quantized network is trained, its float shadow drifts, and recalibrating
  on that float shadow would evaluate another network than the one that was trained.
- Backward: identity inside the clip range, zero outside it. For weights that is |w| <= T with T
  the layer's per-channel clipping threshold (binary weights have no clip: identity everywhere);
  for activations torch's fake-quantize gradient, which passes inside the calibrated range.
- Adam on the shadow tensors, cross-entropy on a labelled training set, minibatches in an order
  drawn from a generator seeded by the caller: the same seed and configs give the same weights.

`FineTuneOptions` is the option block `SearchOptions.finetune`; an epoch is one pass over the
training images used (`samples` of them, a seeded subset fixed for the whole search, or all).

After `fit()`, `simulator()` is a Simulator over the fine-tuned shadow weights with that same fixed
calibration, so it computes exactly the forward pass that was trained; a config's accuracy there is
"the config's simulated accuracy after fine-tuning". These weights are not part of a search's
result: a candidate's `val_top1` always refers to the caller's weights (see the searches).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .config import QuantConfig
from .data import LabelledSet
from .model import LoadedModel, set_param
from .quant.activation import ActStats
from .quant.bias_correction import output_shift
from .quant.weight import QuantizedWeight, quantize_weight
from .simulate import Simulator


class FineTuneError(ValueError):
    """Fine-tuning asked for but impossible: no labelled training set, a batch that cannot be formed."""


class FineTuneOptions(BaseModel):
    """STE fine-tuning (off unless `epochs` or `steps` is set). Used by `imprinting` (between its steps,
    Liu 2021 Algorithm 1; the thesis uses 4 epochs) and `haq` (per episode, before the reward)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=0, ge=0, description="passes over the training images per fine-tune (0 = off)")
    steps: int = Field(default=0, ge=0, description="if > 0, this many minibatches per fine-tune instead of epochs")
    samples: int | None = Field(
        default=None, ge=1, description="training images used (a seeded subset), None = the whole training split"
    )
    batch_size: int = Field(default=128, ge=1, le=65536)
    lr: float = Field(default=1e-4, gt=0, le=1.0, description="Adam learning rate on the shadow weights")

    @property
    def enabled(self) -> bool:
        return self.epochs > 0 or self.steps > 0


@dataclass
class FitReport:
    """What one fine-tune did: minibatches run and the mean training loss of the first and last epoch
    (the quantized network's loss, as it was while being trained)."""

    batches: int
    first_loss: float
    last_loss: float
    epoch_losses: list[float]


def training_set(train: LabelledSet | None, options: FineTuneOptions, seed: int) -> LabelledSet:
    """The labelled images fine-tuning uses: all of `train` or a subset drawn with `seed`."""
    if train is None or train.labels is None:
        raise FineTuneError(
            "fine-tuning needs a labelled training set (the built-in fashion-mnist has one; a data set file does not)"
        )
    if options.samples is not None and options.samples < len(train):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        train = train.subset(order[: options.samples])
    return train


def clip_threshold(q: QuantizedWeight) -> torch.Tensor:
    """The per-channel magnitude up to which the quantizer does not clip (inf for binary weights)."""
    if q.codebook is not None:
        return q.scale * q.codebook.abs().max()
    if q.bits == 1:
        return torch.full_like(q.scale, math.inf)
    return q.scale * ((1 << (q.bits - 1)) - 1)


def ste_weight(w: torch.Tensor, bits: int, scheme: str, clip: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward value, detached quantized weight): the value equals quantize_weight(w) and its gradient
    with respect to w is 1 where |w| <= T and 0 where the quantizer clips."""
    q = quantize_weight(w.detach(), bits, scheme, clip)
    w_q = q.dequantize()
    inside = w.detach().abs() <= clip_threshold(q).reshape(-1, *([1] * (w.dim() - 1)))
    return w_q + (w - w.detach()) * inside, w_q


class STEFineTuner:
    """Shadow weights of `model`'s quantizable layers, fine-tuned under successive configs.

    `model` is read once (its weights are cloned) and never modified; `stats` is the calibration every
    forward pass uses (a Simulator's `stats` for this model: activation ranges, bias-correction means).
    """

    def __init__(
        self, model: LoadedModel, stats: dict[str, ActStats], train: LabelledSet, options: FineTuneOptions, seed: int
    ):
        if not options.enabled:
            raise FineTuneError("fine-tuning is off (epochs and steps are 0)")
        self.model = model
        self.stats = stats
        self.train = train
        self.options = options
        self.seed = seed
        self.batch_size = model.static_batch or options.batch_size
        if model.static_batch and len(train) < model.static_batch:
            raise FineTuneError(
                f"the model was exported with a fixed batch of {model.static_batch}, "
                f"more than the {len(train)} training images"
            )
        self.weights = {l.name: model.weight(l.name).detach().clone().float() for l in model.layers}
        self.biases = {
            l.name: model.bias(l.name).detach().clone().float() for l in model.layers if model.bias(l.name) is not None
        }
        self.targets = {
            l.name: (
                model.layer_nodes[l.name].args[1].target,
                model.layer_nodes[l.name].args[2].target if l.name in self.biases else None,
            )
            for l in model.layers
        }
        self.fits = 0
        self._sim: Simulator | None = None

    # -- the fine-tuned network ------------------------------------------------------------------------
    def shadow_model(self) -> LoadedModel:
        """A private LoadedModel whose quantizable layers hold the shadow weights. It keeps the original's
        sha256 and layer names so that the search's configs apply to it; it never leaves the search."""
        with warnings.catch_warnings():  # torch's pytree deprecation noise on GraphModule copies
            warnings.simplefilter("ignore", FutureWarning)
            gm = copy.deepcopy(self.model.gm)
        for name, (w_target, b_target) in self.targets.items():
            set_param(gm, w_target, self.weights[name].clone())
            if b_target is not None:
                set_param(gm, b_target, self.biases[name].clone())
        return dataclasses.replace(self.model, gm=gm)

    def simulator(self) -> Simulator:
        """A Simulator over the current shadow weights and the fixed calibration (rebuilt after every fit)."""
        if self._sim is None:
            self._sim = Simulator(self.shadow_model(), None, stats=self.stats)
        return self._sim

    # -- training --------------------------------------------------------------------------------------
    def _forward(self, sim: Simulator, config: QuantConfig, x: torch.Tensor) -> torch.Tensor:
        overrides = {}
        for name, lq in config.layers.items():
            w_target, b_target = self.targets[name]
            w_ste, w_q = ste_weight(self.weights[name], lq.w_bits, lq.scheme, lq.clip)
            overrides[w_target] = w_ste
            if b_target is not None:
                b = self.biases[name]
                if config.bias_correction:  # the Simulator's correction, as a constant shift
                    layer = self.model.layer(name)
                    b = b - output_shift(w_q - self.weights[name].detach(), sim.stats[name].channel_mean, layer.groups)
                overrides[b_target] = b
        out = torch.func.functional_call(sim.gm, overrides, (x,))
        return out[0] if isinstance(out, (tuple, list)) else out

    def fit(self, config: QuantConfig, on_batch: Callable[[], None] | None = None) -> FitReport:
        """Fine-tune the shadow weights under `config` for `epochs` passes (or `steps` minibatches).

        The minibatch order is drawn from a generator seeded with (seed, number of earlier fits), so a
        given sequence of fits is reproducible. `on_batch` is called after every minibatch (progress)."""
        config.check_against(self.model)
        o = self.options
        sim = self.simulator()  # a private copy of the graph, with the fixed calibration
        sim.apply(config)  # sets the activation quantizers' ranges; the weights are overridden below
        for p in sim.gm.parameters():
            p.requires_grad_(False)
        params = [t.requires_grad_(True) for t in (*self.weights.values(), *self.biases.values())]
        opt = torch.optim.Adam(params, lr=o.lr)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.fits) % (1 << 63))
        n, bs = len(self.train), self.batch_size
        drop_last = self.model.static_batch is not None
        per_epoch = n // bs if drop_last else math.ceil(n / bs)
        total = o.steps if o.steps > 0 else o.epochs * per_epoch
        losses: list[list[float]] = []
        done = 0
        try:
            while done < total:
                order = torch.randperm(n, generator=gen)
                losses.append([])
                for start in range(0, per_epoch * bs, bs):
                    if done == total:
                        break
                    idx = order[start : start + bs]
                    logits = self._forward(sim, config, self.train.inputs[idx])
                    loss = nn.functional.cross_entropy(logits, self.train.labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses[-1].append(float(loss.detach()))
                    done += 1
                    if on_batch is not None:
                        on_batch()
        finally:
            for t in params:
                t.requires_grad_(False)
                t.grad = None
            self.fits += 1
            self._sim = None  # the weights changed: a new Simulator (fresh weight caches) on the next use
        means = [sum(e) / len(e) for e in losses if e]
        return FitReport(done, means[0] if means else math.nan, means[-1] if means else math.nan, means)


def finetuned_simulator(
    model: LoadedModel,
    stats: dict[str, ActStats],
    train: LabelledSet,
    options: FineTuneOptions,
    seed: int,
    config: QuantConfig,
    on_batch: Callable[[], None] | None = None,
) -> tuple[Simulator, FitReport]:
    """Fine-tune a fresh copy of `model`'s weights under `config`; a Simulator over the result."""
    tuner = STEFineTuner(model, stats, train, options, seed)
    report = tuner.fit(config, on_batch)
    return tuner.simulator(), report
