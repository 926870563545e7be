"""Kernel benchmark (not a test): our low-bit ops against stock torch, side by side in one run.

    .venv/bin/python bench/kernels.py [--threads 2] [--repeats 30]

Medians of repeated calls, weights hot (the same call repeated). Within each table the candidates take turns in
rounds of a few back-to-back calls, so a slow spell of this shared machine hits all of them alike. Prints
Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels import ops, packing  # noqa: E402
from kernels.lower import lower  # noqa: E402
from kernels.validate import median_us  # noqa: E402
from search.config import QuantConfig  # noqa: E402
from search.data import fashion_mnist_splits  # noqa: E402
from search.model import load_model  # noqa: E402
from search.quant.weight import quantize_weight  # noqa: E402


def interleaved_times(fns: dict, repeats: int, block: int = 5) -> dict[str, list[float]]:
    """Microseconds of every timed call of each callable. Rounds of `block` back-to-back calls (after one warm-up
    call, so the weights are hot), the callables taking turns round after round: a slow spell of this shared
    machine then hits all of them alike."""
    times = {name: [] for name in fns}
    for _ in range(max(1, repeats // block)):
        for name, fn in fns.items():
            fn()
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e6)
    return times


def interleaved_us(fns: dict, repeats: int, block: int = 5) -> dict:
    """Median microseconds of each callable (interleaved_times)."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(fns, repeats, block).items()}


_EVICT = torch.empty(96 << 20, dtype=torch.uint8)  # three times this machine's L3


