"""Train the reference models reproducibly and export them as torch.export `.pt2` archives.

    .venv/bin/python models/train.py                 # all three, about 25 minutes on 2 cores
    .venv/bin/python models/train.py resnet20-fmnist # one

Fixed seeds, 2 threads, deterministic algorithms; the test accuracy of each exported
archive (evaluated through bitsearch's own loader) goes into models/manifest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from architectures import ARCHITECTURES  # noqa: E402

from search.data import fashion_mnist_splits  # noqa: E402

# (optimizer, peak lr, epochs); SGD: nesterov momentum 0.9, weight decay 5e-4, batch 128, OneCycle to a peak lr
# of 0.2 (on ResNet-20 this reaches about 91% on Fashion-MNIST within 2 epochs; we train 3).
RECIPES = {
    "resnet20-fmnist": ("sgd", 0.2, 3),
    "mobilenetv2-fmnist": ("sgd", 0.2, 3),
    "mixer-fmnist": ("adamw", 3e-3, 4),
}
BATCH = 128


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    example = (torch.randn(2, 1, 28, 28),)
    ep = torch.export.export(model, example, dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}})
    torch.export.save(ep, str(path))


def train(name: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    splits = fashion_mnist_splits()
    train_set = splits.train
    model = ARCHITECTURES[name]()
    opt_name, lr, epochs = RECIPES[name]
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(train_set) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_set), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            x, y = train_set.inputs[idx], train_set.labels[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            loss = nn.functional.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"{name} epoch {epoch + 1}/{epochs} loss {loss.item():.3f} {time.time() - start:.0f}s", flush=True)
    path = HERE / f"{name}.pt2"
    export(model, path)
    return {
        "file": path.name,
        "architecture": ARCHITECTURES[name].__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(time.time() - start, 1),
    }


def measure(name: str) -> dict:
    """Accuracy of the exported archive as bitsearch itself loads and runs it."""
    from search.model import load_model
    from search.simulate import evaluate_float

    path = HERE / f"{name}.pt2"
    splits = fashion_mnist_splits()
    loaded = load_model(path)
    return {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bytes": path.stat().st_size,
        "fp32_test_top1": round(evaluate_float(loaded, splits.test) * 100, 2),
        "fp32_val_top1": round(evaluate_float(loaded, splits.val) * 100, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--measure-only", action="store_true", help="re-measure existing archives, do not train")
    args = parser.parse_args()
    torch.set_num_threads(2)
    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for name in args.names:
        record = manifest.get(name, {}) if args.measure_only else train(name)
        manifest[name] = {**record, **measure(name)}
        print(json.dumps({name: manifest[name]}, indent=2), flush=True)
        manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
