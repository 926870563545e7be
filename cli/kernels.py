"""`bitsearch validate`, `pack` and `latency-table`: the compiled low-bit kernels (kernels/).

The kernels build (first use) only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_data_arguments, load_data, parse_bits, percent


def _model_and_config(args):
    from cli.common import load_model
    from search.config import QuantConfig

    model = load_model(args.model)
    return model, QuantConfig.from_json(Path(args.config).read_text(), model)


def cmd_validate(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from kernels.validate import validate

    model, config = _model_and_config(args)
    splits = load_data(args)
    evalset = splits.test if splits.test is not None else splits.val
    if args.samples:
        evalset = evalset.subset(slice(0, args.samples))
    report = validate(model, config, evalset.inputs, evalset.labels, splits.calib.inputs, threads=args.threads)
    if args.json:
        print(json.dumps(report.to_dict()))
        return
    t = Table(title=f"{Path(args.model).name} on the {report.isa} kernels, {report.threads} threads")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, v in [
        ("top-1 (kernels)", percent(report.top1)),
        ("top-1 (simulation)", percent(report.sim_top1)),
        ("top-1 agreement", percent(report.agreement)),
        ("max logit difference", f"{report.max_logit_diff:.4g}"),
        ("samples", str(report.samples)),
        ("packed model on disk", f"{report.packed_bytes} B"),
        ("tensors held", f"{report.buffer_bytes} B"),
        ("layers on the kernels", f"{report.kernel_layers}/{report.layers}"),
        *[(f"latency batch {b}", f"{us:.0f} us") for b, us in report.latency_us.items()],
    ]:
        t.add_row(k, v)
    Console().print(t)


def cmd_pack(args) -> None:
    from kernels.lower import lower

    model, config = _model_and_config(args)
    splits = load_data(args)
    packed = lower(model, config, splits.calib.inputs)
    out = packed.save(args.output)
    print(f"{out}: {packed.nbytes} bytes, {len(packed.kernel_layers)}/{len(model.layers)} layers on the kernels")


def cmd_latency_table(args) -> None:
    from cli.common import load_model
    from kernels.latency import measure_latency_table

    w_bits, a_bits = parse_bits(args.w_bits), parse_bits(args.a_bits)
    model = load_model(args.model)
    table = measure_latency_table(model, w_bits, a_bits, repeats=args.repeats)
    out = args.output or f"{Path(args.model).stem}.latency.json"
    table.save(out)
    print(f"{out}: {len(table.layers)} layers, machine {table.machine}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="run a config on the compiled low-bit kernels: accuracy, agreement, latency")
    p.add_argument("model")
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True, help="'fashion-mnist' or a safetensors file")
    add_data_arguments(p)  # as in the search, for the activation ranges
    p.add_argument("--samples", type=int, help="evaluate on the first N test images only")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("pack", help="lower a config to a packed low-bit model directory")
    p.add_argument("model")
    p.add_argument("--config", required=True)
    p.add_argument("--data", default="fashion-mnist", help="calibration data for the activation ranges")
    add_data_arguments(p)
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("latency-table", help="time every layer at every width on the kernels")
    p.add_argument("model")
    p.add_argument("-o", "--output")
    p.add_argument("--w-bits", default="1-8")
    p.add_argument("--a-bits", default="8")
    p.add_argument("--repeats", type=int, default=30)
    p.set_defaults(func=cmd_latency_table)
