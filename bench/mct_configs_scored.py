"""Score the per-layer bits Sony MCT chose (bench/mct_baseline.py --out FILE) in OUR simulator.

    .venv/bin/python bench/mct_configs_scored.py docs/mct_resnet20_configs.json

MCT's own top-1 mixes its bit allocation with its quantizer (power-of-two activation thresholds at
every tensor, its own bias correction). Applying its bit-widths to our quantizer (per-channel MSE
weights, 8-bit layer inputs, our bias correction) isolates the allocation, so it compares like for
like with bench/search_quality.py's columns. Runs in the project's .venv.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from search.config import QuantConfig  # noqa: E402
from search.cost import config_cost  # noqa: E402
from search.data import fashion_mnist_splits  # noqa: E402
from search.model import load_model  # noqa: E402
from search.simulate import Simulator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="the JSON bench/mct_baseline.py --out wrote")
    args = parser.parse_args()
    torch.set_num_threads(2)
    splits = fashion_mnist_splits(1024)
    model = load_model(ROOT / "models" / "resnet20-fmnist.pt2")
    sim = Simulator(model, splits.calib.inputs)
    print("| TPC | avg w bits budget | MCT top-1 | MCT's bits in our simulator | avg w bits |")
    print("|---|---|---|---|---|")
    for row in json.loads(Path(args.results).read_text()):
        # MCT names layers after the nn.Module's attributes (dots become underscores, BN folded in)
        mct_bits = {k.removesuffix("_bn"): v for k, v in row["bits"].items()}
        w_bits = {l.name: mct_bits[l.name.replace(".", "_")] for l in model.layers}
        config = QuantConfig.from_bits(model, w_bits, 8)
        top1 = 100 * sim.evaluate(config, splits.test).top1
        print(
            f"| {row['tpc']} | {row['avg_wbits_budget']} | {row['mct_top1']:.2f} | {top1:.2f} | "
            f"{config_cost(model, config).avg_wbits:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
