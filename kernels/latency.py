"""Latency tables: every layer at every (w_bits, a_bits) timed on the real kernels at batch 1.

The table feeds the searches' latency budgets (search.cost.LatencyTable): HAQ's hardware feedback, measured.
"""

from __future__ import annotations

import platform

import torch

from search.config import QuantConfig
from search.cost import LatencyTable
from search.model import LoadedModel
from search.quant.weight import quantize_weight

from . import ops
from .packing import pack
from .validate import median_us


def _float_call(model: LoadedModel, layer):
    import torch.nn.functional as F

    w, x = model.weight(layer.name), torch.randn((1, *layer.in_shape))
    if layer.op == "linear":
        return lambda: F.linear(x, w)
    conv = F.conv2d if layer.op == "conv2d" else F.conv1d
    return lambda: conv(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def _layer_call(model: LoadedModel, layer, w_bits: int):
    qw = quantize_weight(model.weight(layer.name), w_bits, "uniform", "max")
    p = pack(qw, layer.groups)
    bias = torch.zeros(layer.groups, qw.codes.shape[0] // layer.groups)
    x = torch.randn((1, *layer.in_shape))
    if layer.op == "linear":
        return lambda: ops.lowbit_linear(x, p.planes, p.qsum, p.scale, bias, p.k, 0.05, 128, 255)
    if layer.op == "conv1d":
        x2 = x.unsqueeze(2)
        k, s, pd, d = ([1, v[0]] for v in (layer.kernel, layer.stride, layer.padding, layer.dilation))
        pd[0] = 0
        return lambda: ops.lowbit_conv2d(x2, p.planes, p.qsum, p.scale, bias, p.k, 0.05, 128, 255, k, s, pd, d)
    return lambda: ops.lowbit_conv2d(
        x,
        p.planes,
        p.qsum,
        p.scale,
        bias,
        p.k,
        0.05,
        128,
        255,
        list(layer.kernel),
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
    )


@torch.no_grad()
def measure_latency_table(
    model: LoadedModel, w_bits=range(1, 9), a_bits=(8,), repeats: int = 30, on_layer=None
) -> LatencyTable:
    """Median microseconds per layer and width. The kernels' time does not depend on a_bits <= 8 (codes are
    bytes), so those entries share one measurement; a_bits 16 (float activations) runs the float layer."""
    QuantConfig.uniform(model, max(w_bits), 8).check_against(model)
    layers: dict[str, dict[str, float]] = {}
    for i, layer in enumerate(model.layers):
        row = {}
        float_us = median_us(_float_call(model, layer), repeats) if any(a >= 16 for a in a_bits) else None
        for w in w_bits:
            us = median_us(_layer_call(model, layer, w), repeats)
            for a in a_bits:
                row[f"{w}x{a}"] = us if a < 16 else float_us
        layers[layer.name] = row
        if on_layer:
            on_layer(i + 1, len(model.layers))
    return LatencyTable(
        layers, machine=f"{platform.node()} {platform.machine()} {ops.isa()} {torch.get_num_threads()} threads"
    )
