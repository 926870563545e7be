"""ImageNet-size benchmark (issue 14, item 6): ResNet-18 and MobileNetV2 at 3x224x224, batch-1 exports.

    make imagenet-models                                   # builds models/*-224.pt2 and models/fmnist224.safetensors
    .venv/bin/python bench/imagenet.py                     # everything below, both models
    .venv/bin/python bench/imagenet.py --models resnet18-224 --runs sqnr@4        # one search
    .venv/bin/python bench/imagenet.py --runs haq@4 --haq-episodes 100 --no-latency
    .venv/bin/python bench/imagenet.py --runs --latency-repeats 30                  # latency only
    .venv/bin/python bench/imagenet.py --calib 32 --val 64 --runs sqnr@4 haq@4 --haq-episodes 5   # smoke test

Searches: each run is `bitsearch search` in its own process, as a user runs it (calibration --calib,
--val-samples --val, 8-bit activations, the method's defaults otherwise), timed from outside (wall time, and
peak RSS from the child's rusage); then `bitsearch eval --config <recommended> --split val` in another
process gives the recommended candidate's top-1, output SQNR and KL(float || quant) on the data set's whole
validation split (every image of the file that is not calibration; the labels are real Fashion-MNIST labels).

Latency: the whole model at batch 1 on 2 threads, in one process, the candidates taking turns (as
bench/kernels.py): fp32 torch (the .pt2 as exported, and bitsearch's BatchNorm-folded graph), a W4A8
candidate (uniform, or --config) lowered onto our kernels (kernels/lower.py), and torch's own int8 CPU path
(FX graph-mode post-training quantization with the 'x86' backend: quantized::conv2d etc. on fbgemm/oneDNN;
the eager architecture of models/imagenet.py with the .pt2's weights, calibrated on the same images).
Each path's top-1 on --latency-samples validation images is printed beside it.

Prints Markdown rows for docs/benchmarks.md and writes every figure as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

from build_imagenet import DATA_FILE  # noqa: E402
from imagenet import ARCHITECTURES  # noqa: E402

from bench.kernels import interleaved_times  # noqa: E402

MODELS = list(ARCHITECTURES)
DEFAULT_RUNS = ["sqnr@3,4,6", "imprinting@4", "haq@4"]


def parse_run(text: str) -> tuple[str, list[float]]:
    method, _, budgets = text.partition("@")
    return method, [float(b) for b in budgets.split(",")] if budgets else [4.0]


def run_measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """(completed process, wall seconds, peak RSS in MB) of one child process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, text=True)
        # wait4 reaps the child itself and returns that child's own rusage (RUSAGE_CHILDREN would be the
        # largest of every child so far).
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return done, seconds, usage.ru_maxrss / 1024  # Linux: kilobytes


def search_row(model: str, method: str, budget: float, data: str, args, tmp: Path) -> dict:
    pt2 = str(ROOT / "models" / f"{model}.pt2")
    cfg, out = tmp / f"{model}-{method}-{budget}.config.json", tmp / f"{model}-{method}-{budget}.result.json"
    cmd = [sys.executable, "-m", "cli.main", "search", pt2, "--data", data, "--method", method]
    cmd += ["--budget", f"avg_wbits={budget}", "--calib-size", str(args.calib), "--val-samples", str(args.val)]
    cmd += ["--out", str(out), "--config-out", str(cfg), "--json"]
    if method == "haq":
        cmd += ["--params", json.dumps({"episodes": args.haq_episodes})]
    row = {"model": model, "method": method, "avg_wbits": budget}
    if method == "haq":
        row["episodes"] = args.haq_episodes
    done, seconds, rss = run_measured(cmd)
    row.update(search_s=round(seconds, 1), search_peak_rss_mb=round(rss))
    if done.returncode != 0:
        row["error"] = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return row
    result = json.loads(out.read_text())
    row["candidates"] = len(result["candidates"])
    if result["recommended"] is None:
        row["error"] = "no candidate meets the budget"
        return row
    rec = result["candidates"][result["recommended"]]
    row.update(rec_avg_wbits=round(rec["cost"]["avg_wbits"], 3), search_val_top1=_pct(rec["val_top1"]))
    cmd = [sys.executable, "-m", "cli.main", "eval", pt2, "--data", data, "--config", str(cfg)]
    cmd += ["--split", "val", "--calib-size", str(args.calib), "--json"]
    done, seconds, rss = run_measured(cmd)
    row.update(eval_s=round(seconds, 1), eval_peak_rss_mb=round(rss))
    if done.returncode != 0:
        row["error"] = "eval: " + (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return row
    ev = json.loads(done.stdout)
    row.update(
        samples=ev["samples"],
        fp32_top1=_pct(ev["fp32_top1"]),
        top1=_pct(ev["top1"]),
        sqnr_db=round(ev["sqnr_db"], 2),
        kl=round(ev["kl"], 5),
    )
    return row


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100 * v, 2)


