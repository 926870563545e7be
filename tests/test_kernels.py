"""The low-bit kernels against the scalar reference and against float math on dequantized weights."""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn.functional as F

from kernels import ops, packing
from kernels.lower import load_packed, lower
from kernels.validate import validate
from search.config import QuantConfig
from search.data import fashion_mnist_splits
from search.quant.weight import quantize_weight
from search.simulate import Simulator
from tests.conftest import reference_model

BITS = range(1, 9)


@pytest.fixture
def isa_restored():
    before = ops.isa()
    yield ops.supported_isas()
    ops.set_isa(before)


def _qw(shape, bits, seed):
    g = torch.Generator().manual_seed(seed)
    return quantize_weight(torch.randn(shape, generator=g), bits, "uniform", "max")


@pytest.mark.parametrize("bits", BITS)
def test_packing_round_trips_and_matches_the_python_reference(bits):
    for i, (n, k, groups) in enumerate([(1, 1, 1), (5, 63, 1), (7, 64, 1), (3, 130, 1), (8, 9, 8), (6, 200, 2)]):
        qw = _qw((n, k), bits, i)
        q = packing.indices(qw, groups)
        packed = packing.pack(qw, groups)
        assert packed.planes.shape == (groups, n // groups, -(-k // 64), bits)
        assert torch.equal(packed.planes, packing.pack_reference(q, bits))
        assert torch.equal(packing.unpack(packed.planes, k), q)
        # The codes come back exactly: w = alpha * q - off.
        alpha, off = packing.affine_for(bits)
        assert torch.equal((alpha * q.to(torch.int16) - off).reshape(n, k), qw.codes.reshape(n, k).to(torch.int16))
        # Packed size: b bits per weight (rows padded to 64), within 3% of the ideal for long rows.
        if k % 64 == 0:
            assert packed.planes.numel() * 8 == n * k * bits // 8


def _linear_ref(x, qw, bias, scale, zp):
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255) @ qw.dequantize().t() + bias


@pytest.mark.parametrize("bits", BITS)
def test_linear_every_isa_matches_scalar_and_float(bits, isa_restored):
    g = torch.Generator().manual_seed(bits)
    # (1, 32700, 520): weights beyond the L2 caches at every b, which batch 1 streams row by row
    for m, k, n in [(1, 100, 7), (2, 64, 1), (5, 257, 33), (40, 130, 9), (200, 1000, 70), (1, 32700, 520)]:
        qw = _qw((n, k), bits, m + k)
        p = packing.pack(qw)
        x = torch.rand(m, k, generator=g) * 4 - 1
        bias = torch.randn(n, generator=g)
        scale, zp = 4 / 255, int(torch.randint(0, 256, (1,), generator=g))
        outs = {}
        for isa in isa_restored:
            ops.set_isa(isa)
            outs[isa] = ops.lowbit_linear(x, p.planes, p.qsum, p.scale, bias[None], k, scale, zp, 255)
        for isa, out in outs.items():  # identical integer sums, so identical floats
            assert torch.equal(out, outs["scalar"]), isa
        ref = _linear_ref(x, qw, bias, scale, zp)
        assert torch.allclose(outs["scalar"], ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())


