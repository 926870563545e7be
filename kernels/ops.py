"""The low-bit layers as torch ops (torch.library.custom_op, with fake implementations for export/compile).

Both ops quantize their float input to uint8 codes exactly as the simulation's
torch.fake_quantize_per_tensor_affine does (x * float32(1/scale), round half to even, + zero point, clamp),
then run the packed weights (csrc/lowbit.cpp):
  - up to SMALL_BATCH rows: the bit-plane kernel, which never unpacks the weights;
  - more rows: the tiled GEMM, which unpacks a tile of weight rows once (int8 for AVX-512 VNNI, int16 for
    AVX2 and the scalar reference) and reuses it for a chunk of activation rows; quantization and the
    channels-last im2col run in C++ (quantize_columns);
  - depthwise convolutions: a direct kernel on the channels-last codes (lowbit_depthwise).
Both sum in integers; dequantization (weight scale x activation scale) and the bias are applied to the sums.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .build import extension
from .packing import BLOCK, affine_for

SMALL_BATCH = 16


def quantize_input(x: torch.Tensor, a_scale: float, a_zp: int, a_qmax: int) -> torch.Tensor:
    return (torch.round(x.float() * _inverse(a_scale)) + a_zp).clamp_(0, a_qmax).to(torch.uint8)


def _inverse(a_scale: float) -> float:
    return float(np.float32(1.0) / np.float32(a_scale))  # what fake_quantize_per_tensor_affine uses


def _gemv(a: torch.Tensor, planes, qsum, scale, bias, k: int, a_scale: float, a_zp: int) -> torch.Tensor:
    """a: uint8 codes [G, M, K] with M <= SMALL_BATCH -> float [G, M, N]."""
    alpha, off = affine_for(planes.shape[-1])
    pad = (-k) % BLOCK
    a = F.pad(a, (0, pad)) if pad else a
    return extension().lowbit_gemv(a.contiguous(), planes, qsum, scale * a_scale, bias, k, alpha, off, a_zp)


def _gemm(columns: torch.Tensor, planes, qsum, scale, bias, k: int, a_scale: float, a_zp: int,
          positions: int) -> torch.Tensor:
    """columns: uint8 codes [G, M, Kpad] from quantize_columns -> float [M / positions, G*N, positions]."""
    alpha, off = affine_for(planes.shape[-1])
    return extension().lowbit_gemm(columns, planes, qsum, scale * a_scale, bias, k, alpha, off, a_zp, positions)


@torch.library.custom_op("bitsearch::lowbit_linear", mutates_args=())
def lowbit_linear(x: torch.Tensor, planes: torch.Tensor, qsum: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor, k: int, a_scale: float, a_zp: int, a_qmax: int) -> torch.Tensor:
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= SMALL_BATCH:
        out = _gemv(quantize_input(rows, a_scale, a_zp, a_qmax).unsqueeze(0), planes, qsum, scale, bias, k,
                    a_scale, a_zp)[0]
    else:
        columns = extension().quantize_columns(rows, _inverse(a_scale), a_zp, a_qmax, 1, [], [], [], [])
        out = _gemm(columns, planes, qsum, scale, bias, k, a_scale, a_zp, 1).reshape(rows.shape[0], -1)
    return out.reshape(*lead, planes.shape[1])


@lowbit_linear.register_fake
def _(x, planes, qsum, scale, bias, k, a_scale, a_zp, a_qmax):
    return x.new_empty((*x.shape[:-1], planes.shape[1]), dtype=torch.float32)


def _conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.custom_op("bitsearch::lowbit_conv2d", mutates_args=())
def lowbit_conv2d(x: torch.Tensor, planes: torch.Tensor, qsum: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor, k: int, a_scale: float, a_zp: int, a_qmax: int, kernel: list[int],
                  stride: list[int], padding: list[int], dilation: list[int]) -> torch.Tensor:
    b, c, h, w = x.shape
    g, ng = planes.shape[0], planes.shape[1]
    ho = _conv_out(h, kernel[0], stride[0], padding[0], dilation[0])
    wo = _conv_out(w, kernel[1], stride[1], padding[1], dilation[1])
    if g == c and ng == 1:  # depthwise: its own kernel, as a GEMM row would be only kh*kw long
        alpha, off = affine_for(planes.shape[-1])
        return extension().lowbit_depthwise(x, planes, scale * a_scale, bias, _inverse(a_scale), a_zp, a_qmax,
                                            alpha, off, kernel, stride, padding, dilation)
    if b * ho * wo > SMALL_BATCH:
        columns = extension().quantize_columns(x, _inverse(a_scale), a_zp, a_qmax, g, kernel, stride, padding,
                                               dilation)
        return _gemm(columns, planes, qsum, scale, bias, k, a_scale, a_zp, ho * wo).reshape(b, g * ng, ho, wo)
    codes = quantize_input(x, a_scale, a_zp, a_qmax).float()
    # Pad with the zero point: the code of 0.0, which is what a float conv pads a fake-quantized input with.
    codes = F.pad(codes, (padding[1], padding[1], padding[0], padding[0]), value=float(a_zp))
    cols = F.unfold(codes, kernel, dilation=dilation, stride=stride)  # [B, C*kh*kw, L], channel-major
    # to the packed rows' (kh, kw, channel) order: [G, B*L, kh*kw*C/G]
    cols = cols.reshape(b, g, c // g, kernel[0] * kernel[1], ho * wo).permute(1, 0, 4, 3, 2).reshape(g, b * ho * wo, -1)
    out = _gemv(cols.to(torch.uint8), planes, qsum, scale, bias, k, a_scale, a_zp)  # [G, B*L, Ng]
    return out.reshape(g, b, ho * wo, ng).permute(1, 0, 3, 2).reshape(b, g * ng, ho, wo)


@lowbit_conv2d.register_fake
def _(x, planes, qsum, scale, bias, k, a_scale, a_zp, a_qmax, kernel, stride, padding, dilation):
    b, _, h, w = x.shape
    ho = _conv_out(h, kernel[0], stride[0], padding[0], dilation[0])
    wo = _conv_out(w, kernel[1], stride[1], padding[1], dilation[1])
    return x.new_empty((b, planes.shape[0] * planes.shape[1], ho, wo), dtype=torch.float32)


def isa() -> str:
    return extension().get_isa()


def gemm_kernel() -> str:
    """The large-batch GEMM the current ISA runs: scalar, avx2 or avx512-vnni."""
    return extension().gemm_kernel_name()


def set_isa(name: str) -> None:
    extension().set_isa(name)


def supported_isas() -> list[str]:
    return list(extension().supported_isas())
