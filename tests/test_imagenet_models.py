"""The ImageNet-size reference architectures (models/imagenet.py): torchvision's structure, batch-1 export."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))

from build_imagenet import normalise, to_uint8_224
from imagenet import ARCHITECTURES, MobileNetV2, ResNet18

# torchvision.models.resnet18() / mobilenet_v2() parameter counts at 1000 classes; at 10 classes the final
# Linear shrinks by (features + 1) * 990.
TORCHVISION_PARAMS = {"resnet18-224": (11_689_512, 512), "mobilenetv2-224": (3_504_872, 1280)}


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_parameter_counts_match_torchvision(name):
    at_1000, features = TORCHVISION_PARAMS[name]
    assert _params(ARCHITECTURES[name](num_classes=1000)) == at_1000
    assert _params(ARCHITECTURES[name]()) == at_1000 - (features + 1) * 990


def test_torchvision_module_names():
    r = ResNet18().state_dict()
    assert r["conv1.weight"].shape == (64, 3, 7, 7)
    assert r["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert r["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert r["layer4.1.bn2.running_var"].shape == (512,)
    assert r["fc.weight"].shape == (10, 512)
    assert "layer1.0.downsample.0.weight" not in r
    m = MobileNetV2().state_dict()
    assert m["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert m["features.1.conv.0.0.weight"].shape == (32, 1, 3, 3)  # t=1: depthwise first, no expansion
    assert m["features.1.conv.1.weight"].shape == (16, 32, 1, 1)
    assert m["features.2.conv.0.0.weight"].shape == (96, 16, 1, 1)
    assert m["features.17.conv.3.running_mean"].shape == (320,)
    assert m["features.18.0.weight"].shape == (1280, 320, 1, 1)
    assert m["classifier.1.weight"].shape == (10, 1280)
    assert sum(1 for k in m if k.endswith(".weight") and m[k].ndim == 4) == 52  # 52 convs, as torchvision


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_batch1_export_runs_and_matches_eager(name):
    torch.manual_seed(0)
    model = ARCHITECTURES[name]().eval()
    x = torch.randn(1, 3, 224, 224)
    ep = torch.export.export(model, (x,))
    assert tuple(ep.graph_module.graph.find_nodes(op="placeholder")[-1].meta["val"].shape) == (1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ep.module()(x), model(x), atol=1e-4)


def test_image_format_round_trip():
    # 28 px normalised Fashion-MNIST -> uint8 224 px, three equal channels -> normalised NCHW again
    raw = torch.randint(0, 256, (2, 1, 28, 28)).float()
    x = (raw / 255 - 0.2860) / 0.3530
    images = to_uint8_224(x)
    assert images.dtype == torch.uint8 and images.shape == (2, 224, 224, 3)
    assert torch.equal(images[..., 0], images[..., 2])
    flat = to_uint8_224((torch.full((1, 1, 28, 28), 100.0) / 255 - 0.2860) / 0.3530)
    assert torch.equal(flat, torch.full((1, 224, 224, 3), 100, dtype=torch.uint8))  # levels come back exactly
    back = normalise(images, torch.full((3,), 0.2860), torch.full((3,), 0.3530))
    assert back.shape == (2, 3, 224, 224) and back.dtype == torch.float32
    assert torch.allclose(back[:, 1].mean((1, 2)), x.mean((1, 2, 3)), atol=0.05)
