"""Weight packing: quantized codes -> bit planes (layout documented in csrc/lowbit.cpp).

A uniform b-bit code c in [-(2^(b-1)-1), 2^(b-1)-1] is stored as the index q = c + off (off = 2^(b-1)-1) and
read back as w = alpha*q - off with alpha = 1; a binary code c in {-1, +1} as q = (c+1)/2, w = 2q - 1.
A conv weight [C_out, C_in/G, kh, kw] is packed as rows of K = kh*kw*C_in/G values in (kh, kw, channel) order
(a conv1d weight [C_out, C_in/G, k] in (k, channel) order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from search.quant.weight import QuantizedWeight

BLOCK = 64
LAYOUT = "bitsearch.bitplanes/3"  # /3: b = 8 as plain bytes; /2: conv rows in (kh, kw, channel) order


def affine_for(bits: int) -> tuple[int, int]:
    """(alpha, off) with integer weight = alpha * index - off."""
    return (2, 1) if bits == 1 else (1, (1 << (bits - 1)) - 1)


@dataclass
class PackedWeight:
    planes: torch.Tensor  # int64 [G, Ng, nblk, bits]
    qsum: torch.Tensor  # int64 [G, Ng]: sum of each row's indices
    scale: torch.Tensor  # float32 [G, Ng]: per-output-channel weight scale
    k: int  # real (unpadded) row length
    bits: int

    @property
    def alpha_off(self) -> tuple[int, int]:
        return affine_for(self.bits)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.planes, self.qsum, self.scale))


def indices(qw: QuantizedWeight, groups: int = 1) -> torch.Tensor:
    """Unsigned indices [G, Ng, K] of a uniform quantized weight [C_out, ...]."""
    if qw.scheme != "uniform":
        raise ValueError(f"the bit-plane kernels run uniform codes; scheme {qw.scheme!r} runs on the float path")
    alpha, off = affine_for(qw.bits)
    codes = qw.codes
    if codes.dim() == 4:  # conv rows in (kh, kw, Cin/g) order, the order of the kernels' channels-last im2col
        codes = codes.permute(0, 2, 3, 1)
    elif codes.dim() == 3:  # conv1d runs as a [1, k] conv2d: rows in (k, Cin/g) order too
        codes = codes.permute(0, 2, 1)
    codes = codes.reshape(codes.shape[0], -1).to(torch.int16)
    q = (codes + off) // alpha
    return q.to(torch.uint8).reshape(groups, codes.shape[0] // groups, codes.shape[1])


def pad_k(t: torch.Tensor) -> torch.Tensor:
    k = t.shape[-1]
    pad = (-k) % BLOCK
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def pack_reference(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Python reference of the C++ packer (tests compare the two): uint8 [G, N, K] -> int64 planes."""
    if bits == 8:  # plain bytes int8(q - 128), element i of a block in byte i of its 8 little-endian words
        b = pad_k(q).to(torch.uint8).contiguous() ^ 0x80
        return b.reshape(*b.shape[:-1], -1, BLOCK).view(torch.int64)
    q = pad_k(q).to(torch.int64)
    g, n, kpad = q.shape
    blocks = q.reshape(g, n, kpad // BLOCK, BLOCK)
    weights = torch.ones(BLOCK, dtype=torch.int64) << torch.arange(BLOCK, dtype=torch.int64)
    planes = [(((blocks >> p) & 1) * weights).sum(-1) for p in range(bits)]  # bit 63 wraps to the sign: intended
    return torch.stack(planes, -1)


def pack(qw: QuantizedWeight, groups: int = 1) -> PackedWeight:
    from .build import extension

    q = indices(qw, groups)
    planes = extension().pack_planes(pad_k(q).contiguous(), qw.bits)
    return PackedWeight(
        planes, q.to(torch.int64).sum(-1), qw.scale.float().reshape(groups, -1).contiguous(), q.shape[-1], qw.bits
    )


def unpack(planes: torch.Tensor, k: int) -> torch.Tensor:
    from .build import extension

    return extension().unpack_planes(planes)[..., :k]
