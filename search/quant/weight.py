"""Per-output-channel weight quantization, b in 1..8 (docs/methods.md#weight-quantization).

Every scheme is "codes + per-channel scale (+ codebook)":
  uniform  codes are integers in [-(2^(b-1)-1), 2^(b-1)-1], w_q = code * scale; b=2 is ternary.
           b=1 is binary: code = sign(w) (sign(0)=+1), scale = mean|w| (the L2-optimal scale).
  pot      codes index a codebook of levels {0, +-2^-(2^(b-1)-2), ..., +-1/2, +-1}; w_q = level * scale.
  apot     codes index additive powers-of-two levels (Li et al.), normalised so the largest is 1.
The scale (clipping threshold) is max|w| or the MSE-optimal threshold found by grid search.
The kernels consume exactly these codes, scales and codebooks, so simulation and kernels agree.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cache

import torch

WEIGHT_SCHEMES = ("uniform", "pot", "apot")
CLIP_METHODS = ("max", "mse")
MSE_GRID = 100  # thresholds tried, as fractions k/MSE_GRID of max|w|
MSE_SAMPLE = 1024  # weights per channel the threshold is scored on (the largest, and a stride of the rest)
MSE_TAIL = 128


@dataclass
class QuantizedWeight:
    codes: torch.Tensor  # same shape as the weight: int8 signed integers (uniform) or uint8 codebook indices
    scale: torch.Tensor  # float32 [C_out]
    bits: int
    scheme: str
    codebook: torch.Tensor | None = None  # float32 [levels], normalised to [-1, 1]; None for uniform

    def dequantize(self) -> torch.Tensor:
        values = self.codes.float() if self.codebook is None else self.codebook[self.codes.long()]
        return values * self.scale.reshape(-1, *([1] * (self.codes.dim() - 1)))


def _apot_magnitudes(mag_bits: int, base_bits: int = 2) -> list[float]:
    """Sums of one term from each of n = ceil(m/k) additive sets p_i = {0, 2^-i, 2^-(i+n), ...}."""
    n = -(-mag_bits // base_bits)
    term_bits = [base_bits] * (n - 1) + [mag_bits - base_bits * (n - 1)]
    sets = [[0.0] + [2.0 ** -(i + j * n) for j in range((1 << k) - 1)] for i, k in enumerate(term_bits)]
    return sorted({sum(c) for c in itertools.product(*sets)})


@cache
def _levels(bits: int, scheme: str) -> tuple[float, ...]:
    if scheme == "uniform":
        qmax = (1 << (bits - 1)) - 1
        return tuple(k / qmax for k in range(-qmax, qmax + 1)) if bits > 1 else (-1.0, 1.0)
    if bits < 2:
        raise ValueError(f"scheme {scheme!r} needs at least 2 bits; 1-bit weights are binary (scheme 'uniform')")
    if scheme == "pot":
        mags = [0.0] + [2.0**-e for e in range((1 << (bits - 1)) - 2, -1, -1)]
    elif scheme == "apot":
        mags = _apot_magnitudes(bits - 1)  # one bit of the code is the sign
        top = max(mags)
        mags = [m / top for m in mags]
    else:
        raise ValueError(f"unknown weight scheme {scheme!r}; expected one of {WEIGHT_SCHEMES}")
    return tuple(sorted({-m for m in mags} | set(mags)))


def weight_levels(bits: int, scheme: str) -> torch.Tensor:
    """The normalised levels in [-1, 1] a (bits, scheme) weight may take."""
    return torch.tensor(_levels(bits, scheme), dtype=torch.float32)


def _project(w_over_scale: torch.Tensor, bits: int, scheme: str, levels: torch.Tensor) -> torch.Tensor:
    """Codes of the nearest level."""
    if scheme == "uniform":
        qmax = (1 << (bits - 1)) - 1
        return torch.round(w_over_scale * qmax).clamp_(-qmax, qmax)
    mid = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(w_over_scale.clamp(-1, 1), mid)


def _values(codes: torch.Tensor, bits: int, scheme: str, levels: torch.Tensor) -> torch.Tensor:
    if scheme == "uniform":
        return codes / ((1 << (bits - 1)) - 1)
    return levels[codes]


def _mse_threshold(
    flat: torch.Tensor, w_max: torch.Tensor, bits: int, scheme: str, levels: torch.Tensor
) -> torch.Tensor:
    """Per channel, the threshold k/MSE_GRID * max|w| with the least squared error (all k at once, in chunks).

    A channel longer than MSE_SAMPLE weights is scored on a sample of them: the 100 candidate thresholds
    times every weight of every width was most of an ImageNet model's search (ResNet-18: 236 of 259 s of a
    measurement pass), and a thousand weights place the minimum as well; every channel of the 28 px
    reference models (at most 576 weights) is scored whole, as before."""
    weights = None
    n = flat.shape[1]
    if n > MSE_SAMPLE:
        # the largest weights exactly (clipping them is what the threshold trades), the rest by an even stride in
        # order of magnitude, each standing for the weights between it and the next
        order = flat.abs().argsort(dim=1)
        body = order[:, : n - MSE_TAIL][:, :: math.ceil((n - MSE_TAIL) / (MSE_SAMPLE - MSE_TAIL))]
        picked = torch.cat([body, order[:, n - MSE_TAIL :]], dim=1)
        flat = flat.gather(1, picked)
        weights = torch.cat([torch.full((body.shape[1],), (n - MSE_TAIL) / body.shape[1]), torch.ones(MSE_TAIL)])
    fractions = torch.arange(1, MSE_GRID + 1, dtype=torch.float32) / MSE_GRID
    chunk = max(1, (1 << 24) // flat.numel())
    errors = []
    for f in fractions.split(chunk):
        t = f[:, None, None] * w_max[None, :, None]  # [g, C, 1]
        q = _values(_project(flat[None] / t, bits, scheme, levels), bits, scheme, levels) * t
        err = (q - flat[None]).pow_(2)
        errors.append(err.mean(dim=2) if weights is None else (err * weights).sum(dim=2))
    best = torch.cat(errors).argmin(dim=0)  # ties go to the smallest threshold
    return w_max * fractions[best]


@torch.no_grad()
def quantize_weight(w: torch.Tensor, bits: int, scheme: str = "uniform", clip: str = "mse") -> QuantizedWeight:
    if not 1 <= bits <= 8:
        raise ValueError(f"weight bits must be in 1..8, got {bits}")
    if clip not in CLIP_METHODS:
        raise ValueError(f"unknown clip method {clip!r}; expected one of {CLIP_METHODS}")
    w = w.detach().float()
    flat = w.reshape(w.shape[0], -1)
    if bits == 1:
        if scheme != "uniform":
            raise ValueError("1-bit weights are binary: use scheme 'uniform'")
        codes = torch.where(flat >= 0, 1, -1).to(torch.int8)
        scale = flat.abs().mean(dim=1)
        return QuantizedWeight(codes.reshape(w.shape), scale, 1, scheme)
    levels = weight_levels(bits, scheme)
    w_max = flat.abs().amax(dim=1).clamp_min(1e-12)
    scale = _mse_threshold(flat, w_max, bits, scheme, levels) if clip == "mse" else w_max
    codes = _project(flat / scale[:, None], bits, scheme, levels)
    if scheme == "uniform":
        scale = scale / ((1 << (bits - 1)) - 1)  # so that w_q = code * scale
        return QuantizedWeight(codes.to(torch.int8).reshape(w.shape), scale, bits, scheme)
    return QuantizedWeight(codes.to(torch.uint8).reshape(w.shape), scale, bits, scheme, levels)


def sqnr_db(x: torch.Tensor, x_q: torch.Tensor) -> float:
    """10 log10(E[x^2] / E[(x_q - x)^2]); +inf when exact."""
    noise = (x_q - x).double().pow(2).mean()
    signal = x.double().pow(2).mean()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(signal / noise))


def weight_sqnr_db(w: torch.Tensor, bits: int, scheme: str = "uniform", clip: str = "mse") -> float:
    return sqnr_db(w, quantize_weight(w, bits, scheme, clip).dequantize())
