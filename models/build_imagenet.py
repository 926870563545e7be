"""Build the ImageNet-size reference models and their 224 px data set, reproducibly (`make imagenet-models`).

    .venv/bin/python models/build_imagenet.py                  # data set + both models
    .venv/bin/python models/build_imagenet.py resnet18-224     # data set (if missing) + one model

There is no ImageNet here and training at 224 px on two cores is out of reach, so:

Data (models/fmnist224.safetensors): Fashion-MNIST images upscaled 28 -> 224 px (bilinear, rounded back
to uint8) and replicated to three identical RGB channels, in the uint8 image format of the README
(`images` uint8 [N, 224, 224, 3], `mean`/`std` float32 [3], `labels` int64 [N]; the normalisation is
Fashion-MNIST's own, 0.2860 / 0.3530 per channel). The images are the first N of Fashion-MNIST's
held-out 5,000 (search/data.py: never used to fit anything here), with their real labels.

Weights: torchvision's random initialisation (Kaiming normal, seeded); BatchNorm running statistics
collected on 256 training images (train-mode passes, cumulative average: momentum=None); then only the
final classifier is fitted, by L2-regularised multinomial logistic regression on the frozen pooled
features of 1,024 training images with their real labels. The top-1 on the held-out images of the data
set file is real, if far below a trained network's; it goes into models/imagenet.json.

The models are exported at batch 1, as users usually do: torch.export.export(model, (randn(1, 3, 224, 224),)).
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

from imagenet import ARCHITECTURES, IMAGE_SIZE, head, pooled_features  # noqa: E402

from search.data import (  # noqa: E402
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    fashion_mnist_splits,
    save_image_file,
)

DATA_FILE = HERE / "fmnist224.safetensors"
MANIFEST = HERE / "imagenet.json"
SEED = 0
DATA_IMAGES = 1024
BN_IMAGES = 256
FIT_IMAGES = 1024
BATCH = 32
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def to_uint8_224(x: torch.Tensor) -> torch.Tensor:
    """Normalised Fashion-MNIST [N, 1, 28, 28] -> uint8 [N, 224, 224, 3] (bilinear, three equal channels)."""
    raw = (x * FASHION_MNIST_STD + FASHION_MNIST_MEAN) * 255.0  # back to the file's 0..255 levels, exact
    up = nn.functional.interpolate(raw, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    up = up.round().clamp(0, 255).to(torch.uint8)
    return up[:, 0, :, :, None].expand(-1, -1, -1, 3).contiguous()


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W], (images/255 - mean)/std, as the data set format says."""
    x = images.float().div_(255.0)
    x = (x - mean) / std
    return x.permute(0, 3, 1, 2).contiguous()


