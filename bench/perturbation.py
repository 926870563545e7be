"""How much a model's float graph amplifies small perturbations, and what uniform quantization does to it.

    .venv/bin/python bench/perturbation.py mobilenetv2-224 resnet18-224 mobilenetv2-fmnist resnet20-fmnist
    .venv/bin/python bench/perturbation.py mobilenetv2-224 --layers       # + each layer alone at W8 and at A8

For each model (models/NAME.pt2; the 224 px ones on models/fmnist224.safetensors, the others on
Fashion-MNIST): the logits' SQNR against the float model when Gaussian noise at 60 / 40 / 20 dB SQNR is
added to the input (no quantization anywhere), then under uniform configs (per-channel weights, per-tensor
activations, bitsearch's defaults), and with --layers one layer alone quantized, the rest float. This is
the evidence of docs/methods.md#mobilenetv2-at-224-px-a-chaotic-reference: a trained network loses a few
dB of a 60 dB perturbation, the random-weight MobileNetV2-224 turns it into 5 dB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from search.data import fashion_mnist_splits, load_dataset_file  # noqa: E402
from search.model import load_model  # noqa: E402
from search.quant.weight import sqnr_db  # noqa: E402
from search.simulate import Simulator  # noqa: E402

UNIFORM = ((8, 8), (8, None), (None, 8), (6, 8), (4, 8), (4, None))  # (w bits, a bits), None = float


def images(name: str, calib: int, held_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    if name.endswith("-224"):
        x = load_dataset_file(ROOT / "models" / "fmnist224.safetensors").inputs
        return x[:calib], x[512 : 512 + held_out]  # bench/imagenet.py calibrates on the first 256
    splits = fashion_mnist_splits(calib)
    return splits.calib.inputs, splits.val.inputs[:held_out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=16, help="images the SQNR is measured on")
    parser.add_argument("--layers", action="store_true", help="also each layer alone at W8 and at A8")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in args.models:
        model = load_model(ROOT / "models" / f"{name}.pt2")
        calib, x = images(name, args.calib, args.held_out)
        sim = Simulator(model, calib)
        sim.set_float()
        ref = sim.forward(x)
        g = torch.Generator().manual_seed(0)
        cells = []
        for db in (60, 40, 20):
            noise = torch.randn(x.shape, generator=g) * x.pow(2).mean().sqrt() * 10 ** (-db / 20)
            cells.append(f"input noise {db} dB -> {sqnr_db(ref, sim.forward(x + noise)):.1f} dB")
        for w, a in UNIFORM:
            for layer in model.layers:
                sim.set_layer(layer.name, w, a)
            cells.append(f"W{w or 'float'}A{a or 'float'} {sqnr_db(ref, sim.forward(x)):.1f} dB")
        print(f"{name}: " + "; ".join(cells), flush=True)
        if args.layers:
            print("  layer, depthwise, output SQNR dB with it alone at W8 (float input), alone at A8 (float weights)")
            for layer in model.layers:
                out = []
                for w, a in ((8, None), (None, 8)):
                    sim.set_float()
                    sim.set_layer(layer.name, w, a)
                    out.append(sqnr_db(ref, sim.forward(x)))
                print(f"  {layer.name:28s} {int(layer.is_depthwise)} {out[0]:6.1f} {out[1]:6.1f}", flush=True)
            sim.set_float()


if __name__ == "__main__":
    main()
