"""Whole-model latency of the ONNX QDQ export on onnxruntime against bitsearch's kernels and fp32 torch (not a
test), the three reference models at batch 1 and 64, in one run:

    .venv/bin/python bench/onnx_latency.py [--threads 2] [--repeats 20] [--config w4a8|w8a8]

Per model and batch: fp32 torch (the folded graph), fp32 onnxruntime (the same graph exported without QDQ), the
packed model on bitsearch's kernels, and the ONNX QDQ model on onnxruntime (kernels/onnx_export.onnx_session:
every graph optimisation on). The candidates take turns in rounds of a few back-to-back calls, so a slow spell of
this shared machine hits all of them alike; medians in microseconds. It also says which ops onnxruntime runs
the QDQ model with (its optimised graph), which is where it computes in integers and where in float. Prints a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels.lower import lower  # noqa: E402
from kernels.onnx_export import _onnx_float_graph, export_onnx, onnx_session  # noqa: E402
from search.config import QuantConfig  # noqa: E402
from search.data import fashion_mnist_splits  # noqa: E402
from search.model import load_model  # noqa: E402
from search.simulate import Simulator  # noqa: E402

MODELS = ["resnet20", "mobilenetv2", "mixer"]
CONFIGS = {"w4a8": (4, 8), "w8a8": (8, 8)}


def rounds(fns: dict, repeats: int, per_round: int = 3) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
        fn()
    times = {k: [] for k in fns}
    for _ in range(max(1, repeats // per_round)):
        for k, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def optimised_ops(mp, threads: int) -> Counter:
    import onnx
    import onnxruntime as ort

    from kernels.onnx_export import ORT_SESSION_CONFIG

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    # Extended, not all: the layout-specific NCHWc rewrite at "all" is not serialisable portably; the op choice
    # for the quantized parts (QLinear*/MatMulInteger*/MatMulNBits) is made at the extended level.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    for k, v in ORT_SESSION_CONFIG.items():
        opts.add_session_config_entry(k, v)
    path = Path(f"/tmp/bitsearch-onnx-optimised-{id(mp)}.onnx")
    opts.optimized_model_filepath = str(path)
    ort.InferenceSession(mp.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    path.unlink(missing_ok=True)
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="w4a8")
    ap.add_argument("--models", nargs="*", default=MODELS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = fashion_mnist_splits(calib_size=256)
    w_bits, a_bits = CONFIGS[args.config]
    rows = []
    for name in args.models:
        model = load_model(ROOT / "models" / f"{name}-fmnist.pt2")
        sim = Simulator(model, splits.calib.inputs)
        config = QuantConfig.uniform(model, w_bits, a_bits)
        packed = lower(model, config, simulator=sim)
        qdq = export_onnx(model, config, simulator=sim)
        ort_qdq = onnx_session(qdq, threads=args.threads)
        ort_fp32 = onnx_session(_onnx_float_graph(model), threads=args.threads)
        ops = optimised_ops(qdq, args.threads)
        quantized_ops = {k: v for k, v in ops.items() if k.startswith(("QLinear", "QGemm", "MatMulInteger", "MatMulN"))}
        float_ops = {k: v for k, v in ops.items() if k in ("Conv", "FusedConv", "Gemm", "MatMul")}
        for batch in (1, 64):
            x = splits.test.inputs[:batch].contiguous()
            xn = x.numpy()
            fns = {
                "torch fp32": lambda x=x: model.gm(x),
                "onnxruntime fp32": lambda xn=xn: ort_fp32.run(None, {ort_fp32.get_inputs()[0].name: xn}),
                "bitsearch kernels": lambda x=x: packed.module(x),
                "onnxruntime QDQ": lambda xn=xn: ort_qdq.run(None, {ort_qdq.get_inputs()[0].name: xn}),
            }
            with torch.no_grad():
                med = rounds(fns, args.repeats)
            rows.append((name, batch, med, quantized_ops, float_ops))
            print(f"{name} batch {batch}: " + ", ".join(f"{k} {v:.0f} us" for k, v in med.items()), flush=True)

    print()
    print(
        f"config {args.config} (uniform weights {w_bits} bits, inputs {a_bits} bits), {args.threads} threads, "
        f"medians of {args.repeats} calls per candidate, microseconds"
    )
    print()
    print("| model | batch | torch fp32 | onnxruntime fp32 | bitsearch kernels | onnxruntime QDQ | QDQ / torch fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, batch, med, _, _ in rows:
        cells = " | ".join(
            f"{med[k]:,.0f}" for k in ("torch fp32", "onnxruntime fp32", "bitsearch kernels", "onnxruntime QDQ")
        )
        print(f"| {name} | {batch} | {cells} | {med['onnxruntime QDQ'] / med['torch fp32']:.2f} |")
    print()
    print("| model | onnxruntime runs the layers as (integer ops) | (float ops on dequantized weights) |")
    print("|---|---|---|")
    for name, batch, _, q, f in rows:
        if batch == 1:
            print(
                f"| {name} | {', '.join(f'{k} x{v}' for k, v in sorted(q.items())) or 'none'} | "
                f"{', '.join(f'{k} x{v}' for k, v in sorted(f.items())) or 'none'} |"
            )


if __name__ == "__main__":
    main()
