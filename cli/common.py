"""What several commands share: bit-choice parsing, the job-spec flags, the data flags, progress text."""

from __future__ import annotations

import argparse
import json


class Interrupted(Exception):
    """Ctrl-C, with the one line that tells the user where things stand (exit status 130)."""


def parse_bits(text: str) -> list[int]:
    """Bit choices: '2-8' (a range), '2,4,8' (a list) or '8'."""
    try:
        if "-" in text:
            lo, hi = (int(x) for x in text.split("-"))
            return list(range(lo, hi + 1))
        return [int(x) for x in text.split(",")]
    except ValueError as e:
        raise ValueError(f"bit choices look like 2-8, 2,4,8 or 8; got {text!r}") from e


def format_bits(bits: list[int]) -> str:
    if len(bits) > 2 and bits == list(range(bits[0], bits[-1] + 1)):
        return f"{bits[0]}-{bits[-1]}"
    return ",".join(map(str, bits))


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def progress_label(head: str, phase: str | None) -> str:
    """'running: measuring'; a phase that only repeats the head ('queued: queued') is shown once."""
    return head if not phase or phase == head else f"{head}: {phase}"


def progress_count(step: int | None, total: int | None) -> str:
    """'3/7', or nothing while the total is unknown (never '0/None')."""
    return f"{step or 0}/{total}" if total else ""


def json_object(flag: str, text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} is not JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, e.g. '{{\"sweep_points\": 3}}'; got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# The library owns every default; flags left unset are not passed, so the spec (or load_splits) applies its own.


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--calib-size and --seed: which images calibrate, chosen as a search with the same values chooses them."""
    from search.data import DEFAULT_CALIB_SIZE, DEFAULT_SPLIT_SEED

    p.add_argument(
        "--calib-size", type=positive_int, metavar="N", help=f"calibration samples (default {DEFAULT_CALIB_SIZE})"
    )
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help=f"picks the calibration subset (default {DEFAULT_SPLIT_SEED}); use a search's seed "
        "to calibrate on its images",
    )


def load_data(args):
    """The splits for --data, --calib-size and --seed: the same images a search with these values uses."""
    from search.data import load_splits

    given = {k: v for k, v in (("calib_size", args.calib_size), ("seed", args.seed)) if v is not None}
    return load_splits(args.data, **given)


def _spec_default(name: str, model=None) -> str:
    from search.spec import JobSpec

    value = (model or JobSpec).model_fields[name].get_default(call_default_factory=True)
    return format_bits(value) if name in ("w_bits", "a_bits") else str(value)


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a job spec (search/spec.py), shared by `search` and `submit`."""
    from search.finetune import FineTuneOptions
    from search.searches import FINETUNE_METHODS, METHODS

    d = _spec_default
    p.add_argument("--method", required=True, help=" | ".join(METHODS))
    p.add_argument(
        "--budget",
        action="append",
        required=True,
        metavar="NAME=VALUE",
        help="a limit (avg_wbits, weight_bytes, bitops, act_bytes, latency_us); repeatable",
    )
    p.add_argument(
        "--sweep",
        action="append",
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="one more budget to run at, limiting the same metrics as --budget, e.g. --sweep avg_wbits=2.5; "
        "repeatable (each is a budget; at most 16): one job, one Pareto front over every budget, the best per budget",
    )
    p.add_argument("--w-bits", help=f"weight bit choices, e.g. 2-8 or 2,4,8 (default {d('w_bits')})")
    p.add_argument("--a-bits", help=f"activation bit choices, e.g. 8 or 4-8; 16 = float (default {d('a_bits')})")
    p.add_argument("--scheme", help=f"weight grid: uniform | pot | apot (default {d('scheme')})")
    p.add_argument("--clip", help=f"weight clipping: max | mse (default {d('clip')})")
    p.add_argument(
        "--act-calibration", help=f"activation ranges: minmax | percentile | mse (default {d('act_calibration')})"
    )
    p.add_argument("--params", metavar="JSON", help="the method's own options, e.g. '{\"sweep_points\": 3}'")
    p.add_argument("--calib-size", type=int, metavar="N", help=f"calibration samples (default {d('calib_size')})")
    p.add_argument(
        "--val-samples",
        type=int,
        metavar="N",
        help=f"validation samples scoring each candidate (default {d('val_samples')})",
    )
    p.add_argument(
        "--seed", type=int, metavar="N", help=f"the search's RNG and the calibration subset (default {d('seed')})"
    )
    p.add_argument(
        "--options",
        metavar="JSON",
        help='more spec fields as one JSON object (e.g. \'{"clip": "max"}\'); the flags win',
    )
    ft = p.add_argument_group(
        f"STE fine-tuning on the data set's training split ({', '.join(FINETUNE_METHODS)}; off by default)"
    )
    f = lambda name: _spec_default(name, FineTuneOptions)  # noqa: E731
    ft.add_argument(
        "--finetune-epochs",
        type=int,
        metavar="N",
        help="imprinting: N epochs after every bit lowering (Liu 2021 Algorithm 1 uses 4); "
        "haq: N epochs per episode before the reward",
    )
    ft.add_argument(
        "--finetune-steps", type=int, metavar="N", help="N minibatches per fine-tune instead of whole epochs"
    )
    ft.add_argument(
        "--finetune-samples",
        type=int,
        metavar="N",
        help="training images used (a seeded subset; default all of the training split)",
    )
    ft.add_argument("--finetune-batch", type=int, metavar="N", help=f"minibatch size (default {f('batch_size')})")
    ft.add_argument("--finetune-lr", type=float, metavar="LR", help=f"Adam learning rate (default {f('lr')})")


