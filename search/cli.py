"""The `bitsearch` command line.

    bitsearch inspect MODEL.pt2 [--json]
    bitsearch eval MODEL.pt2 --data fashion-mnist [--config CFG.json | --uniform W/A] [--split test] [--json]
    bitsearch search MODEL.pt2 --data fashion-mnist --method sqnr --budget avg_wbits=3 [--out result.json]
                     [--finetune-epochs N | --finetune-steps N] [--finetune-samples N] (imprinting, haq)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .config import ConfigError, QuantConfig
from .cost import config_cost
from .data import load_splits
from .model import LoadedModel, load_model


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def cmd_inspect(args) -> None:
    model = load_model(args.model)
    total_params = sum(l.params for l in model.layers)
    total_macs = sum(l.macs for l in model.layers)
    if args.json:
        _print_json({
            "model": str(args.model), "sha256": model.sha256, "input_shape": list(model.input_shape),
            "layers": [l.to_dict() for l in model.layers],
            "totals": {"layers": len(model.layers), "layer_params": total_params,
                       "all_params": model.total_params, "macs": total_macs},
        })
        return
    table = Table(title=f"{Path(args.model).name}  sha256 {model.sha256[:16]}  input {list(model.input_shape)}")
    for col in ("#", "layer", "op", "weight shape", "groups", "stride", "params", "MACs", "in", "out"):
        table.add_column(col, justify="right" if col in ("#", "groups", "params", "MACs") else "left")
    for l in model.layers:
        op = l.op + (" dw" if l.is_depthwise else "")
        table.add_row(str(l.index), l.name, op, "x".join(map(str, l.weight_shape)), str(l.groups),
                      "x".join(map(str, l.stride)) or "-", f"{l.params:,}", f"{l.macs:,}",
                      "x".join(map(str, l.in_shape)), "x".join(map(str, l.out_shape)))
    table.add_section()
    table.add_row("", f"{len(model.layers)} layers", "", "", "", "", f"{total_params:,}", f"{total_macs:,}", "", "")
    console = Console(width=160)
    console.print(table)
    console.print(f"all parameters in the folded graph (weights, biases, norms): {model.total_params:,}")


def _config_for(args, model: LoadedModel) -> QuantConfig | None:
    if args.config:
        return QuantConfig.from_json(Path(args.config).read_text(), model)
    if args.uniform:
        try:
            w, a = (int(x) for x in args.uniform.split("/"))
        except ValueError as e:
            raise ConfigError(f"--uniform expects W/A bits such as 4/8, got {args.uniform!r}") from e
        return QuantConfig.uniform(model, w, a, scheme=args.scheme, act_calibration=args.calibration)
    return None


def cmd_eval(args) -> None:
    from .simulate import Simulator

    model = load_model(args.model)
    config = _config_for(args, model)
    splits = load_splits(args.data, calib_size=args.calib_size, seed=args.seed)
    data = getattr(splits, args.split) or splits.val
    sim = Simulator(model, splits.calib.inputs)
    fp = sim.evaluate(None, data)
    res = sim.evaluate(config, data) if config is not None else fp
    cost = config_cost(model, config) if config is not None else None
    out = {
        "model": str(args.model), "data": args.data, "split": args.split if getattr(splits, args.split) else "val",
        "samples": res.samples, "config": "float" if config is None else (args.config or f"uniform W{args.uniform}"),
        "fp32_top1": fp.top1, "top1": res.top1, "sqnr_db": res.sqnr_db, "kl": res.kl,
        "cost": cost.to_dict() if cost else None,
    }
    if args.json:
        _print_json(out)
        return
    console = Console()
    table = Table(title=f"{Path(args.model).name} on {args.data} ({out['split']}, {res.samples} samples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    table.add_row("config", out["config"])
    table.add_row("fp32 top-1", pct(fp.top1))
    table.add_row("top-1", pct(res.top1))
    table.add_row("output SQNR", f"{res.sqnr_db:.2f} dB")
    table.add_row("KL(float || quant)", f"{res.kl:.5f}")
    if cost:
        table.add_row("average weight bits", f"{cost.avg_wbits:.3f}")
        table.add_row("weight bytes", f"{cost.weight_bytes:,}")
        table.add_row("BitOPs per sample", f"{cost.bitops:,}")
        table.add_row("largest activation (bytes)", f"{cost.act_bytes:,}")
    console.print(table)


def _parse_bits(text: str) -> list[int]:
    """'2-8' or '2,4,8' or '8'."""
    if "-" in text:
        lo, hi = (int(x) for x in text.split("-"))
        return list(range(lo, hi + 1))
    return [int(x) for x in text.split(",")]


def cmd_search(args) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .cost import Budget, LatencyTable
    from .finetune import FineTuneOptions
    from .searches import SearchOptions, check_method_options, run_search

    budget = Budget.parse(args.budget)
    params = json.loads(args.params) if args.params else {}
    try:
        finetune = FineTuneOptions(epochs=args.finetune_epochs, steps=args.finetune_steps,
                                   samples=args.finetune_samples, batch_size=args.finetune_batch,
                                   lr=args.finetune_lr)
        options = SearchOptions(w_bits=_parse_bits(args.w_bits), a_bits=_parse_bits(args.a_bits), seed=args.seed,
                                scheme=args.scheme, val_samples=args.val_samples, params=params,
                                finetune=finetune)
    except ValueError as e:
        raise ConfigError(f"invalid search options: {e}") from e
    check_method_options(args.method, options)  # before the model and data are loaded
    model = load_model(args.model)
    splits = load_splits(args.data, calib_size=args.calib_size, seed=args.seed)
    latency = LatencyTable.load(args.latency_table) if args.latency_table else None
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[best]}"), TimeElapsedColumn(), console=console,
                  disable=args.json) as bar:
        task = bar.add_task(args.method, total=None, best="")

        def on_progress(p):
            best = f"best {100 * p.best.val_top1:.2f}%" if p.best and p.best.val_top1 is not None else ""
            bar.update(task, completed=p.step, total=p.total, description=f"{args.method}: {p.phase}", best=best)

        result = run_search(args.method, model, splits, budget, options, on_progress, latency)
    if args.out:
        Path(args.out).write_text(json.dumps(result.to_dict(), indent=2))
    if args.config_out and result.recommended is not None:
        Path(args.config_out).write_text(result.recommended.config.to_json())
    if args.json:
        _print_json(result.to_dict())
        return
    table = Table(title=f"{args.method} on {Path(args.model).name}: Pareto front ({result.pareto_metric}), "
                        f"{result.seconds:.1f} s")
    # val top-1 is the config on the model's own weights; with fine-tuning, the search's fine-tuned
    # weights (not part of the result) reach the extra column's figure
    tuned = any("finetuned_val_top1" in c.meta for c in result.candidates)
    for col in ("avg w bits", "weight bytes", "BitOPs", "val top-1", *(("fine-tuned top-1",) if tuned else ()),
                "fits", ""):
        table.add_column(col, justify="right")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    for c in sorted(result.pareto, key=lambda c: getattr(c.cost, result.pareto_metric)):
        table.add_row(f"{c.cost.avg_wbits:.2f}", f"{c.cost.weight_bytes:,}", f"{c.cost.bitops:,}", pct(c.val_top1),
                      *((pct(c.meta.get("finetuned_val_top1")),) if tuned else ()), "yes" if c.fits else "no",
                      "recommended" if c is result.recommended else "")
    out = Console()
    out.print(table)
    if result.recommended is None:
        out.print("no candidate meets the budget")
    else:
        out.print("recommended w_bits: " + " ".join(f"{k}={v}" for k, v in result.recommended.config.w_bits().items()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitsearch", description="per-layer bit-width search for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list the quantizable layers of a .pt2 model")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("eval", help="simulate a config and report accuracy, SQNR and cost")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="'fashion-mnist' or a safetensors file (inputs, labels)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--config", help="a bitsearch config JSON")
    g.add_argument("--uniform", help="every layer at W/A bits, e.g. 4/8 (A=16 keeps activations float)")
    p.add_argument("--scheme", default="uniform", choices=["uniform", "pot", "apot"], help="with --uniform")
    p.add_argument("--calibration", default="mse", choices=["minmax", "percentile", "mse"], help="with --uniform")
    p.add_argument("--split", default="test", choices=["test", "val", "calib"],
                   help="evaluation split (test falls back to val for data sets without one)")
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("search", help="search per-layer bit-widths under a budget")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="'fashion-mnist' or a safetensors file (inputs, labels)")
    p.add_argument("--method", required=True, help="imprinting | sqnr | haq | uniform | random")
    p.add_argument("--budget", action="append", required=True,
                   help="a limit NAME=VALUE (avg_wbits, weight_bytes, bitops, act_bytes, latency_us); repeatable")
    p.add_argument("--w-bits", default="2-8", help="weight bit choices, e.g. 2-8 or 2,4,8")
    p.add_argument("--a-bits", default="8", help="activation bit choices, e.g. 8 or 4-8 (16 = float)")
    p.add_argument("--scheme", default="uniform", choices=["uniform", "pot", "apot"])
    p.add_argument("--params", help='method options as JSON, e.g. \'{"mode": "analytic"}\'')
    p.add_argument("--latency-table", help="a latency table JSON for latency_us budgets")
    p.add_argument("--calib-size", type=int, default=1024)
    p.add_argument("--val-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    ft = p.add_argument_group("STE fine-tuning on the data set's training split (imprinting, haq; off by default)")
    ft.add_argument("--finetune-epochs", type=int, default=0, metavar="N",
                    help="imprinting: N epochs after every bit lowering (Liu 2021 Algorithm 1 uses 4); "
                         "haq: N epochs per episode before the reward")
    ft.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                    help="N minibatches per fine-tune instead of whole epochs")
    ft.add_argument("--finetune-samples", type=int, default=None, metavar="N",
                    help="training images used (a seeded subset; default all 55k of fashion-mnist)")
    ft.add_argument("--finetune-batch", type=int, default=128, metavar="N")
    ft.add_argument("--finetune-lr", type=float, default=1e-4, metavar="LR", help="Adam learning rate")
    p.add_argument("--out", help="write every candidate and the recommendation as JSON")
    p.add_argument("--config-out", help="write the recommended config as JSON")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    # Commands that live with their own package: validate/pack/latency-table run the compiled kernels,
    # submit/download talk to a bitsearch server. Each module imports its heavy parts only when run.
    from kernels.cli import register as register_kernel_commands
    from .client import register as register_client_commands
    register_kernel_commands(sub)
    register_client_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    # Every error we raise for bad input is a ValueError subclass (ArchiveError, ConfigError, DatasetError,
    # BudgetError, SearchError, the kernels' and the client's errors); OSError covers missing files.
    except (ValueError, OSError) as e:
        print(f"bitsearch: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
