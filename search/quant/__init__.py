"""Quantizers: weights per output channel (1-8 bits), activations per tensor (2-8 bits or float)."""

from .activation import ActRange, ActStats, calibrate_range, fake_quantize_activation
from .weight import WEIGHT_SCHEMES, QuantizedWeight, quantize_weight, weight_levels

__all__ = [
    "ActRange",
    "ActStats",
    "calibrate_range",
    "fake_quantize_activation",
    "WEIGHT_SCHEMES",
    "QuantizedWeight",
    "quantize_weight",
    "weight_levels",
]
