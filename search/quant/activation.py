"""Per-tensor activation quantization, b in 2..8; 16 means the tensor stays float.

A tensor whose calibrated minimum is >= 0 (after ReLU) uses the unsigned PACT form
  y_q = round(clamp(y, 0, alpha) * (2^b-1)/alpha) * alpha/(2^b-1);
any other tensor uses the affine form x = S * (q - z), q in [0, 2^b-1].
Both are "uint8 codes + scale + zero point", the form the kernels take as input.
The range comes from calibration: min-max, a percentile, or the MSE-optimal range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

FLOAT_ACT_BITS = 16
CALIBRATION_METHODS = ("minmax", "percentile", "mse")
DEFAULT_PERCENTILE = 99.99
SAMPLE_LIMIT = 1 << 18  # values kept per tensor for percentile/MSE calibration
MSE_GRID = 64
MSE_SAMPLES = 1 << 16  # values the MSE range is fitted on


@dataclass
class ActRange:
    lo: float
    hi: float
    bits: int

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def scale(self) -> float:
        return max(self.hi - self.lo, 1e-8) / self.qmax

    @property
    def zero_point(self) -> int:
        return int(round(-self.lo / self.scale))


def fake_quantize_activation(x: torch.Tensor, r: ActRange) -> torch.Tensor:
    """(clamp(round(x * (1/S)) + z, 0, 2^b-1) - z) * S, round half to even.

    Value for value what torch.fake_quantize_per_tensor_affine computes on the CPU (its kernel takes
    the float32 reciprocal of the float32 scale, rounds, then adds z; a zero here may carry the other
    sign), so the kernels, which follow that op, see the same codes. Written as one multiply and
    in-place steps, the zero point folded into the clamp's bounds, because the fused op is 2-3x
    slower here, and this runs on every layer input of every simulated forward. Under
    autograd (fine-tuning) the fused op is used: its gradient passes inside the range, round's is 0.
    """
    if x.requires_grad:  # STE fine-tuning: torch's op carries the straight-through gradient
        return torch.fake_quantize_per_tensor_affine(x, r.scale, r.zero_point, 0, r.qmax)
    scale = float(np.float32(r.scale))
    inv_scale = float(np.float32(1.0) / np.float32(scale))
    z = r.zero_point
    # clamp(round(x/S) + z, 0, qmax) - z == clamp(round(x/S), -z, qmax - z): z is an integer and round(x/S) an
    # integer-valued float, so both sums are exact below 2^24 and both clamp to a bound beyond; two passes fewer.
    return torch.mul(x, inv_scale).round_().clamp_(-z, r.qmax - z).mul_(scale)


@dataclass
class ActStats:
    """Running statistics of one tensor over calibration batches."""

    lo: float = float("inf")
    hi: float = float("-inf")
    samples: list[torch.Tensor] = field(default_factory=list)
    seen: int = 0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    channel_dim: int = 1  # 1 for conv inputs [B, C, ...], -1 for linear inputs [..., F]
    channel_sum: torch.Tensor | None = None
    channel_count: int = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        # [positions, channels]; a 1-D tensor is one channel
        per_channel = (
            x.movedim(self.channel_dim, -1).reshape(-1, x.shape[self.channel_dim]) if x.dim() > 1 else x.reshape(-1, 1)
        )
        self.channel_sum = per_channel.sum(0) + (0 if self.channel_sum is None else self.channel_sum)
        self.channel_count += per_channel.shape[0]
        x = x.reshape(-1)
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.seen += x.numel()
        # A fixed share of every batch, so the sample is spread over all calibration images.
        keep = min(x.numel(), max(1, SAMPLE_LIMIT // 8))
        idx = torch.randint(0, x.numel(), (keep,), generator=self.generator)
        self.samples.append(x[idx])
        if sum(s.numel() for s in self.samples) > SAMPLE_LIMIT:
            merged = torch.cat(self.samples)
            idx = torch.randperm(merged.numel(), generator=self.generator)[:SAMPLE_LIMIT]
            self.samples = [merged[idx]]

    @property
    def channel_mean(self) -> torch.Tensor:
        return self.channel_sum / max(self.channel_count, 1)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(1)

    @property
    def unsigned(self) -> bool:
        return self.lo >= 0


def calibrate_range(
    stats: ActStats, bits: int, method: str = "mse", percentile: float = DEFAULT_PERCENTILE
) -> ActRange:
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in 2..8 (or {FLOAT_ACT_BITS} for float), got {bits}")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {CALIBRATION_METHODS}")
    lo = 0.0 if stats.unsigned else min(stats.lo, 0.0)
    hi = max(stats.hi, 0.0)
    if method == "minmax":
        return ActRange(lo, hi, bits)
    x = stats.sample()
    if method == "percentile":
        q = torch.quantile(x[: 1 << 24], torch.tensor([1 - percentile / 100, percentile / 100]))
        return ActRange(0.0 if stats.unsigned else min(float(q[0]), 0.0), max(float(q[1]), 0.0), bits)
    # The range scaled by k/MSE_GRID with the least squared error on a sample, all k at once.
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:MSE_SAMPLES]]
    k = torch.arange(1, MSE_GRID + 1, dtype=torch.float32)[:, None] / MSE_GRID
    qmax = (1 << bits) - 1
    scale = ((hi - lo) * k).clamp_min(1e-8) / qmax
    zero = torch.round(-lo * k / scale)
    xq = (torch.clamp(torch.round(x[None] / scale) + zero, 0, qmax) - zero) * scale
    best = int((xq - x[None]).pow_(2).mean(dim=1).argmin())
    f = (best + 1) / MSE_GRID
    return ActRange(lo * f, hi * f, bits)
