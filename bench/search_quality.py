"""Search quality benchmark: test-set top-1 of each method's recommended config at a budget.

    .venv/bin/python bench/search_quality.py                       # every model, budgets 2 2.5 3 4
    .venv/bin/python bench/search_quality.py --models resnet20-fmnist --budgets 3 --methods sqnr uniform
    .venv/bin/python bench/search_quality.py --models resnet20-fmnist --budgets 3 --a-bits 4-8 --a-budget 6

For each model and average-weight-bits budget (8-bit activations, PTQ only): the recommended
candidate of every method, uniform at the highest width that fits, the median and best of
`--random` random configs that fit, and each search's wall time. Results are printed as a
Markdown table (paste into docs/benchmarks.md) and written as JSON with --out.

With --a-bits LO-HI activation bits are searched too (choices LO..HI per layer; without it every
activation is 8 bits, as above). --a-budget A then adds a BitOPs limit to each weight budget W:
the BitOPs of the network with every layer at W weight bits and A activation bits,
sum(MACs_l) * W * A (search/cost.py has no average-activation-bits metric; BitOPs is the budget
that prices activation bits). Uniform W{W}A{A} meets both limits exactly. In this mode the
table also gives each recommended config's average weight bits and its mean activation bits
over the layers (the JSON adds the MAC-weighted mean and the BitOPs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cli.common import parse_bits  # noqa: E402
from search.config import QuantConfig  # noqa: E402
from search.cost import Budget  # noqa: E402
from search.data import DEFAULT_CALIB_SIZE, fashion_mnist_splits  # noqa: E402
from search.model import load_model  # noqa: E402
from search.searches import METHODS, SearchOptions, run_search  # noqa: E402
from search.simulate import Simulator  # noqa: E402

METHOD_PARAMS = {
    "sqnr": {"mode": "exact"},
    "sqnr-analytic": {"mode": "analytic"},
    "imprinting": {"variant": "faithful"},
    "imprinting-cost": {"variant": "cost_aware"},
    "imprinting-noise": {"variant": "noise_aware"},
    "haq": {"episodes": 200},
}


def test_top1(sim: Simulator, config: QuantConfig, test) -> float:
    return 100 * sim.evaluate(config, test).top1


def record_act_bits(row: dict, key: str, model, cand) -> None:
    """A config's mean activation bits over the layers, MAC-weighted mean, and BitOPs."""
    a_bits = cand.config.a_bits()
    macs = {l.name: l.macs for l in model.layers}
    row[f"{key}_abits"] = round(statistics.mean(a_bits.values()), 2)
    row[f"{key}_abits_mac"] = round(sum(macs[n] * b for n, b in a_bits.items()) / sum(macs.values()), 2)
    row[f"{key}_bitops"] = cand.cost.bitops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20-fmnist", "mobilenetv2-fmnist", "mixer-fmnist"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[2.0, 2.5, 3.0, 4.0])
    parser.add_argument(
        "--methods", nargs="+", default=["sqnr", "sqnr-analytic", "imprinting", "imprinting-cost", "haq"]
    )
    parser.add_argument("--random", type=int, default=20)
    parser.add_argument(
        "--w-bits-at-2",
        default="1-8",
        help="weight bit choices when the budget is <= 2 bits (with 2-8 only all-2 fits)",
    )
    parser.add_argument("--calib-size", type=int, default=DEFAULT_CALIB_SIZE)
    parser.add_argument("--val-samples", type=int, default=2000)
    parser.add_argument("--no-baselines", action="store_true", help="skip uniform and random (searches only)")
    parser.add_argument("--a-bits", help="activation bit choices LO-HI, searched per layer (default: 8 only)")
    parser.add_argument(
        "--a-budget", type=float, help="with --a-bits: add bitops <= sum(MACs) * avg_wbits * A to each budget"
    )
    parser.add_argument("--out", help="write the rows as JSON")
    args = parser.parse_args()
    if args.a_budget is not None and args.a_bits is None:
        parser.error("--a-budget needs --a-bits")
    act_mode = args.a_bits is not None
    a_choices = parse_bits(args.a_bits) if act_mode else [8]
    torch.set_num_threads(2)
    splits = fashion_mnist_splits(args.calib_size)
    rows = []
    for name in args.models:
        model = load_model(ROOT / "models" / f"{name}.pt2")
        start = time.perf_counter()
        sim = Simulator(model, splits.calib.inputs)
        print(f"{name}: calibration {time.perf_counter() - start:.1f} s (shared by every search below)", flush=True)
        fp32 = 100 * sim.evaluate(None, splits.test).top1
        total_macs = sum(l.macs for l in model.layers)
        for avg in args.budgets:
            budget = (
                Budget(avg_wbits=avg)
                if args.a_budget is None
                else Budget(avg_wbits=avg, bitops=int(round(total_macs * avg * args.a_budget)))
            )
            lo, hi = (int(b) for b in args.w_bits_at_2.split("-")) if avg <= 2 else (2, 8)
            choices = list(range(lo, hi + 1))
            row = {"model": name, "avg_wbits": avg, "w_bits": f"{lo}-{hi}", "fp32": round(fp32, 2)}
            if act_mode:
                row.update({"a_bits": args.a_bits, "a_budget": args.a_budget, "bitops_limit": budget.bitops})
            if not args.no_baselines:
                uniform = run_search(
                    "uniform",
                    model,
                    splits,
                    budget,
                    SearchOptions(w_bits=choices, a_bits=a_choices, val_samples=args.val_samples),
                    simulator=sim,
                )
                # widest weights, then (activation bits searched) the most BitOPs: W3A6 rather than W3A4
                best_uniform = max(uniform.candidates, key=lambda c: (c.cost.avg_wbits, c.cost.bitops))
                row["uniform"] = round(test_top1(sim, best_uniform.config, splits.test), 2)
                row["uniform_bits"] = round(best_uniform.cost.avg_wbits, 2)
                if act_mode:
                    record_act_bits(row, "uniform", model, best_uniform)
                rnd = run_search(
                    "random",
                    model,
                    splits,
                    budget,
                    SearchOptions(
                        w_bits=choices, a_bits=a_choices, val_samples=args.val_samples, params={"count": args.random}
                    ),
                    simulator=sim,
                )
                accs = [test_top1(sim, c.config, splits.test) for c in rnd.candidates]
                row["random_median"], row["random_best"] = round(statistics.median(accs), 2), round(max(accs), 2)
            for key in args.methods:
                method = key.split("-")[0]
                if method not in METHODS:
                    row[key] = None
                    continue
                start = time.perf_counter()
                result = run_search(
                    method,
                    model,
                    splits,
                    budget,
                    SearchOptions(
                        w_bits=choices,
                        a_bits=a_choices,
                        val_samples=args.val_samples,
                        params=METHOD_PARAMS.get(key, {}),
                    ),
                    simulator=sim,
                )
                seconds = time.perf_counter() - start
                rec = result.recommended
                row[key] = None if rec is None else round(test_top1(sim, rec.config, splits.test), 2)
                row[f"{key}_bits"] = None if rec is None else round(rec.cost.avg_wbits, 2)
                row[f"{key}_s"] = round(seconds, 1)
                if act_mode and rec is not None:
                    record_act_bits(row, key, model, rec)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    cols = ([] if args.no_baselines else ["uniform", "random_median", "random_best"]) + args.methods
    print("\n| model | avg w bits | choices | fp32 | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cell = "-" if v is None else f"{v:.2f}"
            if f"{c}_s" in r:
                cell += f" ({r[f'{c}_s']:.0f} s)"
            if f"{c}_abits" in r:
                cell += f" W{r[f'{c}_bits']:.2f} A{r[f'{c}_abits']:.2f}"
            cells.append(cell)
        print(f"| {r['model']} | {r['avg_wbits']} | {r['w_bits']} | {r['fp32']:.2f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