def cold_us(fn, repeats):
    """Median of single calls made right after streaming through a buffer larger than the caches."""
    times = []
    for _ in range(repeats):
        _EVICT.add_(1)
        times.append(median_us(fn, 1, warmup=0))
    return sorted(times)[len(times) // 2]


def stream_gbps() -> float:
    """Measured read bandwidth (GB/s): a sum over a buffer larger than the caches."""
    t = torch.ones(64 << 20, dtype=torch.float32)
    us = median_us(lambda: t.sum(), 10)
    return t.numel() * 4 / us / 1e3


def cold_rows(k, n, repeats):
    """Batch-1 linear with weights evicted from the caches, and the time to read just the weights."""
    x, w = torch.randn(1, k), torch.randn(n, k)
    gbps = stream_gbps()
    packed_dyn = torch.ops.quantized.linear_prepack(torch.quantize_per_tensor(w, 0.02, 0, torch.qint8), None)
    rows = {
        "fp32 F.linear": (cold_us(lambda: F.linear(x, w), repeats), n * k * 4),
        "fbgemm int8 linear_dynamic": (
            cold_us(lambda: torch.ops.quantized.linear_dynamic(x, packed_dyn), repeats),
            n * k,
        ),
    }
    for bits in (2, 4, 8):
        p = packing.pack(quantize_weight(w, bits, "uniform", "max"))
        bias = torch.zeros(1, n)
        rows[f"bitsearch W{bits}A8"] = (
            cold_us(lambda p=p: ops.lowbit_linear(x, p.planes, p.qsum, p.scale, bias, k, 0.05, 128, 255), repeats),
            p.nbytes,
        )
    return gbps, rows


def linear_rows(m, k, n, repeats):
    x, w = torch.randn(m, k), torch.randn(n, k)
    fns = {"fp32 F.linear": lambda: F.linear(x, w)}
    packed_dyn = torch.ops.quantized.linear_prepack(torch.quantize_per_tensor(w, 0.02, 0, torch.qint8), None)
    fns["fbgemm int8 linear_dynamic"] = lambda: torch.ops.quantized.linear_dynamic(x, packed_dyn)
    if m > 16:
        xi, wi = torch.randint(-128, 127, (m, k), dtype=torch.int8), torch.randint(-127, 127, (n, k), dtype=torch.int8)
        wt = wi.t()
        fns["torch._int_mm (W.t())"] = lambda: torch._int_mm(xi, wt)
    wq = torch.randint(0, 16, (n, k), dtype=torch.int32)
    w4 = torch._convert_weight_to_int4pack_for_cpu(wq, 1)
    sz = torch.ones(k // 128, n, 2, dtype=torch.bfloat16)
    xb = x.bfloat16()
    fns["int4pack_mm bf16"] = lambda: torch._weight_int4pack_mm_for_cpu(xb, w4, 128, sz)
    bias = torch.zeros(1, n)
    for bits in range(1, 9):
        p = packing.pack(quantize_weight(w, bits, "uniform", "max"))
        fns[f"bitsearch W{bits}A8"] = lambda p=p: ops.lowbit_linear(
            x, p.planes, p.qsum, p.scale, bias, k, 0.05, 128, 255
        )
    return interleaved_us(fns, repeats)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"ISA {ops.isa()}, GEMM {ops.gemm_kernel()} (supported: {', '.join(ops.supported_isas())}), "
        f"{args.threads} threads, median of {args.repeats}, microseconds\n"
    )
    shapes = [(1, 4096, 4096), (64, 1024, 1024), (64, 4096, 4096)]
    results = {s: linear_rows(*s, args.repeats) for s in shapes}
    print("| linear | " + " | ".join(f"{m}x{k}x{n}" for m, k, n in shapes) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for name in results[shapes[0]] | results[shapes[1]]:
        cells = []
        for s in shapes:
            v = results[s].get(name, "-")
            cells.append(f"{v:.0f}" if isinstance(v, float) else str(v))
        print(f"| {name} | " + " | ".join(cells) + " |")

    gbps, cold = cold_rows(4096, 4096, args.repeats)
    print(
        f"\n| linear 1x4096x4096, weights cold (read bandwidth {gbps:.1f} GB/s) | us | weight bytes | "
        "bandwidth limit us |\n|---|---|---|---|"
    )
    for name, (us, nbytes) in cold.items():
        print(f"| {name} | {us:.0f} | {nbytes} | {nbytes / gbps / 1e3:.0f} |")

    x, w = torch.randn(1, 64, 56, 56), torch.randn(64, 64, 3, 3)
    conv = {"fp32 F.conv2d": lambda: F.conv2d(x, w, None, 1, 1)}
    xcl, wcl = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    conv["fp32 F.conv2d channels-last"] = lambda: F.conv2d(xcl, wcl, None, 1, 1)
    qconv = torch.ao.nn.quantized.Conv2d(64, 64, 3, padding=1)
    xq = torch.quantize_per_tensor(x, 0.05, 128, torch.quint8)
    conv["x86 int8 quantized conv"] = lambda: qconv(xq)
    for bits in (2, 4, 8):
        qw = quantize_weight(w, bits, "uniform", "max")
        p = packing.pack(qw)
        conv[f"bitsearch W{bits}A8"] = lambda p=p: ops.lowbit_conv2d(
            x, p.planes, p.qsum, p.scale, torch.zeros(1, 64), p.k, 0.05, 128, 255, [3, 3], [1, 1], [1, 1], [1, 1]
        )
        conv[f"bitsearch W{bits}A8 channels-last input"] = lambda p=p: ops.lowbit_conv2d(
            xcl, p.planes, p.qsum, p.scale, torch.zeros(1, 64), p.k, 0.05, 128, 255, [3, 3], [1, 1], [1, 1], [1, 1]
        )
    conv = interleaved_us(conv, args.repeats)
    print("\n| conv 3x3 64->64 at 56x56, batch 1 | us |\n|---|---|")
    for k_, v in conv.items():
        print(f"| {k_} | {v:.0f} |")

    splits = fashion_mnist_splits(256)
    print(
        "\n| model | fp32 b1 us | W4A8 b1 us (speed-up) | fp32 b64 us | W4A8 b64 us (speed-up) | fp32 bytes | "
        "W4A8 tensors bytes | "
        "W4A8 .pt2 bytes |\n|---|---|---|---|---|---|---|---|"
    )
    for name in ("resnet20-fmnist", "mobilenetv2-fmnist", "mixer-fmnist"):
        model = load_model(ROOT / "models" / f"{name}.pt2")
        packed = lower(model, QuantConfig.uniform(model, 4, 8), splits.calib.inputs)
        x1, x64 = splits.test.inputs[:1], splits.test.inputs[:64]
        fp32_bytes = sum(t.numel() * 4 for t in model.gm.state_dict().values() if t.is_floating_point())
        with torch.no_grad():
            b1 = interleaved_us({"fp32": lambda: model.gm(x1), "w4a8": lambda: packed.module(x1)}, args.repeats)
            b64 = interleaved_us(
                {"fp32": lambda: model.gm(x64), "w4a8": lambda: packed.module(x64)}, max(10, args.repeats // 2), block=2
            )
        cells = [
            f"{b1['fp32']:.0f}",
            f"{b1['w4a8']:.0f} ({b1['fp32'] / b1['w4a8']:.2f}x)",
            f"{b64['fp32']:.0f}",
            f"{b64['w4a8']:.0f} ({b64['fp32'] / b64['w4a8']:.2f}x)",
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {fp32_bytes} | {packed.buffer_bytes} | {packed.nbytes} |")


if __name__ == "__main__":
    main()
