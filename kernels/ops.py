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


@torch.library.register_fake("bitsearch::lowbit_linear")
def _(x, planes, qsum, scale, bias, k, a_scale, a_zp, a_qmax):
    return x.new_empty((*x.shape[:-1], planes.shape[1]), dtype=torch.float32)


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.register_fake("bitsearch::lowbit_conv2d")
def _(x, planes, qsum, scale, bias, k, a_scale, a_zp, a_qmax, kernel, stride, padding, dilation):
    b, _, h, w = x.shape
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
