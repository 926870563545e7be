"""A config handed over to torchao: its per-module configuration applied to the user's float model.

Each layer's weight width becomes torchao's IntxWeightOnlyConfig(int<b>, per output channel) on the module of
the same name (a config's layer names are the modules' names, as the model was exported), collected in one
FqnToConfig, so torchao quantizes each layer at the width the search chose. What torchao cannot take:

  1-bit weights   torchao's int1 is the range [-1, 0]: it has no binary (+-1 x mean|w|) form.
  pot / apot      torchao has no power-of-two codebook weights.
  input widths    torchao's CPU configs quantize activations dynamically (per token, int8), not to the
                  simulation's calibrated per-tensor ranges, so activations stay float here.

torchao computes its own scales (max |w| per channel, codes in [-2^(b-1), 2^(b-1)-1]) on the unfolded model
(BatchNorm still separate), where the simulation uses its clipping threshold (MSE by default) on the folded
weights and corrects biases: compare torchao's accuracy with the simulation's of the same weight widths with
float activations (hand_over's report does).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from search.config import ConfigError, QuantConfig

SUPPORTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class Handover:
    module: nn.Module  # a quantized copy of the float model
    applied: dict[str, int] = field(default_factory=dict)  # layer -> weight bits torchao quantized it to
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it stayed float


def skip_reason(w_bits: int, scheme: str) -> str | None:
    if scheme != "uniform":
        return f"{scheme} weights: torchao has no power-of-two codebook weights"
    if w_bits == 1:
        return "1-bit weights: torchao's int1 is the range [-1, 0], it has no binary (+-1) form"
    return None


def hand_over(float_model: nn.Module, config: QuantConfig) -> Handover:
    """A copy of `float_model` with each layer's weights quantized by torchao at the config's width."""
    from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis

    module = copy.deepcopy(float_model).eval()
    names = dict(module.named_modules())
    unknown = [name for name in config.layers if not isinstance(names.get(name), SUPPORTED_MODULES)]
    if len(unknown) == len(config.layers):
        raise ConfigError(
            "none of the config's layers is a Linear or Conv module of this model; torchao needs the float model "
            f"the .pt2 was exported from (config layers: {list(config.layers)[:5]}...)"
        )
    out = Handover(module)
    for name, lq in config.layers.items():
        if name in unknown:
            out.skipped[name] = "no Linear or Conv module of this name in the model"
        elif (reason := skip_reason(lq.w_bits, lq.scheme)) is not None:
            out.skipped[name] = reason
        else:
            layer_config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{lq.w_bits}"), granularity=PerAxis(0))
            # One module at a time: torchao refuses some shapes (a conv with one input channel: its per-channel
            # scale's reshape fails), and that layer alone stays float, said so, instead of the whole hand-over.
            try:
                quantize_(module, FqnToConfig({name: layer_config}), filter_fn=None)
            except (RuntimeError, ValueError, NotImplementedError) as e:
                out.skipped[name] = f"torchao refused it: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            else:
                out.applied[name] = lq.w_bits
    return out
