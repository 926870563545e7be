"""Does a short low-resolution training take the 224 px MobileNetV2 out of its chaotic regime?

    .venv/bin/python bench/lowres_pretrain.py --px 32 --images 2048 --epochs 2     # under a CPU-minute

The experiment behind the proposed fix in docs/methods.md#mobilenetv2-at-224-px-a-chaotic-reference (not yet
in models/build_imagenet.py): MobileNetV2 (models/imagenet.py, seed 0) trained from its random
initialisation on Fashion-MNIST training images upscaled to --px (SGD, Nesterov momentum, cosine learning
rate), then its BatchNorm statistics recollected at 224 px on 64 other training images as the builder does;
printed: the held-out top-1 at --px, and the logits' SQNR at 224 px when Gaussian noise at 60 and 40 dB SQNR
is added to the input (the random-weight reference gives 4.9 and 0.0 dB, bench/perturbation.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

from build_imagenet import _inputs, _train_images, collect_bn_statistics  # noqa: E402
from imagenet import MobileNetV2  # noqa: E402

BATCH = 64


def resized(x28: torch.Tensor, px: int) -> torch.Tensor:
    up = nn.functional.interpolate(x28, size=(px, px), mode="bilinear", align_corners=False)
    return up.expand(-1, 3, -1, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--px", type=int, default=32)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = MobileNetV2()
    x28, y = _train_images(args.images, 1)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=4e-5, nesterov=True)
    start, steps, step = time.time(), args.epochs * (args.images // BATCH), 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(args.images)
        for i in range(0, args.images - BATCH + 1, BATCH):
            idx = order[i : i + BATCH]
            for group in opt.param_groups:
                group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = nn.functional.cross_entropy(model(resized(x28[idx], args.px)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        print(f"epoch {epoch}: last loss {loss.item():.3f}, {time.time() - start:.0f} s", flush=True)
    xv, yv = _train_images(args.images + 512, 1)
    xv, yv = xv[args.images :], yv[args.images :]  # training images this run did not train on
    model.eval()
    with torch.no_grad():
        top1 = (model(resized(xv, args.px)).argmax(1) == yv).float().mean()
    print(f"top-1 at {args.px} px on 512 other training images: {top1:.3f}", flush=True)
    bn_x, _ = _train_images(64, 7)
    collect_bn_statistics(model, bn_x)  # at 224 px, train-mode passes as models/build_imagenet.py
    x = _inputs(xv[:16])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = model(x)
        for db in (60, 40):
            noise = torch.randn(x.shape, generator=g) * x.pow(2).mean().sqrt() * 10 ** (-db / 20)
            err = model(x + noise) - ref
            sqnr = 10 * torch.log10(ref.pow(2).mean() / err.pow(2).mean())
            print(f"224 px, input noise {db} dB -> logits SQNR {sqnr:.1f} dB")


if __name__ == "__main__":
    main()
