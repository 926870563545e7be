"""`bitsearch inspect`, `eval` and `search`: the library (search/) on local files.

bitsearch inspect MODEL.pt2 [--json]
bitsearch eval MODEL.pt2 --data fashion-mnist [--config CFG.json | --uniform W/A] [--split test] [--json]
bitsearch search MODEL.pt2 --data fashion-mnist --method sqnr --budget avg_wbits=3 [--out result.json]
    [--report sensitivity.csv]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from search.sensitivity import (
    SENSITIVITY_METHODS,
    SensitivityError,
    SensitivityTables,
    no_sensitivity_reason,
    write_report,
)

from .common import (
    add_data_arguments,
    add_spec_arguments,
    load_data,
    percent,
    print_budget_recommendations,
    print_json,
    progress_count,
    progress_label,
    spec_from_args,
)


def cmd_inspect(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from cli.common import load_model

    model = load_model(args.model)
    total_params = sum(l.params for l in model.layers)
    total_macs = sum(l.macs for l in model.layers)
    if args.json:
        print_json(
            {
                "model": str(args.model),
                "sha256": model.sha256,
                "input_shape": list(model.input_shape),
                "layers": [l.to_dict() for l in model.layers],
                "totals": {
                    "layers": len(model.layers),
                    "layer_params": total_params,
                    "all_params": model.total_params,
                    "macs": total_macs,
                },
            }
        )
        return
    table = Table(title=f"{Path(args.model).name}  sha256 {model.sha256[:16]}  input {list(model.input_shape)}")
    for col in ("#", "layer", "op", "weight shape", "groups", "stride", "params", "MACs", "in", "out"):
        table.add_column(col, justify="right" if col in ("#", "groups", "params", "MACs") else "left")
    for l in model.layers:
        op = l.op + (" dw" if l.is_depthwise else "")
        table.add_row(
            str(l.index),
            l.name,
            op,
            "x".join(map(str, l.weight_shape)),
            str(l.groups),
            "x".join(map(str, l.stride)) or "-",
            f"{l.params:,}",
            f"{l.macs:,}",
            "x".join(map(str, l.in_shape)),
            "x".join(map(str, l.out_shape)),
        )
    table.add_section()
    table.add_row("", f"{len(model.layers)} layers", "", "", "", "", f"{total_params:,}", f"{total_macs:,}", "", "")
    console = Console(width=160)
    console.print(table)
    console.print(f"all parameters in the folded graph (weights, biases, norms): {model.total_params:,}")


def _config_for(args, model):
    from search.config import ConfigError, QuantConfig

    if args.config:
        return QuantConfig.from_json(Path(args.config).read_text(), model)
    if args.uniform:
        try:
            w, a = (int(x) for x in args.uniform.split("/"))
        except ValueError as e:
            raise ConfigError(f"--uniform expects W/A bits such as 4/8, got {args.uniform!r}") from e
        given = {k: v for k, v in (("scheme", args.scheme), ("act_calibration", args.calibration)) if v is not None}
        return QuantConfig.uniform(model, w, a, **given)
    return None


def cmd_eval(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from cli.common import load_model
    from search.cost import config_cost
    from search.simulate import Simulator

    model = load_model(args.model)
    config = _config_for(args, model)
    splits = load_data(args)
    data = getattr(splits, args.split) or splits.val
    sim = Simulator(model, splits.calib.inputs)
    fp = sim.evaluate(None, data)
    res = sim.evaluate(config, data) if config is not None else fp
    cost = config_cost(model, config) if config is not None else None
    out = {
        "model": str(args.model),
        "data": args.data,
        "split": args.split if getattr(splits, args.split) else "val",
        "samples": res.samples,
        "config": "float" if config is None else (args.config or f"uniform W{args.uniform}"),
        "fp32_top1": fp.top1,
        "top1": res.top1,
        "sqnr_db": res.sqnr_db,
        "kl": res.kl,
        "cost": cost.to_dict() if cost else None,
    }
    if args.json:
        print_json(out)
        return
    table = Table(title=f"{Path(args.model).name} on {args.data} ({out['split']}, {res.samples} samples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("config", out["config"])
    table.add_row("fp32 top-1", percent(fp.top1))
    table.add_row("top-1", percent(res.top1))
    table.add_row("output SQNR", f"{res.sqnr_db:.2f} dB")
    table.add_row("KL(float || quant)", f"{res.kl:.5f}")
    if cost:
        table.add_row("average weight bits", f"{cost.avg_wbits:.3f}")
        table.add_row("weight bytes", f"{cost.weight_bytes:,}")
        table.add_row("BitOPs per sample", f"{cost.bitops:,}")
        table.add_row("largest activation (bytes)", f"{cost.act_bytes:,}")
    Console().print(table)


def cmd_search(args) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from cli.common import load_model
    from search.cost import LatencyTable
    from search.spec import load_job_data, run_job

    spec = spec_from_args(args)  # before the model and data are loaded: a bad option costs nothing
    if args.report and spec.method not in SENSITIVITY_METHODS:
        raise SensitivityError(f"--report: {no_sensitivity_reason(spec.method)}")
    model = load_model(args.model)
    splits = load_job_data(spec, args.data)
    latency = LatencyTable.load(args.latency_table) if args.latency_table else None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TextColumn("{task.fields[best]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=args.json,
    ) as bar:
        task = bar.add_task(spec.method, total=None, count="", best="")

        def on_progress(p):
            best = f"best {percent(p.best.val_top1)}" if p.best and p.best.val_top1 is not None else ""
            bar.update(
                task,
                completed=p.step,
                total=p.total or None,
                count=progress_count(p.step, p.total),
                description=progress_label(spec.method, p.phase),
                best=best,
            )

        result = run_job(spec, model, splits, on_progress, latency=latency)
    if args.out:
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=2))
    if args.config_out and result.recommended is not None:
        Path(args.config_out).write_text(result.recommended.config.to_json())
    if args.report:
        write_report(SensitivityTables.parse(result.sensitivity, spec.method), args.report)
    if args.json:
        print_json(result.to_dict())
        return
    table = Table(
        title=f"{spec.method} on {Path(args.model).name}: Pareto front ({result.pareto_metric}), {result.seconds:.1f} s"
    )
    # val top-1 is the config on the model's own weights; with fine-tuning, the search's fine-tuned
    # weights (not part of the result) reach the extra column's figure
    tuned = any("finetuned_val_top1" in c.meta for c in result.candidates)
    for col in (
        "avg w bits",
        "weight bytes",
        "BitOPs",
        "val top-1",
        *(("fine-tuned top-1",) if tuned else ()),
        "fits",
        "",
    ):
        table.add_column(col, justify="right")
    for c in sorted(result.pareto, key=lambda c: getattr(c.cost, result.pareto_metric)):
        table.add_row(
            f"{c.cost.avg_wbits:.2f}",
            f"{c.cost.weight_bytes:,}",
            f"{c.cost.bitops:,}",
            percent(c.val_top1),
            *((percent(c.meta.get("finetuned_val_top1")),) if tuned else ()),
            "yes" if c.fits else "no",
            "recommended" if c is result.recommended else "",
        )
    out = Console()
    out.print(table)
    if result.recommended is None:
        out.print("no candidate meets the budget")
    else:
        out.print("recommended w_bits: " + " ".join(f"{k}={v}" for k, v in result.recommended.config.w_bits().items()))
    print_budget_recommendations(out, result)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="list the quantizable layers of a .pt2 model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="simulate a config and report accuracy, SQNR and cost")
    p.add_argument("model")
    p.add_argument(
        "--data", required=True, help="'fashion-mnist' or a safetensors file (inputs or uint8 images+mean+std, labels)"
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="a bitsearch config JSON")
    g.add_argument("--uniform", help="every layer at W/A bits, e.g. 4/8 (A=16 keeps activations float)")
    p.add_argument("--scheme", choices=["uniform", "pot", "apot"], help="with --uniform (default uniform)")
    p.add_argument("--calibration", choices=["minmax", "percentile", "mse"], help="with --uniform (default mse)")
    p.add_argument(
        "--split",
        default="test",
        choices=["test", "val", "calib"],
        help="evaluation split (test falls back to val for data sets without one)",
    )
    add_data_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("search", help="search per-layer bit-widths under a budget")
    p.add_argument("model")
    p.add_argument(
        "--data", required=True, help="'fashion-mnist' or a safetensors file (inputs or uint8 images+mean+std, labels)"
    )
    add_spec_arguments(p)
    p.add_argument("--latency-table", help="a latency table JSON for latency_us budgets")
    p.add_argument("--out", help="write every candidate and the recommendation as JSON")
    p.add_argument("--config-out", help="write the recommended config as JSON")
    p.add_argument(
        "--report",
        metavar="FILE",
        help="write the per-layer sensitivity report (each layer's damage at every width, the widths chosen): "
        "CSV when FILE ends in .csv, else JSON; methods: " + ", ".join(SENSITIVITY_METHODS),
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)