FINETUNE_FLAGS = {
    "finetune_epochs": "epochs",
    "finetune_steps": "steps",
    "finetune_samples": "samples",
    "finetune_batch": "batch_size",
    "finetune_lr": "lr",
}


def spec_fields(args) -> dict:
    """The spec's fields from --options, then the flags that were given."""
    fields = json_object("--options", getattr(args, "options", None))
    fields.update(method=args.method, budget=args.budget)
    for flag in ("w_bits", "a_bits"):
        text = getattr(args, flag)
        if text is not None:
            try:
                fields[flag] = parse_bits(text)
            except ValueError as e:
                raise ValueError(f"--{flag.replace('_', '-')}: {e}") from None
    if getattr(args, "sweep", None):
        # each --sweep is one budget, as --budget items: "avg_wbits=2.5,act_bytes=4096" -> ["avg_wbits=2.5", ...]
        fields["sweep"] = [[item for item in text.split(",") if item.strip()] for text in args.sweep]
    if args.params is not None:
        fields["params"] = json_object("--params", args.params)
    for name in ("scheme", "clip", "act_calibration", "calib_size", "val_samples", "seed"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    finetune = {field: getattr(args, flag) for flag, field in FINETUNE_FLAGS.items() if getattr(args, flag) is not None}
    if finetune:
        base = fields.get("finetune") or {}
        fields["finetune"] = {**base, **finetune} if isinstance(base, dict) else base
    return fields


def spec_from_args(args):
    """The checked JobSpec; a SpecError (a ValueError) names every bad field in one line."""
    from search.spec import make_spec

    return make_spec(**spec_fields(args))


def load_model(path):
    """search.model.load_model, saying on stderr how a fixed-batch export will run (rewritten, or slow)."""
    import sys

    from search.model import load_model as load

    model = load(path)
    if model.exported_batch is not None:
        print(f"note: {model.batch_summary}", file=sys.stderr)
    return model


def budget_recommendations(result) -> list[tuple[int, str, object]]:
    """(index, budget in words, its recommended candidate or None) per budget of a budget sweep's result
    (search/sweep.py SweepResult); empty for a result of one budget."""
    from search.sweep import budget_label

    budgets = getattr(result, "budgets", [])
    if len(budgets) < 2:
        return []
    return [(i, budget_label(b), c) for i, (b, c) in enumerate(zip(budgets, result.recommended_per_budget))]


def print_budget_recommendations(console, result) -> None:
    """`bitsearch search` with --sweep: a table of the best candidate at each budget (nothing without a sweep)."""
    from rich.table import Table

    rows = budget_recommendations(result)
    if not rows:
        return
    table = Table(title="best per budget (#0: --budget, then each --sweep)")
    for col in ("#", "budget", "avg w bits", "weight bytes", "BitOPs", "val top-1", "val SQNR dB", "found under"):
        table.add_column(col, justify="right")
    for index, label, c in rows:
        if c is None:
            table.add_row(f"#{index}", label, "-", "-", "-", "-", "-", "no candidate fits")
            continue
        table.add_row(
            f"#{index}",
            label,
            f"{c.cost.avg_wbits:.2f}",
            f"{c.cost.weight_bytes:,}",
            f"{c.cost.bitops:,}",
            percent(c.val_top1),
            f"{c.val_sqnr_db:.2f}",
            f"#{c.meta.get('budget', index)}",
        )
    console.print(table)
