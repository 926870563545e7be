"""Malformed arguments to the C++ ops are refused, never read: every path (GEMV, GEMM, implicit GEMM, depthwise),
every ISA this CPU runs.

A packed model loaded from a file reaches torch.ops.bitsearch.* with whatever tensors the file holds, so each
argument of a valid call built from a real packed layer is broken in turn (every dimension off by one, too few or
too many dimensions, wrong dtype, non-contiguous, empty, huge, bit counts 0 and 9, bad conv parameters and
activation constants, mismatched groups) and the call must raise, as must the fake implementation that tracing
runs. The labelled sweep runs again in a child process, whose exit status shows that no case crashed it; a
hypothesis search draws random combinations against a plain statement of the layout and checks that each call
either raises or returns the right shape, identically on every ISA.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from kernels import ops, packing
from search.quant.weight import quantize_weight

REPO = Path(__file__).resolve().parent.parent
HUGE = 1 << 40
INT64_MAX = (1 << 63) - 1


@dataclass
class Call:
    """One op call: linear when `kernel` is None, else conv2d."""

    x: torch.Tensor
    planes: torch.Tensor
    qsum: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    k: int
    a_scale: float = 3 / 255
    a_zp: int = 85
    a_qmax: int = 255
    kernel: list | None = None
    stride: list = field(default_factory=lambda: [1, 1])
    padding: list = field(default_factory=lambda: [0, 0])
    dilation: list = field(default_factory=lambda: [1, 1])

    def run(self) -> torch.Tensor:
        common = (self.x, self.planes, self.qsum, self.scale, self.bias, self.k, self.a_scale, self.a_zp, self.a_qmax)
        if self.kernel is None:
            return ops.lowbit_linear(*common)
        return ops.lowbit_conv2d(*common, self.kernel, self.stride, self.padding, self.dilation)


@dataclass
class Case:
    call: Call
    reference: torch.Tensor  # float math on the dequantized weights


def _packed_call(x, qw, groups, **conv) -> tuple[Call, torch.Tensor]:
    p = packing.pack(qw, groups)
    g = torch.Generator().manual_seed(x.numel())
    bias = torch.randn(qw.codes.shape[0], generator=g)
    call = Call(x, p.planes, p.qsum, p.scale, bias.reshape(groups, -1), p.k, **conv)
    xq = torch.fake_quantize_per_tensor_affine(x, call.a_scale, call.a_zp, 0, call.a_qmax)
    if call.kernel is None:
        return call, xq @ qw.dequantize().t() + bias
    return call, F.conv2d(xq, qw.dequantize(), bias, call.stride, call.padding, call.dilation, groups)


@functools.cache  # read only: variants are new Calls, and the ops do not write their inputs
def _case(name: str) -> Case:
    g = torch.Generator().manual_seed(len(name))
    qw = lambda shape, bits: quantize_weight(torch.randn(shape, generator=g), bits, "uniform", "max")  # noqa: E731
    x = lambda *shape: torch.rand(shape, generator=g) * 3 - 1  # noqa: E731
    if name == "linear-gemv":  # rows <= SMALL_BATCH: the bit-plane GEMV; two blocks of 64
        call, ref = _packed_call(x(3, 70), qw((10, 70), 3), 1)
    elif name == "linear-gemm":  # the tiled GEMM; b = 8 is stored as bytes
        call, ref = _packed_call(x(ops.SMALL_BATCH + 24, 70), qw((10, 70), 8), 1)
    elif name == "conv-gemv":  # 9 output positions: the GEMV on im2col rows; binary weights
        call, ref = _packed_call(x(1, 4, 3, 3), qw((6, 4, 3, 3), 1), 1, kernel=[3, 3], padding=[1, 1])
    elif name == "conv-grouped-gemm":  # two groups, 50 positions: the im2col GEMM
        call, ref = _packed_call(x(2, 6, 5, 5), qw((8, 3, 3, 3), 5), 2, kernel=[3, 3], padding=[1, 1])
    elif name == "conv-implicit":  # one group, C % 4 == 0, 50 positions: the implicit GEMM on avx512vnni
        call, ref = _packed_call(x(2, 4, 5, 5), qw((8, 4, 3, 3), 4), 1, kernel=[3, 3], padding=[1, 1])
    elif name == "depthwise":
        call, ref = _packed_call(x(2, 4, 5, 5), qw((4, 1, 3, 3), 2), 4, kernel=[3, 3], stride=[2, 2], padding=[1, 1])
    else:
        raise KeyError(name)
    return Case(call, ref)


NAMES = ["linear-gemv", "linear-gemm", "conv-gemv", "conv-grouped-gemm", "conv-implicit", "depthwise"]


def _first_long_dim(t: torch.Tensor) -> int:
    return next(i for i, s in enumerate(t.shape) if s > 1)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values, non-contiguous: every other element of a tensor twice as long in one dimension."""
    d = _first_long_dim(t)
    shape = list(t.shape)
    shape[d] *= 2
    index = [slice(None)] * t.dim()
    index[d] = slice(None, None, 2)
    out = torch.zeros(shape, dtype=t.dtype)[tuple(index)]
    out.copy_(t)
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    """A stride-0 view of t's shape."""
    out = t.narrow(_first_long_dim(t), 0, 1).expand(t.shape)
    assert not out.is_contiguous()
    return out