def load_image_set(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normalised NCHW float32 inputs, labels or None) of a data set file, read as bitsearch reads it."""
    from search.data import load_dataset_file

    data = load_dataset_file(path)
    return data.inputs, data.labels


def _mean_std() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((3,), FASHION_MNIST_MEAN), torch.full((3,), FASHION_MNIST_STD)


def _inputs(x28: torch.Tensor) -> torch.Tensor:
    # Through uint8 exactly as a user's file would deliver them, so fitting and evaluation see the same pixels.
    return normalise(to_uint8_224(x28), *_mean_std())


def build_data(n: int = DATA_IMAGES) -> dict:
    val = fashion_mnist_splits().val
    save_image_file(to_uint8_224(val.inputs[:n]), *_mean_std(), DATA_FILE, labels=val.labels[:n].clone())
    return {
        "file": DATA_FILE.name,
        "images": n,
        "source": "fashion-mnist held-out split, first images, upscaled 28->224 bilinear, 3 equal channels, uint8",
        "sha256": _sha256(DATA_FILE),
        "bytes": DATA_FILE.stat().st_size,
    }


def _train_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    train = fashion_mnist_splits().train
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return train.inputs[idx], train.labels[idx]


@torch.no_grad()
def collect_bn_statistics(model: nn.Module, x28: torch.Tensor) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over all batches
    model.train()
    for i in range(0, len(x28), BATCH):
        model(_inputs(x28[i : i + BATCH]))
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


@torch.no_grad()
def features(model: nn.Module, x28: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([pooled_features(model, _inputs(x28[i : i + BATCH])) for i in range(0, len(x28), BATCH)])


def _logistic(f: torch.Tensor, y: torch.Tensor, l2: float, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(classes, f.shape[1], dtype=f.dtype, requires_grad=True)
    b = torch.zeros(classes, dtype=f.dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=500, tolerance_grad=1e-9, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(f @ w.T + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fit_classifier(model: nn.Module, f: torch.Tensor, y: torch.Tensor, classes: int) -> dict:
    """Multinomial logistic regression on standardised features, L2 chosen on a 20% hold-out of the
    fitting images, refitted on all of them, then folded into the final Linear layer."""
    f = f.double()
    mu, sd = f.mean(0), f.std(0).clamp_min(1e-6)
    z = (f - mu) / sd
    cut = len(z) * 4 // 5
    scores = {}
    for l2 in L2_GRID:
        w, b = _logistic(z[:cut], y[:cut], l2, classes)
        scores[l2] = ((z[cut:] @ w.T + b).argmax(1) == y[cut:]).double().mean().item()
    best = max(L2_GRID, key=lambda l2: (scores[l2], l2))
    w, b = _logistic(z, y, best, classes)
    layer = head(model)
    with torch.no_grad():
        layer.weight.copy_((w / sd).float())
        layer.bias.copy_((b - (w / sd) @ mu).float())
    return {"l2": best, "holdout_top1": {str(k): round(v * 100, 2) for k, v in scores.items()}}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_model(name: str, seed: int = SEED) -> dict:
    start = time.time()
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]()
    bn_x, _ = _train_images(BN_IMAGES, seed + 1)
    collect_bn_statistics(model, bn_x)
    fit_x, fit_y = _train_images(FIT_IMAGES, seed + 2)
    fit = fit_classifier(model, features(model, fit_x), fit_y, head(model).out_features)
    print(f"{name}: BatchNorm statistics and classifier fitted in {time.time() - start:.0f}s", flush=True)

    inputs, labels = load_image_set(DATA_FILE)
    with torch.no_grad():
        logits = torch.cat([model(inputs[i : i + BATCH]) for i in range(0, len(inputs), BATCH)])
    top1 = (logits.argmax(1) == labels).double().mean().item()

    example = (torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE),)
    ep = torch.export.export(model.eval(), example)
    path = HERE / f"{name}.pt2"
    torch.export.save(ep, str(path))
    # The archive, reloaded, must give the eager model's logits (per sample: it is a batch-1 export).
    reloaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        diff = max((reloaded(inputs[i : i + 1]) - logits[i : i + 1]).abs().max().item() for i in range(4))
    if diff > 1e-3:
        raise RuntimeError(f"{name}: the exported archive differs from the eager model by {diff}")
    return {
        "file": path.name,
        "architecture": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "seed": seed,
        "bn_images": BN_IMAGES,
        "fit_images": FIT_IMAGES,
        "classifier": fit,
        "fp32_top1": round(top1 * 100, 2),
        "fp32_top1_on": f"{DATA_FILE.name} ({len(labels)} held-out images)",
        "export_batch": 1,
        "sha256": _sha256(path),
        "bytes": path.stat().st_size,
        "build_seconds": round(time.time() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {', '.join(ARCHITECTURES)}")
    parser.add_argument("--data-only", action="store_true", help="write the data set file only")
    args = parser.parse_args()
    unknown = set(args.names) - set(ARCHITECTURES)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {list(ARCHITECTURES)}")
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    if not DATA_FILE.exists() or args.data_only or manifest.get("data", {}).get("sha256") != _sha256(DATA_FILE):
        manifest["data"] = build_data()
        print(json.dumps({"data": manifest["data"]}, indent=2), flush=True)
    for name in [] if args.data_only else args.names or list(ARCHITECTURES):
        manifest[name] = build_model(name)
        print(json.dumps({name: manifest[name]}, indent=2), flush=True)
        MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")
    MANIFEST.write_text(json.dumps(dict(sorted(manifest.items())), indent=2) + "\n")


if __name__ == "__main__":
    main()
