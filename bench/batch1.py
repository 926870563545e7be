"""The same weights exported at batch 1 (as users export) and with a dynamic batch: search and eval side by side.

    .venv/bin/python bench/batch1.py --model resnet20-fmnist --repeats 3

Each command runs through the CLI in a fresh process (model loading and the batch rewrite included), alternating
the two exports so that load on the machine hits both alike; the table gives median wall times, their ratio, and
whether the recommended configs and accuracies are identical.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))
from architectures import ARCHITECTURES  # noqa: E402

CLI = [sys.executable, "-m", "cli.main"]


def export_both(name: str, directory: Path) -> dict[str, Path]:
    module = ARCHITECTURES[name]()
    ep = torch.export.load(str(ROOT / "models" / f"{name}.pt2"))  # our own committed file
    module.load_state_dict({**ep.state_dict, **ep.constants}, strict=False)
    module.eval()
    example = torch.randn(1, 1, 28, 28)
    paths = {"batch-1": directory / f"{name}-b1.pt2", "dynamic": directory / f"{name}-dyn.pt2"}
    torch.export.save(torch.export.export(module, (example,)), str(paths["batch-1"]))
    dyn = {"x": {0: torch.export.Dim("batch")}}
    torch.export.save(
        torch.export.export(module, (torch.cat([example] * 2),), dynamic_shapes=dyn), str(paths["dynamic"])
    )
    return paths


def run(args: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    out = subprocess.run(CLI + args, cwd=ROOT, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20-fmnist", choices=sorted(ARCHITECTURES))
    p.add_argument("--budget", default="avg_wbits=3")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_both(a.model, Path(tmp))
        times: dict[tuple[str, str], list[float]] = {}
        results: dict[tuple[str, str], dict] = {}
        for _ in range(a.repeats):
            for kind, path in paths.items():
                search_out = Path(tmp) / f"{kind}.json"
                t, _ = run(
                    [
                        "search",
                        str(path),
                        "--data",
                        "fashion-mnist",
                        "--method",
                        "sqnr",
                        "--budget",
                        a.budget,
                        "--out",
                        str(search_out),
                        "--json",
                    ]
                )
                times.setdefault(("search", kind), []).append(t)
                found = json.loads(search_out.read_text())
                config = Path(tmp) / f"{kind}-config.json"
                config.write_text(json.dumps(found["recommended_config"]))
                results[("search", kind)] = found["recommended_config"]["layers"]  # the configs name their model
                t, evaluated = run(["eval", str(path), "--data", "fashion-mnist", "--config", str(config), "--json"])
                times.setdefault(("eval", kind), []).append(t)
                results[("eval", kind)] = {k: v for k, v in evaluated.items() if isinstance(v, (int, float))}
    print(f"{a.model}, sqnr at {a.budget}, {a.repeats} runs each, median wall seconds")
    print("| step | dynamic export | batch-1 export | ratio | identical result |")
    print("|---|---|---|---|---|")
    for step in ("search", "eval"):
        dyn, b1 = statistics.median(times[(step, "dynamic")]), statistics.median(times[(step, "batch-1")])
        same = results[(step, "dynamic")] == results[(step, "batch-1")]
        print(f"| {step} | {dyn:.1f} | {b1:.1f} | {b1 / dyn:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
