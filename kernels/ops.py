"""The low-bit layers as torch ops (torch.library.custom_op, with fake implementations for export/compile).

Both ops quantize their float input to uint8 codes exactly as the simulation's
torch.fake_quantize_per_tensor_affine does (x * float32(1/scale), round half to even, + zero point, clamp),
then run the packed weights:
  - up to SMALL_BATCH rows: the bit-plane kernel (csrc/lowbit.cpp), which never unpacks the weights;
  - more rows: the weights are unpacked to their int8 values and multiplied as integer-valued float32
    matrices by torch's GEMM (exact integer sums below 2^24; beyond that, float rounding of the order the
    simulation has anyway). torch._int_mm would keep int32 but runs 20x slower than sgemm on CPU here.
Dequantization (weight scale x activation scale) and the bias are applied to the int32 sums.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .build import extension
from .packing import BLOCK, affine_for

SMALL_BATCH = 16


def quantize_input(x: torch.Tensor, a_scale: float, a_zp: int, a_qmax: int) -> torch.Tensor:
    inv = float(np.float32(1.0) / np.float32(a_scale))  # what fake_quantize_per_tensor_affine uses
    return (torch.round(x.float() * inv) + a_zp).clamp_(0, a_qmax).to(torch.uint8)


def _gemm(a: torch.Tensor, planes, qsum, scale, bias, k: int, a_scale: float, a_zp: int) -> torch.Tensor:
    """a: uint8 codes [G, M, K] -> float [G, M, N]."""
    g, m, _ = a.shape
    bits = planes.shape[-1]
    alpha, off = affine_for(bits)
    combined = scale * a_scale
    if m <= SMALL_BATCH:
        pad = (-k) % BLOCK
        a = F.pad(a, (0, pad)) if pad else a
        return extension().lowbit_gemv(a.contiguous(), planes, qsum, combined, bias, k, alpha, off, a_zp)
    w = (alpha * extension().unpack_planes(planes)[..., :k].to(torch.int16) - off).float()  # [G, N, K]
    acc = torch.bmm(a.float() - a_zp, w.transpose(1, 2))
    return acc * combined.unsqueeze(1) + bias.unsqueeze(1)


@torch.library.custom_op("bitsearch::lowbit_linear", mutates_args=())
def lowbit_linear(x: torch.Tensor, planes: torch.Tensor, qsum: torch.Tensor, scale: torch.Tensor,
                  bias: torch.Tensor, k: int, a_scale: float, a_zp: int, a_qmax: int) -> torch.Tensor:
    lead = x.shape[:-1]
    a = quantize_input(x.reshape(-1, x.shape[-1]), a_scale, a_zp, a_qmax).unsqueeze(0)
    out = _gemm(a, planes, qsum, scale, bias, k, a_scale, a_zp)[0]
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
    codes = quantize_input(x, a_scale, a_zp, a_qmax).float()
    if b * ho * wo > SMALL_BATCH:
        # Many output positions: unpack the weights to their integer values and convolve the integer-valued
        # codes (minus the zero point, so zero padding is exact) with torch's conv: the same integer sums,
        # exact below 2^24, without materialising im2col.
        bits = planes.shape[-1]
        alpha, off = affine_for(bits)
        wint = alpha * extension().unpack_planes(planes)[..., :k].to(torch.int16) - off
        wint = wint.float().reshape(g * ng, c // g, kernel[0], kernel[1])
        acc = F.conv2d(codes - a_zp, wint, None, stride, padding, dilation, g)
        return acc * (scale * a_scale).reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)
    # Pad with the zero point: the code of 0.0, which is what a float conv pads a fake-quantized input with.
    codes = F.pad(codes, (padding[1], padding[1], padding[0], padding[0]), value=float(a_zp))
    cols = F.unfold(codes, kernel, dilation=dilation, stride=stride)  # [B, C*kh*kw, L], channel-major
    cols = cols.reshape(b, g, -1, ho * wo).permute(1, 0, 3, 2).reshape(g, b * ho * wo, -1)
    out = _gemm(cols.to(torch.uint8), planes, qsum, scale, bias, k, a_scale, a_zp)  # [G, B*L, Ng]
    return out.reshape(g, b, ho * wo, ng).permute(1, 0, 3, 2).reshape(b, g * ng, ho, wo)


@lowbit_conv2d.register_fake
def _(x, planes, qsum, scale, bias, k, a_scale, a_zp, a_qmax, kernel, stride, padding, dilation):
    b, _, h, w = x.shape
    ho = _conv_out(h, kernel[0], stride[0], padding[0], dilation[0])
    wo = _conv_out(w, kernel[1], stride[1], padding[1], dilation[1])
    return x.new_empty((b, planes.shape[0] * planes.shape[1], ho, wo), dtype=torch.float32)


def isa() -> str:
    return extension().get_isa()


def set_isa(name: str) -> None:
    extension().set_isa(name)


def supported_isas() -> list[str]:
    return list(extension().supported_isas())