@pytest.mark.parametrize("bits", BITS)
def test_gemm_path_equals_the_bit_plane_path_exactly(bits, isa_restored):
    """Many rows take the tiled GEMM (C++ quantization, unpacked weights), one row the bit-plane kernel: both
    must quantize the input identically and compute the same integer sums, so the floats are equal."""
    g = torch.Generator().manual_seed(50 + bits)
    m, k, n = 3 * ops.SMALL_BATCH + 5, 333, 45
    qw = _qw((n, k), bits, bits)
    p = packing.pack(qw)
    x = torch.randn(m, k, generator=g) * 2
    bias = torch.randn(1, n, generator=g)
    for isa in isa_restored:
        ops.set_isa(isa)
        many = ops.lowbit_linear(x, p.planes, p.qsum, p.scale, bias, k, 3 / 255, 120, 255)
        one_by_one = torch.cat(
            [ops.lowbit_linear(x[i : i + 1], p.planes, p.qsum, p.scale, bias, k, 3 / 255, 120, 255) for i in range(m)]
        )
        assert torch.equal(many, one_by_one), (isa, ops.gemm_kernel())


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_conv_grouped_depthwise_strided_matches_float(bits, isa_restored):
    g = torch.Generator().manual_seed(100 + bits)
    cases = [
        (1, 8, 9, 6, 1, 3, 1, 1, 1),
        (2, 8, 9, 8, 2, 3, 2, 1, 1),
        (1, 6, 7, 6, 6, 3, 1, 2, 2),
        (3, 6, 8, 12, 6, 3, 1, 1, 1),
        (1, 4, 5, 1, 1, 1, 1, 0, 1),
        (2, 16, 20, 40, 1, 3, 1, 1, 1),
        (2, 8, 9, 8, 8, 3, 2, 1, 1),
        (2, 8, 9, 16, 8, 3, 1, 1, 1),  # depthwise strided; multiplier 2
        (2, 40, 6, 40, 40, 3, 1, 1, 1),  # depthwise over more than one block of 16 channels, with a tail
        # one group, C % 4 == 0, many positions: the implicit GEMM (strided, dilated, unpadded, 1x1)
        (2, 12, 11, 20, 1, 3, 2, 1, 1),
        (1, 8, 12, 70, 1, 3, 1, 2, 2),
        (3, 4, 9, 5, 1, 3, 1, 0, 1),
        (2, 16, 7, 33, 1, 1, 1, 0, 1),
    ]
    for b, c, h, co, groups, k, s, pad, d in cases:
        qw = _qw((co, c // groups, k, k), bits, c + co + k)
        p = packing.pack(qw, groups)
        x = torch.rand(b, c, h, h, generator=g) * 3 - 1
        bias = torch.randn(co, generator=g)
        scale, zp = 3 / 255, 85
        outs = []
        for isa in isa_restored:
            ops.set_isa(isa)
            outs.append(
                ops.lowbit_conv2d(
                    x,
                    p.planes,
                    p.qsum,
                    p.scale,
                    bias.reshape(groups, -1),
                    p.k,
                    scale,
                    zp,
                    255,
                    [k, k],
                    [s, s],
                    [pad, pad],
                    [d, d],
                )
            )
        assert all(torch.equal(o, outs[0]) for o in outs)
        ref = F.conv2d(
            torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255), qw.dequantize(), bias, s, pad, d, groups
        )
        assert outs[0].shape == ref.shape
        assert torch.allclose(outs[0], ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())


def test_ops_refuse_bad_arguments():
    qw = _qw((6, 40), 3, 0)
    p = packing.pack(qw)
    with pytest.raises(RuntimeError, match="k = 70"):  # the planes hold one block of 64
        ops.lowbit_linear(torch.randn(2, 70), p.planes, p.qsum, p.scale, torch.zeros(1, 6), 70, 0.05, 100, 255)
    with pytest.raises(RuntimeError, match="a_zp"):
        ops.lowbit_linear(torch.randn(2, 40), p.planes, p.qsum, p.scale, torch.zeros(1, 6), 40, 0.05, 300, 255)
    cp = packing.pack(_qw((4, 2, 3, 3), 4, 1))
    args = (torch.randn(1, 2, 6, 6), cp.planes, cp.qsum, cp.scale, torch.zeros(1, 4), cp.k, 0.05, 100, 255)
    with pytest.raises(RuntimeError, match="stride"):
        ops.lowbit_conv2d(*args, [3, 3], [0, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="k must be"):
        ops.lowbit_conv2d(torch.randn(1, 3, 6, 6), *args[1:], [3, 3], [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="unknown kernel ISA|cannot run"):
        ops.set_isa("neon")


def test_opcheck_passes_for_both_ops():
    qw = _qw((6, 40), 3, 0)
    p = packing.pack(qw)
    x = torch.randn(2, 40)
    torch.library.opcheck(
        torch.ops.bitsearch.lowbit_linear.default, (x, p.planes, p.qsum, p.scale, torch.zeros(1, 6), 40, 0.05, 100, 255)
    )
    cw = _qw((4, 2, 3, 3), 4, 1)
    cp = packing.pack(cw, 2)
    torch.library.opcheck(
        torch.ops.bitsearch.lowbit_conv2d.default,
        (
            torch.randn(1, 4, 6, 6),
            cp.planes,
            cp.qsum,
            cp.scale,
            torch.zeros(2, 2),
            cp.k,
            0.05,
            100,
            255,
            [3, 3],
            [1, 1],
            [1, 1],
            [1, 1],
        ),
    )


@pytest.fixture(scope="module")
def fmnist_small():
    return fashion_mnist_splits(calib_size=256)


def test_lowered_model_survives_export_and_loads_without_the_original(tmp_path, tiny_model, fmnist_small):
    config = QuantConfig.from_bits(
        tiny_model, {l.name: 3 for l in tiny_model.layers}, {l.name: 8 for l in tiny_model.layers}
    )
    packed = lower(tiny_model, config, fmnist_small.calib.inputs)
    x = fmnist_small.val.inputs[:50]
    ep = packed.export()
    assert any("bitsearch" in str(n.target) for n in ep.graph.nodes)
    packed.save(tmp_path / "packed")
    del packed.module
    again = load_packed(tmp_path / "packed")
    assert json.loads((tmp_path / "packed" / "config.json").read_text())["config"]["model_sha256"] == tiny_model.sha256
    sim = Simulator(tiny_model, fmnist_small.calib.inputs)
    sim.apply(config)
    assert torch.allclose(again(x), sim.forward(x), atol=1e-3)


class _Conv1dNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(28, 12, 5, padding=2)
        self.fc = torch.nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x.flatten(1, 2))).mean(-1))