def _resized(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = size
    out = torch.zeros(shape, dtype=t.dtype)
    n = min(size, t.shape[dim])
    out.narrow(dim, 0, n).copy_(t.narrow(dim, 0, n))
    return out


def _wrapping_kernel(k: int) -> list[int]:
    """Two kernel sizes below 2^63 whose product is k modulo 2^64."""
    for kh in range((1 << 40) + 1, (1 << 40) + 1000, 2):
        kw = k * pow(kh, -1, 1 << 64) % (1 << 64)
        if kw < (1 << 63):
            return [kh, kw]
    raise AssertionError


def invalid_variants(case: Case) -> list[tuple[str, Call]]:
    """(label, call) for every way of breaking one argument of the case's valid call."""
    c = case.call
    conv = c.kernel is not None
    out: list[tuple[str, Call]] = []
    add = lambda label, **changes: out.append((label, replace(c, **changes)))  # noqa: E731

    # x: the dimensions the weights fix, dimensionality, dtype, emptiness.
    if conv:
        for d in (-1, 1):
            add(f"x channels {d:+d}", x=_resized(c.x, 1, c.x.shape[1] + d))
        add("x 3-d", x=c.x[0])
        add("x 5-d", x=c.x[None])
        add("x without channels", x=c.x[:, :0])
        add("x without rows", x=c.x[:, :, :0])
        add("x smaller than the kernel", x=c.x[:, :, :1, :1], padding=[0, 0])
        add("x smaller than the dilated kernel", dilation=[4, 4])
    else:
        for d in (-1, 1):
            add(f"x features {d:+d}", x=_resized(c.x, -1, c.x.shape[-1] + d))
        add("x 0-d", x=torch.tensor(1.0))
        add("x without features", x=c.x[..., :0])
    for dtype in (torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64):
        add(f"x {dtype}", x=c.x.to(dtype))

    # planes [G, N, nblk, bits]
    for dim, what in enumerate(("groups", "channels", "blocks")):
        for d in (-1, 1):
            add(f"planes {what} {d:+d}", planes=_resized(c.planes, dim, c.planes.shape[dim] + d))
    for bits in (0, 9):
        add(f"planes of {bits} bits", planes=_resized(c.planes, 3, bits))
    add("planes 3-d", planes=c.planes[0])
    add("planes 5-d", planes=c.planes[None])
    add("planes without channels", planes=c.planes[:, :0])
    add("planes empty", planes=torch.zeros(0, dtype=torch.int64))
    for dtype in (torch.int32, torch.float64, torch.uint8):
        add(f"planes {dtype}", planes=c.planes.to(dtype))
    add("planes reinterpreted as float64", planes=c.planes.view(torch.float64))
    add("planes non-contiguous", planes=_strided(c.planes))
    add("planes with 2^16 channels", planes=_resized(c.planes, 1, 1 << 16))
    g, n = c.qsum.shape
    add(
        "planes broadcast to 2^40 channels",
        planes=c.planes[:, :1].expand(g, HUGE, *c.planes.shape[2:]),
        qsum=c.qsum[:, :1].expand(g, HUGE),
        scale=c.scale[:, :1].expand(g, HUGE),
        bias=c.bias[:, :1].expand(g, HUGE),
    )

    # qsum, scale, bias: [G, N] of int64, float32, float32
    for name, wrong in (
        ("qsum", (torch.int32, torch.float32)),
        ("scale", (torch.float64, torch.float16, torch.int32)),
        ("bias", (torch.float64, torch.bfloat16, torch.int64)),
    ):
        t = getattr(c, name)
        for dim in (0, 1):
            for d in (-1, 1):
                add(f"{name} dim {dim} {d:+d}", **{name: _resized(t, dim, t.shape[dim] + d)})
        add(f"{name} flat", **{name: t.reshape(-1)})
        add(f"{name} 3-d", **{name: t[None]})
        add(f"{name} empty", **{name: t[:, :0]})
        add(f"{name} with 2^16 entries", **{name: _resized(t, 1, 1 << 16)})
        add(f"{name} broadcast", **{name: _broadcast(t)})
        add(f"{name} non-contiguous", **{name: _strided(t)})
        for dtype in wrong:
            add(f"{name} {dtype}", **{name: t.to(dtype)})

    # k: off by one (same block count), outside 1..65536, larger than the planes
    for k in (c.k - 1, c.k + 1, 0, -1, 65537, HUGE, -HUGE):
        add(f"k = {k}", k=k)

    # activation constants
    for zp, qmax in ((-1, 255), (0, 256), (200, 100), (0, 0), (300, 300), (HUGE, 255)):
        add(f"a_zp {zp}, a_qmax {qmax}", a_zp=zp, a_qmax=qmax)
    for a_scale in (0.0, -0.01, math.nan, math.inf, 1e-300, 1e300):
        add(f"a_scale {a_scale}", a_scale=a_scale)

    if conv:
        for name in ("kernel", "stride", "padding", "dilation"):
            v = getattr(c, name)
            add(f"{name} of one value", **{name: v[:1]})
            add(f"{name} of three values", **{name: [*v, v[0]]})
            add(f"{name} empty", **{name: []})
        for d in (0, 1):
            for name, bad in (
                ("kernel", 0),
                ("stride", 0),
                ("stride", -1),
                ("dilation", 0),
                ("padding", -1),
                ("kernel", -3),
            ):
                v = list(getattr(c, name))
                v[d] = bad
                add(f"{name}[{d}] = {bad}", **{name: v})
            k = list(c.kernel)
            for delta in (-1, 1):
                k[d] = c.kernel[d] + delta
                add(f"kernel[{d}] {delta:+d}", kernel=list(k))
        add("padding overflowing int64", padding=[1 << 62, 1])
        add("dilation overflowing int64", dilation=[1 << 62, 1])
        add("output size overflowing int64", padding=[1 << 40, 1 << 40])
        add("kernel product wrapping to k", kernel=_wrapping_kernel(c.k // (c.x.shape[1] // c.planes.shape[0])))
        # the same weights as one group of all output channels: k no longer matches the channels
        if c.planes.shape[0] > 1:
            add(
                "groups merged",
                planes=c.planes.reshape(1, -1, *c.planes.shape[2:]),
                qsum=c.qsum.reshape(1, -1),
                scale=c.scale.reshape(1, -1),
                bias=c.bias.reshape(1, -1),
            )
        if c.planes.shape[0] == 1 and c.planes.shape[1] % 2 == 0:  # one group split in two
            add(
                "groups split",
                planes=c.planes.reshape(2, -1, *c.planes.shape[2:]),
                qsum=c.qsum.reshape(2, -1),
                scale=c.scale.reshape(2, -1),
                bias=c.bias.reshape(2, -1),
            )
    else:
        add(
            "linear with two groups",
            planes=c.planes.repeat(2, 1, 1, 1),
            qsum=c.qsum.repeat(2, 1),
            scale=c.scale.repeat(2, 1),
            bias=c.bias.repeat(2, 1),
        )
    return out


def valid_variants(case: Case) -> list[tuple[str, Call, torch.Tensor | None]]:
    """(label, call, expected output or None when only the shape is known) for changes that stay valid."""
    c = case.call
    conv = c.kernel is not None
    out = [
        ("float64 x", replace(c, x=c.x.double()), case.reference),
        ("empty batch", replace(c, x=c.x[:0]), case.reference[:0]),
    ]
    if conv:
        out.append(("channels-last x", replace(c, x=c.x.contiguous(memory_format=torch.channels_last)), case.reference))
        out.append(("stride 2^62", replace(c, stride=[1 << 62, 1 << 62]), case.reference[:, :, :1, :1]))
    else:
        out.append(("non-contiguous x", replace(c, x=_strided(c.x)), case.reference))
        out.append(("x with two batch dimensions", replace(c, x=c.x[None]), case.reference[None]))
    for bits in (c.planes.shape[3] - 1, c.planes.shape[3] + 1):  # another bit count of the same row length
        if 1 <= bits <= 8:
            out.append((f"planes of {bits} bits", replace(c, planes=_resized(c.planes, 3, bits)), None))
    return out


@pytest.fixture
def isas():
    before = ops.isa()
    yield ops.supported_isas()
    ops.set_isa(before)


@pytest.mark.parametrize("name", NAMES)
def test_valid_arguments_give_the_reference_output_on_every_isa(name, isas):
    case = _case(name)
    scale = case.reference.abs().max().item()
    for isa in isas:
        ops.set_isa(isa)
        out = case.call.run()
        assert torch.allclose(out, case.reference, rtol=1e-4, atol=1e-3 * scale), (name, isa)
        assert torch.equal(out, _run_on(case.call, "scalar")), (name, isa)  # identical integer sums
        for label, call, expected in valid_variants(case):
            got = call.run()
            if expected is None:
                assert got.shape == case.reference.shape and torch.isfinite(got).all(), (name, isa, label)
            else:
                assert got.shape == expected.shape, (name, isa, label)
                assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3 * scale), (name, isa, label)


def _run_on(call: Call, isa: str) -> torch.Tensor:
    before = ops.isa()
    ops.set_isa(isa)
    try:
        return call.run()
    finally:
        ops.set_isa(before)


def _refused(call: Call) -> str | None:
    """None when the call raised RuntimeError (or ValueError), else what it returned."""
    try:
        out = call.run()
    except (RuntimeError, ValueError):
        return None
    return f"returned {tuple(out.shape)}"


@pytest.mark.parametrize("name", NAMES)
def test_every_broken_argument_is_refused_on_every_isa(name, isas):
    case = _case(name)
    variants = invalid_variants(case)
    assert len(variants) > 60
    for isa in isas:
        ops.set_isa(isa)
        accepted = [(label, r) for label, call in variants if (r := _refused(call)) is not None]
        assert not accepted, (name, isa, accepted)


def test_refusals_name_the_argument():
    c = _case("conv-grouped-gemm").call
    cases = [
        (replace(c, qsum=_resized(c.qsum, 1, 3)), "qsum must be \\[G, N\\] = \\[2, 4\\]"),
        (replace(c, scale=c.scale.double()), "scale must be Float, got Double"),
        (replace(c, bias=_strided(c.bias)), "bias must be contiguous"),
        (replace(c, planes=_resized(c.planes, 3, 9)), "bit count, 1..8, got 9"),
        (replace(c, k=c.k + 1), "k must be C/groups \\* kh \\* kw = 27"),
        (replace(c, a_scale=0.0), "a_scale"),
        (replace(c, x=c.x.int()), "x must be a floating-point tensor"),
        (replace(c, padding=[1 << 40, 1 << 40]), "overflows int64"),
        (replace(c, x=c.x[:, :, :1, :1], padding=[0, 0]), "smaller than the kernel"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call.run()


def _fake(call: Call, mode: FakeTensorMode) -> Call:
    return replace(
        call,
        **{
            f.name: mode.from_tensor(getattr(call, f.name))
            for f in fields(call)
            if isinstance(getattr(call, f.name), torch.Tensor)
        },
    )


@pytest.mark.parametrize("name", NAMES)
def test_the_fake_implementations_agree(name):
    """Tracing (export, compile) runs the fake implementations: they refuse what the ops refuse and give the
    ops' output shape and memory format for what they accept."""
    case = _case(name)
    accepted = []
    for label, call in invalid_variants(case):
        mode = FakeTensorMode()
        try:
            with mode:
                _fake(call, mode).run()
            accepted.append(label)
        except RuntimeError:
            pass
    assert not accepted, (name, accepted)
    for label, call, _ in [("valid", case.call, None), *valid_variants(case)]:
        mode = FakeTensorMode()
        with mode:
            fake = _fake(call, mode).run()
        real = call.run()
        assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype), (name, label)


def sweep() -> int:
    """Every labelled broken call of every case on every ISA; the number of calls."""
    before, calls = ops.isa(), 0
    try:
        for name in NAMES:
            variants = invalid_variants(_case(name))
            for isa in ops.supported_isas():
                ops.set_isa(isa)
                for label, call in variants:
                    assert _refused(call) is None, (name, isa, label)
                    calls += 1
    finally:
        ops.set_isa(before)
    return calls


def test_the_sweep_does_not_crash_a_fresh_process():
    code = "from tests.test_kernel_arguments import sweep; print('calls', sweep())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-4000:])
    assert int(done.stdout.split()[-1]) > 1000


# ---- random combinations against a plain statement of the layout ----


def _expected_shape(c: Call) -> tuple[int, ...] | None:
    """The output shape of a call the layout allows, or None for a call the ops must refuse."""
    for name, dtype in (
        ("planes", torch.int64),
        ("qsum", torch.int64),
        ("scale", torch.float32),
        ("bias", torch.float32),
    ):
        t = getattr(c, name)
        if t.dtype != dtype or not t.is_contiguous():
            return None
    if c.planes.dim() != 4 or not c.x.is_floating_point():
        return None
    g, n, nblk, bits = c.planes.shape
    if min(g, n) < 1 or not 1 <= bits <= 8 or not 1 <= c.k <= 65536 or nblk != -(-c.k // 64):
        return None
    if any(t.shape != (g, n) for t in (c.qsum, c.scale, c.bias)):
        return None
    if not (0 <= c.a_zp <= c.a_qmax <= 255 and c.a_qmax >= 1 and 0 < c.a_scale < 1e38 and 1 / c.a_scale < 1e38):
        return None
    if c.kernel is None:
        if g != 1 or c.x.dim() < 1 or c.x.shape[-1] != c.k:
            return None
        return (*c.x.shape[:-1], n)
    lists = (c.kernel, c.stride, c.padding, c.dilation)
    if c.x.dim() != 4 or any(len(v) != 2 for v in lists):
        return None
    if min(*c.kernel, *c.stride, *c.dilation) < 1 or min(c.padding) < 0:
        return None
    b, ch, h, w = c.x.shape
    if min(ch, h, w) < 1 or ch % g or c.k != ch // g * c.kernel[0] * c.kernel[1]:
        return None
    size = []
    for d, s in enumerate((h, w)):
        span, padded = c.dilation[d] * (c.kernel[d] - 1) + 1, s + 2 * c.padding[d]
        if max(span, padded) > INT64_MAX or padded < span:  # sizes are int64 in the ops
            return None
        size.append((padded - span) // c.stride[d] + 1)
    if g * b * size[0] * size[1] * max(n, 64 * nblk) > INT64_MAX:
        return None
    return (b, g * n, *size)


def _draw_tensor(draw, t: torch.Tensor, ints: bool) -> torch.Tensor:
    """t, or a tensor near it: another shape (sizes off by one, 0, extra or missing dimensions), dtype or layout."""
    kind = draw(st.sampled_from(["same", "shape", "dims", "dtype", "strided"]))
    if kind == "same":
        return t
    if kind == "dtype":
        return t.to(draw(st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.float32, torch.float64])))
    if kind == "strided" and t.numel() > 1:
        return _strided(t)
    shape = list(t.shape)
    if kind == "dims" and shape:
        shape = shape[1:] if draw(st.booleans()) else [1, *shape]
    else:
        shape = [draw(st.sampled_from([s, s, max(s - 1, 0), s + 1, 0, 1])) for s in shape]
    if math.prod(shape) > 1 << 20:
        return t
    if ints:  # any bit pattern is a valid index for every b (b = 8 reads bytes); small sums keep qsum honest
        return torch.randint(0, 1 << 20, shape, dtype=torch.int64)
    return torch.randn(shape)


@st.composite
def _calls(draw):
    case = _case(draw(st.sampled_from(NAMES)))
    c = case.call
    changes = {}
    for name, ints in (("x", False), ("planes", True), ("qsum", True), ("scale", False), ("bias", False)):
        if draw(st.integers(0, 3)) == 0:
            changes[name] = _draw_tensor(draw, getattr(c, name), ints)
    if draw(st.integers(0, 3)) == 0:
        changes["k"] = draw(st.sampled_from([c.k - 1, c.k + 1, c.k - 64, c.k + 64, 0, 1, 64, 65536, 65537]))
    if draw(st.integers(0, 3)) == 0:
        changes["a_zp"] = draw(st.integers(-2, 258))
        changes["a_qmax"] = draw(st.integers(-2, 258))
    if draw(st.integers(0, 3)) == 0:
        changes["a_scale"] = draw(st.sampled_from([0.0, -1.0, 1e-45, 1e39, math.nan, 0.5]))
    if c.kernel is not None:
        for name in ("kernel", "stride", "padding", "dilation"):
            if draw(st.integers(0, 3)) == 0:
                changes[name] = draw(st.lists(st.integers(-2, 4) | st.just(1 << 62), min_size=0, max_size=3))
    return replace(c, **changes)


@settings(
    max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(call=_calls())
def test_random_arguments_are_refused_or_give_the_layout_shape_on_every_isa(call):
    expected = _expected_shape(call)
    before = ops.isa()
    outs = []
    try:
        for isa in ops.supported_isas():
            ops.set_isa(isa)
            if expected is None:
                assert _refused(call) is None, isa
            else:
                outs.append(call.run())
                assert tuple(outs[-1].shape) == expected, isa
    finally:
        ops.set_isa(before)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
