"""Bias correction (Nagel et al., "Data-Free Quantization", ICCV 2019, empirical variant).

Quantizing W shifts a layer's expected output by E[(W_q - W) x] = (W_q - W) E[x]; at 2-4 bits
the shift is large enough to move the next layer's operating point. Subtracting it from the
bias, with E[x] the per-channel mean of the layer's float input over the calibration images,
costs nothing at inference time. For a conv, E[x] is taken as constant over space (borders
with padding are ignored), so the shift is the kernel-summed weight error times the mean.
"""

from __future__ import annotations

import torch


def output_shift(weight_error: torch.Tensor, channel_mean: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """E[(W_q - W) x] per output channel, for a linear ([Cout, F]) or conv ([Cout, Cin/g, *k]) weight."""
    if weight_error.dim() == 2:
        return weight_error @ channel_mean
    c_out, c_in_per_group = weight_error.shape[:2]
    summed = weight_error.reshape(c_out, c_in_per_group, -1).sum(2)  # [Cout, Cin/g]
    mean_per_group = channel_mean.reshape(groups, c_in_per_group)
    group_of_output = torch.arange(c_out) // (c_out // groups)
    return (summed * mean_per_group[group_of_output]).sum(1)
