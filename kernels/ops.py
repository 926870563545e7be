"""The low-bit layers as torch ops: torch.ops.bitsearch.lowbit_linear and lowbit_conv2d.

The ops are defined and implemented in C++ (csrc/lowbit.cpp, TORCH_LIBRARY), so a call from a lowered graph
costs one dispatcher hop; this module loads them and registers their fake implementations (export, compile).
Each op quantizes its float input to uint8 codes exactly as the simulation's torch.fake_quantize_per_tensor_affine
does (x * float32(1/scale), round half to even, + zero point, clamp), then runs the packed weights:
  - up to SMALL_BATCH rows (activation rows or conv output positions): the GEMV on the bit planes, which
    rebuilds each block's indices in registers (AVX-512 VNNI: a byte permute + a GF2P8AFFINEQB transpose,
    then vpdpbusd) and never unpacks the weights to memory;
  - more rows: the tiled GEMM, which unpacks a tile of weight rows once (int8 for AVX-512 VNNI, int16 for
    AVX2 and the scalar reference) and reuses it for a chunk of activation rows; quantization and the
    channels-last im2col run in C++;
  - depthwise convolutions: a direct kernel on the channels-last codes.
lowbit_conv2d returns its [B, C, H, W] result in channels-last memory (the layout the GEMM writes and the next
layer's im2col reads), like torch's own conv2d on a channels-last input.
All paths sum in integers; dequantization (weight scale x activation scale) and the bias are applied to the sums.
"""

from __future__ import annotations

import torch

from .build import extension

# Loading the library defines torch.ops.bitsearch.* with their CPU kernels.
SMALL_BATCH = extension().SMALL_BATCH  # rows up to which the ops run the GEMV rather than the GEMM

lowbit_linear = torch.ops.bitsearch.lowbit_linear.default
lowbit_conv2d = torch.ops.bitsearch.lowbit_conv2d.default


MAX_K = 65536  # the longest rows the C++ ops take (their int32 sums stay exact)
_FLOAT_MAX = float(torch.finfo(torch.float32).max)
_INT64_MAX = (1 << 63) - 1


def _check_args(planes, qsum, scale, bias, k, a_scale, a_zp, a_qmax) -> None:
    """The C++ ops' checks of the packed weights and activation constants (csrc/lowbit.cpp, check_weights and
    check_activation), so that tracing a graph with malformed weights fails as running it does."""
    torch._check(
        planes.dtype == torch.int64 and planes.dim() == 4 and planes.is_contiguous(),
        lambda: f"planes must be contiguous int64 [G, N, nblk, bits], got {planes.dtype} {planes.shape}",
    )
    g, n, nblk, bits = planes.shape
    torch._check(g >= 1 and n >= 1, lambda: f"planes must hold a group and an output channel, got {planes.shape}")
    torch._check(1 <= bits <= 8, lambda: f"planes' last dimension is the weight bit count, 1..8, got {bits}")
    torch._check(1 <= k <= MAX_K, lambda: f"k = {k} is outside 1..{MAX_K}")
    torch._check(nblk == (k + 63) // 64, lambda: f"k = {k} does not match the packed rows ({nblk} blocks of 64)")
    for name, t, dtype in (("qsum", qsum, torch.int64), ("scale", scale, torch.float32), ("bias", bias, torch.float32)):
        torch._check(
            t.dtype == dtype and t.is_contiguous() and t.dim() == 2 and t.shape[0] == g and t.shape[1] == n,
            lambda: f"{name} must be contiguous {dtype} [G, N] = [{g}, {n}], got {t.dtype} {t.shape}",
        )
    torch._check(
        0 <= a_zp <= a_qmax <= 255 and a_qmax >= 1,
        lambda: f"activation codes must satisfy 0 <= a_zp <= a_qmax <= 255, got a_zp {a_zp}, a_qmax {a_qmax}",
    )
    torch._check(
        0 < a_scale <= _FLOAT_MAX and 1 / a_scale <= _FLOAT_MAX,
        lambda: f"a_scale must be a positive float32 with a finite reciprocal, got {a_scale}",
    )


@torch.library.register_fake("bitsearch::lowbit_linear")
def _(x, planes, qsum, scale, bias, k, a_scale, a_zp, a_qmax):
    _check_args(planes, qsum, scale, bias, k, a_scale, a_zp, a_qmax)
    torch._check(x.is_floating_point() and x.dim() >= 1, lambda: "x must be a floating-point tensor [..., k]")
    torch._check(x.shape[-1] == k, lambda: f"linear input's last dimension must be {k}, got shape {tuple(x.shape)}")
    torch._check(planes.shape[0] == 1, lambda: "linear weights must be planes [1, N, nblk, bits]")
    return x.new_empty((*x.shape[:-1], planes.shape[1]), dtype=torch.float32)


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    # As torch's conv2d (and the C++ op): the padded input must cover the dilated kernel, in int64.
    padded, span = size + 2 * padding, dilation * (kernel - 1) + 1
    torch._check(padded <= _INT64_MAX and span <= _INT64_MAX, lambda: "the conv sizes overflow int64")
    torch._check(padded >= span, lambda: "the input is smaller than the kernel")
    return (padded - span) // stride + 1


@torch.library.register_fake("bitsearch::lowbit_conv2d")
def _(x, planes, qsum, scale, bias, k, a_scale, a_zp, a_qmax, kernel, stride, padding, dilation):
    _check_args(planes, qsum, scale, bias, k, a_scale, a_zp, a_qmax)
    torch._check(x.is_floating_point() and x.dim() == 4, lambda: "conv input x must be a floating-point [B, C, H, W]")
    torch._check(
        all(len(v) == 2 for v in (kernel, stride, padding, dilation)),
        lambda: "kernel, stride, padding and dilation must have two values",
    )
    torch._check(
        min(*kernel, *stride, *dilation) >= 1 and min(padding) >= 0,
        lambda: "kernel, stride and dilation must be >= 1 and padding >= 0",
    )
    b, c, h, w = x.shape
    torch._check(c >= 1 and h >= 1 and w >= 1, lambda: f"conv input x needs C, H and W >= 1, got {tuple(x.shape)}")
    torch._check(c % planes.shape[0] == 0, lambda: "x's channels do not divide into the planes' groups")
    torch._check(k == c // planes.shape[0] * kernel[0] * kernel[1], lambda: f"k must be C/groups * kh * kw, got {k}")
    ho = _conv_out(h, kernel[0], stride[0], padding[0], dilation[0])
    wo = _conv_out(w, kernel[1], stride[1], padding[1], dilation[1])
    out = x.new_empty((b, planes.shape[0] * planes.shape[1], ho, wo), dtype=torch.float32)
    return out.to(memory_format=torch.channels_last)  # as the kernels write it


def isa() -> str:
    return extension().get_isa()


def gemm_kernel() -> str:
    """The large-batch GEMM the current ISA runs: scalar, avx2 or avx512-vnni."""
    return extension().gemm_kernel_name()


def set_isa(name: str) -> None:
    extension().set_isa(name)


def supported_isas() -> list[str]:
    return list(extension().supported_isas())