def torch_x86_int8(name: str, state: dict, calib: torch.Tensor) -> torch.nn.Module:
    """torch's own int8 CPU path: FX graph-mode static quantization, 'x86' backend, per-channel weights."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    # torch 2.13 still ships the FX flow and its x86 int8 kernels, but warns on every call that it is deprecated
    # in favour of torchao (not installed here); the warnings say nothing about this run.
    warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor, torch.quantize_per_channel.*")
    warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
    torch.backends.quantized.engine = "x86"
    eager = ARCHITECTURES[name]()
    eager.load_state_dict(state)
    eager.eval()
    prepared = prepare_fx(eager, get_default_qconfig_mapping("x86"), (calib[:1],))
    with torch.no_grad():
        for i in range(0, len(calib), 32):
            prepared(calib[i : i + 32])
    return convert_fx(prepared)


@torch.no_grad()
def latency_rows(name: str, args) -> dict:
    from kernels.lower import lower
    from kernels.ops import isa
    from kernels.validate import iqr, others_share
    from search.config import QuantConfig
    from search.cost import config_cost
    from search.data import load_splits
    from search.model import load_model

    pt2 = ROOT / "models" / f"{name}.pt2"
    splits = load_splits(str(DATA_FILE), args.calib)  # the images a search with --calib-size calibrates on
    calib, val = splits.calib.inputs, splits.val.subset(slice(0, args.latency_samples))

    exported = torch.export.load(str(pt2))
    fp32_module = exported.module()
    model = load_model(pt2)
    config = (
        QuantConfig.from_json(Path(args.config).read_text(), model) if args.config else QuantConfig.uniform(model, 4, 8)
    )
    t0 = time.perf_counter()
    packed = lower(model, config, calib)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    int8 = torch_x86_int8(name, exported.state_dict, calib)
    int8_s = time.perf_counter() - t0

    paths = {
        "fp32 torch (.pt2 as exported)": fp32_module,
        "fp32 torch (BN folded)": model.gm,
        f"bitsearch kernels {'W4A8 uniform' if not args.config else Path(args.config).name}": packed.module,
        "torch int8 (FX, x86 backend)": int8,
    }

    def top1(fn) -> float:
        # The exports are batch-1 graphs: one image at a time, as they are timed.
        hits = sum(int(fn(val.inputs[i : i + 1]).argmax(1).item() == int(val.labels[i])) for i in range(len(val)))
        return round(100 * hits / len(val), 2)

    accuracy = {k: top1(fn) for k, fn in paths.items()}
    x1 = val.inputs[:1]
    calls = {k: (lambda fn=fn: fn(x1)) for k, fn in paths.items()}
    times, share = others_share(lambda: interleaved_times(calls, args.latency_repeats, block=3))
    med = {k: statistics.median(t) for k, t in times.items()}
    fp32 = med["fp32 torch (.pt2 as exported)"]
    return {
        "model": name,
        "isa": isa(),
        "threads": torch.get_num_threads(),
        "repeats": args.latency_repeats,
        "others_cpu_share": None if share is None else round(share, 3),
        "config_avg_wbits": round(config_cost(model, config).avg_wbits, 3),
        "lower_s": round(lower_s, 1),
        "torch_int8_prepare_s": round(int8_s, 1),
        "top1_samples": len(val),
        "paths": {
            k: {
                "median_us": round(med[k]),
                "iqr_us": round(iqr(times[k])),
                "vs_fp32": round(fp32 / med[k], 2),
                "top1": accuracy[k],
            }
            for k in paths
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument(
        "--runs",
        nargs="*",
        default=DEFAULT_RUNS,
        metavar="METHOD@BUDGETS",
        help=f"searches as method@avg_wbits[,avg_wbits...] (default {' '.join(DEFAULT_RUNS)}); none: latency only",
    )
    parser.add_argument("--calib", type=int, default=256, help="calibration images (--calib-size)")
    parser.add_argument("--val", type=int, default=512, help="validation images scoring candidates (--val-samples)")
    parser.add_argument("--haq-episodes", type=int, default=100)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--config", help="a config JSON for the latency rows instead of uniform W4A8")
    parser.add_argument("--latency-repeats", type=int, default=30)
    parser.add_argument("--latency-samples", type=int, default=64, help="images for each latency path's top-1")
    parser.add_argument("--out", help="write every row as JSON")
    args = parser.parse_args()
    torch.set_num_threads(2)
    missing = [m for m in args.models if not (ROOT / "models" / f"{m}.pt2").exists()] + (
        [] if DATA_FILE.exists() else [DATA_FILE.name]
    )
    if missing:
        parser.error(f"missing {', '.join(missing)} under models/: run `make imagenet-models` first")
    machine = platform.processor() or platform.machine()
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {machine}, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)
    searches, latencies = [], []
    with tempfile.TemporaryDirectory(prefix="bench-imagenet-") as tmp_name:
        tmp = Path(tmp_name)
        data = str(DATA_FILE)
        for model in args.models:
            for run in args.runs:
                method, budgets = parse_run(run)
                for budget in budgets:
                    row = search_row(model, method, budget, data, args, tmp)
                    searches.append(row)
                    print(json.dumps(row), flush=True)
            if not args.no_latency:
                row = latency_rows(model, args)
                latencies.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"searches": searches, "latency": latencies}, indent=2) + "\n")
    if searches:
        print(
            "\n| model | method | budget avg w bits | wall s | peak RSS MB | rec. avg w bits | val top-1 "
            "(fp32) | SQNR dB | KL | eval s / MB |\n|---|---|---|---|---|---|---|---|---|---|"
        )
        for r in searches:
            name = r["method"] + (f" ({r['episodes']} episodes)" if "episodes" in r else "")
            if "error" in r and "top1" not in r:
                print(
                    f"| {r['model']} | {name} | {r['avg_wbits']} | {r['search_s']} | {r['search_peak_rss_mb']} | "
                    f"{r['error']} | | | | |"
                )
                continue
            print(
                f"| {r['model']} | {name} | {r['avg_wbits']} | {r['search_s']:.0f} | {r['search_peak_rss_mb']} | "
                f"{r['rec_avg_wbits']:.2f} | {r['top1']:.2f} ({r['fp32_top1']:.2f}) | {r['sqnr_db']:.2f} | "
                f"{r['kl']:.4f} | {r['eval_s']:.0f} / {r['eval_peak_rss_mb']} |"
            )
    for r in latencies:
        print(
            f"\n{r['model']}, batch 1, {r['threads']} threads, {r['isa']}, median of {r['repeats']} "
            f"(others' CPU share {r['others_cpu_share']}); top-1 on {r['top1_samples']} validation images\n"
            "\n| path | median us | IQR us | speed-up vs fp32 | top-1 |\n|---|---|---|---|---|"
        )
        for k, p in r["paths"].items():
            print(f"| {k} | {p['median_us']:,} | {p['iqr_us']:,} | {p['vs_fp32']:.2f}x | {p['top1']:.2f} |")


if __name__ == "__main__":
    main()