def test_lowered_conv1d_matches_the_simulation(tmp_path, fmnist_small):
    """conv1d runs as a [1, k] conv2d: its weights must be packed in the same (tap, channel) row order."""
    from search.model import load_model
    from tests.conftest import export_model

    torch.manual_seed(0)
    model = load_model(export_model(_Conv1dNet(), tmp_path / "conv1d.pt2"))
    assert [l.op for l in model.layers] == ["conv1d", "linear"]
    sim = Simulator(model, fmnist_small.calib.inputs)
    x = fmnist_small.val.inputs[:40]
    for bits in (3, 8):
        config = QuantConfig.uniform(model, bits, 8)
        sim.apply(config)
        packed = lower(model, config, simulator=sim)
        assert packed.kernel_layers == [l.name for l in model.layers]
        assert torch.allclose(packed(x), sim.forward(x), atol=1e-3)


class _ConvThenView(torch.nn.Module):
    """A strict view right after a conv: the lowered conv returns channels-last memory, which view rejects."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.shape[0], -1))


def test_lowered_conv_output_feeds_a_strict_view(tmp_path, fmnist_small):
    from search.model import load_model
    from tests.conftest import export_model

    torch.manual_seed(0)
    model = load_model(export_model(_ConvThenView(), tmp_path / "view.pt2"))
    assert any(n.target == torch.ops.aten.view.default for n in model.gm.graph.nodes)
    config = QuantConfig.uniform(model, 4, 8)
    packed = lower(model, config, fmnist_small.calib.inputs)
    assert packed.kernel_layers == [l.name for l in model.layers]
    x = fmnist_small.val.inputs[:40]
    sim = Simulator(model, fmnist_small.calib.inputs)
    sim.apply(config)
    assert torch.allclose(packed(x), sim.forward(x), atol=1e-3)
    packed.save(tmp_path / "packed")  # export traces the fake ops: their channels-last output must view too
    assert torch.allclose(load_packed(tmp_path / "packed")(x), sim.forward(x), atol=1e-3)


@pytest.mark.parametrize("name", ["resnet20-fmnist", "mobilenetv2-fmnist", "mixer-fmnist"])
def test_validate_matches_the_simulation_on_every_reference_model(name, fmnist_small):
    from search.model import load_model

    model = load_model(reference_model(name))
    test = fmnist_small.test.subset(slice(0, 1000))
    g = torch.Generator().manual_seed(0)
    mixed = QuantConfig.from_bits(
        model,
        {l.name: int(torch.randint(2, 9, (1,), generator=g)) for l in model.layers},
        {l.name: 8 for l in model.layers},
    )
    sim = Simulator(model, fmnist_small.calib.inputs)
    for config in (QuantConfig.uniform(model, 8, 8), mixed):
        r = validate(
            model,
            config,
            test.inputs,
            test.labels,
            fmnist_small.calib.inputs,
            batch_sizes=(1,),
            repeats=2,
            simulator=sim,
        )
        assert abs(r.top1 - r.sim_top1) <= 0.001, (name, r)
        assert r.agreement >= 0.995 and r.kernel_layers == r.layers
        assert r.packed_bytes > r.buffer_bytes > 0 and r.latency_us[1] > 0


def test_latency_is_a_median_with_its_spread_and_a_busy_machine_is_noticed(tiny_model, fmnist_small):
    """Latencies come with their interquartile range and the conditions they were taken in: when other processes
    keep the cores busy, validation waits and times again, and marks a figure still taken under load."""
    import subprocess
    import sys

    from kernels.validate import BUSY_SHARE, others_share, validate

    test = fmnist_small.val.subset(slice(0, 64))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        _, share = others_share(lambda: time.sleep(1.0))
        assert share is not None and share > BUSY_SHARE  # two spinning processes on this machine's cores
        r = validate(
            tiny_model,
            QuantConfig.uniform(tiny_model, 4, 8),
            test.inputs,
            test.labels,
            fmnist_small.calib.inputs,
            batch_sizes=(1, 8),
            repeats=9,
            quiet_retries=1,
            quiet_wait_s=0.1,
        )
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert r.latency_conditions["under_load"] is True and r.latency_conditions["timings"] == 2
    assert r.latency_conditions["others_cpu_share"] > BUSY_SHARE and r.latency_conditions["repeats"] == 9
    for b in (1, 8):
        assert r.latency_us[b] > 0 and 0 <= r.latency_iqr_us[b]
    d = r.to_dict()
    assert set(d["latency_iqr_us"]) == {"1", "8"}
